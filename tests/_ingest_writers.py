"""Writers of every input format the ingest stage reads, independent of livermsc.ingest.

Each takes a cells x genes count matrix with gene ids, gene symbols and cell barcodes, and
writes it the way the producing tool does (CellRanger v2/v3 folders and .h5, AnnData, dense
tables in either orientation, Seurat v3/v4 and v5 objects as R's saveRDS/save serialise them).
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.io
import scipy.sparse as sp
from rdata.conversion import to_r
from rdata.parser import RObject, RObjectType
from rdata.unparser._unparser import pack_r_object_info
from rdata.unparser._xdr import UnparserXDR


def _write_text(path: Path, text: str, gz: bool) -> None:
    if gz:
        with gzip.open(path.with_name(path.name + ".gz"), "wt") as fh:
            fh.write(text)
    else:
        path.write_text(text)


def write_mtx(folder: Path, X: sp.spmatrix, ids: list[str], symbols: list[str],
              barcodes: list[str], version: str = "v3", gz: bool = True) -> Path:
    """A CellRanger folder: v2 (genes.tsv, 2 columns) or v3 (features.tsv, 3 columns)."""
    folder.mkdir(parents=True, exist_ok=True)
    if version == "v3":
        feats = "".join(f"{i}\t{s}\tGene Expression\n" for i, s in zip(ids, symbols, strict=True))
        _write_text(folder / "features.tsv", feats, gz)
    else:
        feats = "".join(f"{i}\t{s}\n" for i, s in zip(ids, symbols, strict=True))
        _write_text(folder / "genes.tsv", feats, gz)
    _write_text(folder / "barcodes.tsv", "".join(f"{b}\n" for b in barcodes), gz)
    mtx = sp.coo_matrix(sp.csr_matrix(X).T)
    if gz:
        with gzip.open(folder / "matrix.mtx.gz", "wb") as fh:
            scipy.io.mmwrite(fh, mtx, field="integer")
    else:
        scipy.io.mmwrite(folder / "matrix.mtx", mtx, field="integer")
    return folder


def write_10x_h5(path: Path, X: sp.spmatrix, ids: list[str], symbols: list[str],
                 barcodes: list[str], version: str = "v3", genome: str = "mm10") -> Path:
    """A CellRanger .h5: v3 (/matrix with /matrix/features) or v2 (/<genome>)."""
    csc = sp.csc_matrix(sp.csr_matrix(X).T)  # genes x cells, compressed by cell
    with h5py.File(path, "w") as fh:
        grp = fh.create_group("matrix" if version == "v3" else genome)
        grp.create_dataset("data", data=csc.data.astype(np.int32), compression="gzip")
        grp.create_dataset("indices", data=csc.indices.astype(np.int64), compression="gzip")
        grp.create_dataset("indptr", data=csc.indptr.astype(np.int64))
        grp.create_dataset("shape", data=np.array(csc.shape, dtype=np.int32))
        grp.create_dataset("barcodes", data=np.array(barcodes, dtype="S"))
        if version == "v3":
            feats = grp.create_group("features")
            feats.create_dataset("id", data=np.array(ids, dtype="S"))
            feats.create_dataset("name", data=np.array(symbols, dtype="S"))
            feats.create_dataset("feature_type",
                                 data=np.array(["Gene Expression"] * len(ids), dtype="S"))
            feats.create_dataset("genome", data=np.array([genome] * len(ids), dtype="S"))
            feats.create_dataset("_all_tag_keys", data=np.array([b"genome"]))
        else:
            grp.create_dataset("genes", data=np.array(ids, dtype="S"))
            grp.create_dataset("gene_names", data=np.array(symbols, dtype="S"))
    return path


def write_h5ad(path: Path, X: sp.spmatrix, ids: list[str], symbols: list[str],
               barcodes: list[str]) -> Path:
    """An .h5ad with Ensembl-like ids as var_names and symbols in var['gene_symbol']."""
    var = pd.DataFrame({"gene_symbol": symbols}, index=pd.Index(ids))
    ad.AnnData(X=sp.csr_matrix(X).astype(np.float32), obs=pd.DataFrame(index=barcodes),
               var=var).write_h5ad(path)
    return path


def write_dense(path: Path, X: sp.spmatrix, genes: list[str], barcodes: list[str],
                orientation: str = "genes_x_cells") -> Path:
    """A dense CSV/TSV ([.gz] by the path's suffix) with names in the first row and column."""
    dense = np.asarray(sp.csr_matrix(X).todense())
    if orientation == "genes_x_cells":
        df = pd.DataFrame(dense.T, index=genes, columns=barcodes)
    else:
        df = pd.DataFrame(dense, index=barcodes, columns=genes)
    sep = "," if ".csv" in path.name else "\t"
    df.to_csv(path, sep=sep, compression="infer")
    return path


# --- Seurat objects ----------------------------------------------------------------------------
# R serialises an S4 object as an S4SXP record (flags: OBJECT bit, S4 bit 16 in the general
# purpose field) with no payload, followed by its attribute pairlist: one entry per slot, then
# 'class' (a character vector with attribute 'package'). An S4 class that extends a basic type
# (LogMap extends matrix) is that type's record with the S4 bit set. rdata reads all of this but
# its writer has no S4 record, added here; everything else is rdata's own serialiser.

_S4_BIT = 16
#: the symbol R's methods package stores in an S4 slot holding NULL
R_NULL_SLOT = "\x01NULL\x01"


class _UnparserS4(UnparserXDR):
    """rdata's XDR serialiser plus the S4SXP record (no payload, attributes follow)."""

    def unparse_r_object(self, obj: RObject) -> None:
        if obj.info.type == RObjectType.S4:
            self.unparse_int(pack_r_object_info(obj.info))
            if obj.info.attributes:
                self.unparse_r_object(obj.attributes)
            return
        super().unparse_r_object(obj)


class _Converter(to_r.ConverterFromPythonToR):
    """rdata's converter writing every symbol in full (R writes a repeated symbol as a
    reference to its first record; a reader accepts either). Objects are built out of stream
    order here, which references by creation order would get wrong."""

    def convert_to_r_sym(self, name: str) -> RObject:
        return to_r.build_r_object(RObjectType.SYM,
                                   value=self.convert_to_r_object(name.encode(self.encoding)))


class _Builder:
    """Python values -> rdata RObjects, with S4 objects and classed vectors."""

    def __init__(self) -> None:
        classes = dict(to_r.DEFAULT_CLASS_MAP)
        classes[RObject] = lambda data, _converter: data  # already built
        self.conv = _Converter(constructor_dict=classes)

    def obj(self, value: Any) -> RObject:
        return self.conv.convert_to_r_object(value)

    def cls(self, name: str | list[str], package: str | None) -> RObject:
        names = np.array([name] if isinstance(name, str) else name, dtype="U")
        if package is None:
            return self.obj(names)
        attrs = self.conv.convert_to_r_attributes({"package": np.array([package], dtype="U")})
        plain = self.obj(names)
        return to_r.build_r_object(RObjectType.STR, value=plain.value, attributes=attrs)

    def s4(self, name: str, package: str, slots: dict[str, Any]) -> RObject:
        attrs = self.conv.convert_to_r_attributes({**slots, "class": self.cls(name, package)})
        return to_r.build_r_object(RObjectType.S4, is_object=True, attributes=attrs, gp=_S4_BIT)

    def classed(self, value: list, classes: list[str], extra: dict | None = None) -> RObject:
        """An S3 object: the list ``value`` with attributes ``extra`` and class ``classes``.

        (Built from an unnamed list: converting a value whose own attributes were dropped
        would leave symbol references to records never written.)
        """
        base = self.obj(list(value))
        attrs = self.conv.convert_to_r_attributes({**(extra or {}),
                                                   "class": np.array(classes, dtype="U")})
        return to_r.build_r_object(base.info.type, value=base.value, is_object=True,
                                   attributes=attrs)

    def dgc(self, genes_x_cells: sp.spmatrix, rows: list[str] | None, cols: list[str] | None
            ) -> RObject:
        """A Matrix::dgCMatrix (genes x cells); Dimnames list(NULL, NULL) without names."""
        m = sp.csc_matrix(genes_x_cells)
        m.sort_indices()
        dimnames = [None if rows is None else np.array(rows, dtype="U"),
                    None if cols is None else np.array(cols, dtype="U")]
        return self.s4("dgCMatrix", "Matrix", {
            "i": m.indices.astype(np.int32), "p": m.indptr.astype(np.int32),
            "Dim": np.array(m.shape, dtype=np.int32), "Dimnames": dimnames,
            "x": m.data.astype(np.float64), "factors": []})

    def logmap(self, names: list[str], columns: dict[str, list[str]]) -> RObject:
        """A SeuratObject LogMap: logical matrix, rows = names, one column per layer."""
        mat = np.array([[n in set(members) for members in columns.values()] for n in names],
                       dtype=bool).reshape(len(names), len(columns))
        attrs = self.conv.convert_to_r_attributes({
            "dim": np.array(mat.shape, dtype=np.int32),
            "dimnames": [np.array(names, dtype="U"), np.array(list(columns), dtype="U")],
            "class": self.cls("LogMap", "SeuratObject")})
        return to_r.build_r_object(RObjectType.LGL, value=np.ravel(mat, order="F"),
                                   is_object=True, attributes=attrs, gp=_S4_BIT)

    def factor(self, values: list[str]) -> RObject:
        return self.obj(pd.Categorical(values))


def seurat_object(X: sp.spmatrix, genes: list[str], cells: list[str], meta: pd.DataFrame,
                  version: str = "v3", split_by: str | None = None,
                  with_counts: bool = True, builder: _Builder | None = None) -> RObject:
    """A Seurat object (cells x genes counts ``X``) as R serialises it.

    ``version`` v3 (SeuratObject 4: ``Assay`` with slots counts/data/scale.data, dgCMatrix
    with Dimnames) or v5 (``Assay5``: ``layers`` without Dimnames, names in the ``features`` and
    ``cells`` LogMaps, a 'data' layer of log-normalised values); ``split_by`` a meta.data
    column to split the v5 counts into layers ``counts.<value>`` as ``split()`` does;
    ``with_counts=False`` leaves the counts out (only normalised data).
    """
    b = builder or _Builder()
    gxc = sp.csc_matrix(sp.csr_matrix(X).T.astype(np.float64))
    lib = np.asarray(gxc.sum(axis=0)).ravel()
    norm = gxc.multiply(1e4 / np.maximum(lib, 1)).tocsc()
    norm.data = np.log1p(norm.data)
    meta = meta.copy()
    meta.index = pd.Index(cells, dtype=object)
    if version == "v3":
        slots: dict[str, Any] = {
            "counts": b.dgc(gxc, genes, cells) if with_counts else b.dgc(
                sp.csc_matrix((0, 0)), None, None),
            "data": b.dgc(norm, genes, cells),
            "scale.data": np.zeros((0, 0)),
            "key": np.array(["rna_"], dtype="U"),
            "assay.orig": b.conv.convert_to_r_sym(R_NULL_SLOT),  # an unset S4 slot
            "var.features": np.array([], dtype="U"),
            "meta.features": pd.DataFrame(index=pd.Index(genes, dtype=object)),
            "misc": b.conv.convert_to_r_sym(R_NULL_SLOT),
        }
        assay = b.s4("Assay", "SeuratObject", slots)
        release = [4, 1, 4]
    else:
        layers: dict[str, RObject] = {}
        cell_cols: dict[str, list[str]] = {}
        if with_counts and split_by:
            groups = meta[split_by].astype(str).to_numpy()
            for g in sorted(set(groups)):
                idx = np.flatnonzero(groups == g)
                layers[f"counts.{g}"] = b.dgc(gxc[:, idx], None, None)
                cell_cols[f"counts.{g}"] = [cells[i] for i in idx]
        elif with_counts:
            layers["counts"] = b.dgc(gxc, None, None)
            cell_cols["counts"] = list(cells)
        layers["data"] = b.dgc(norm, None, None)
        cell_cols["data"] = list(cells)
        assay = b.s4("Assay5", "SeuratObject", {
            "layers": layers,
            "cells": b.logmap(list(cells), cell_cols),
            "features": b.logmap(list(genes), {k: list(genes) for k in cell_cols}),
            "default": np.array([1], dtype=np.int32),
            "assay.orig": np.array([], dtype="U"),
            "meta.data": pd.DataFrame(index=pd.RangeIndex(1, len(genes) + 1)),
            "misc": [],
            "key": np.array(["rna_"], dtype="U"),
        })
        release = [5, 0, 2]
    return b.s4("Seurat", "SeuratObject", {
        "assays": {"RNA": assay},
        "meta.data": meta,
        "active.assay": np.array(["RNA"], dtype="U"),
        "active.ident": b.factor(["SeuratProject"] * len(cells)),
        "graphs": [], "neighbors": [], "reductions": [], "images": [],
        "project.name": np.array(["SeuratProject"], dtype="U"),
        "misc": [],
        "version": b.classed([np.array(release, dtype=np.int32)],
                             ["package_version", "numeric_version"]),
        "commands": [], "tools": [],
    })


def write_r_file(path: Path, objects: dict[str, RObject] | RObject, builder: _Builder | None = None
                 ) -> Path:
    """Write an .rds (one object) or an .rda/.RData (a dict name -> object), gzip-compressed
    XDR version 3, as saveRDS()/save() do."""
    b = builder or _Builder()
    rda = isinstance(objects, dict)
    data = b.conv.convert_to_r_data(objects, file_type="rda" if rda else "rds")
    with gzip.open(path, "wb") as fh:
        if rda:
            fh.write(f"RDX{data.versions.format}\n".encode())
        _UnparserS4(fh).unparse_r_data(data)
    return path


def write_seurat(path: Path, X: sp.spmatrix, genes: list[str], cells: list[str],
                 meta: pd.DataFrame, version: str = "v3", split_by: str | None = None,
                 with_counts: bool = True, name: str = "seurat_obj") -> Path:
    """A Seurat object saved as .rds (saveRDS) or, for .rda/.RData, with save(name)."""
    b = _Builder()
    obj = seurat_object(X, genes, cells, meta, version, split_by, with_counts, b)
    rda = path.suffix.lower() in (".rda", ".rdata")
    return write_r_file(path, {name: obj} if rda else obj, b)

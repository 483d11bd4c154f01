"""Writers of every input format the ingest stage reads, independent of livermsc.ingest.

Each takes a cells x genes count matrix with gene ids, gene symbols and cell barcodes, and
writes it the way the producing tool does (CellRanger v2/v3 folders and .h5, AnnData, dense
tables in either orientation).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.io
import scipy.sparse as sp


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

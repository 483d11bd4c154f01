"""Seurat objects (.rds/.rda, v3/v4 Assay and v5 Assay5) read into the counts R saved.

The real object is the Tabula Muris Senis liver sample of scDiffCom (Seurat v4, saved by R);
its counts must equal those of the h5ad converted from it. R is not available here, so the v5
objects are serialised by the test writer (``_ingest_writers.write_seurat``): slot names and
types follow SeuratObject's class definitions (``Assay5``: layers, cells, features, default,
assay.orig, meta.data, misc, key; layers without Dimnames, names in the LogMaps), and
:func:`test_writer_encodes_s4_objects_as_r_does` checks that the writer encodes S4 objects
(flags, slot order, class/package attributes) exactly as R did in the real file.
"""

from __future__ import annotations

import gzip
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import rdata
import scipy.sparse as sp
from _ingest_writers import _Builder, write_r_file, write_seurat
from livermsc.ingest import IngestError, ingest_sample, read_seurat

TMS = "liver_tabula_muris_senis_scDiffCom"
RDA = Path(TMS) / "raw" / "seurat_sample_tms_liver.rda"
H5AD = Path(TMS) / "tms_liver_scDiffCom.h5ad"
BY_AGE = {"format": "seurat", "split": {"by": "obs", "column": "age_group"}}


def _h5ad(shared_data: Path) -> ad.AnnData:
    return ad.read_h5ad(shared_data / H5AD)


def _assert_same_counts(a: ad.AnnData, ref: ad.AnnData, sample: str) -> None:
    """``a`` (ingested) holds exactly ``ref``'s counts for the same cells and genes."""
    barcodes = a.obs["barcode"].astype(str).tolist()
    assert a.obs_names.tolist() == [f"{sample}:{b}" for b in barcodes]
    assert a.var_names.tolist() == ref.var_names.tolist()
    expected = sp.csr_matrix(ref[barcodes].X)
    counts = a.layers["counts"]
    assert a.X is None  # the counts are stored once, in layers["counts"]
    assert counts.shape == expected.shape
    assert (counts != expected).nnz == 0
    assert np.all(counts.data == np.round(counts.data))


@pytest.mark.realdata
def test_real_seurat_object_gives_the_counts_of_the_h5ad(shared_data):
    ref = _h5ad(shared_data)
    row = {"sample": "all", "arm": "any", "path": RDA.name, "format": "seurat"}
    a = ingest_sample(shared_data / RDA, row, study="tms", species="mouse")
    assert a.n_obs == ref.n_obs == 468 and a.n_vars == ref.n_vars == 726
    assert a.obs["barcode"].tolist() == ref.obs_names.tolist()  # same cell order as in R
    _assert_same_counts(a, ref, "all")
    assert a.uns["ingest"]["format"] == "seurat"
    assert a.uns["ingest"]["seurat_assay"] == "RNA"
    assert a.uns["ingest"]["seurat_version"] == "v3/v4"
    # meta.data comes along as source_<column>
    for col in ("cell_type", "age_group", "sex"):
        assert a.obs[f"source_{col}"].astype(str).tolist() == ref.obs[col].astype(str).tolist()
    assert isinstance(a.obs["source_cell_type"].dtype, pd.CategoricalDtype)
    assert np.allclose(a.obs["source_nCount_RNA"], np.asarray(ref.X.sum(axis=1)).ravel())


@pytest.mark.realdata
def test_real_seurat_object_split_by_a_meta_data_column(shared_data):
    ref = _h5ad(shared_data)
    n = {}
    for value in ("OLD", "YOUNG"):
        row = {"sample": value.lower(), "arm": value.lower(), "split_value": value}
        a = ingest_sample(shared_data / RDA, row, study="tms", species="mouse", combined=BY_AGE)
        part = ref[ref.obs["age_group"].astype(str) == value]
        assert sorted(a.obs["barcode"]) == sorted(part.obs_names)
        _assert_same_counts(a, ref, value.lower())
        assert set(a.obs["source_age_group"]) == {value}
        assert a.uns["ingest"]["split"] == {"by": "obs", "key": "age_group", "value": value,
                                            "n_cells_in_file": 468}
        n[value] = a.n_obs
    assert n == {"OLD": 250, "YOUNG": 218}
    row = {"sample": "mid", "arm": "mid", "split_value": "MIDDLE"}
    with pytest.raises(IngestError, match=r"seurat_sample_tms_liver\.rda: no cell has split value "
                       r"'MIDDLE' .*values in the file: \['OLD', 'YOUNG'\]"):
        ingest_sample(shared_data / RDA, row, study="tms", species="mouse", combined=BY_AGE)
    bad = {"format": "seurat", "split": {"by": "obs", "column": "mouse"}}
    with pytest.raises(IngestError, match=r"\.rda: split column 'mouse' not found in the "
                       r"meta\.data \(columns: \['cell', 'sex'"):
        ingest_sample(shared_data / RDA, {"sample": "s", "arm": "a", "split_value": "x"},
                      study="tms", species="mouse", combined=bad)


def _s4_signatures(node: rdata.parser.RObject, out: dict | None = None) -> dict:
    """class -> (package, slot names in order, (type, object, gp) of each slot) of every S4
    object (and S4-flagged vector) in a parsed R file."""
    out = {} if out is None else out

    def name(sym: rdata.parser.RObject) -> str:
        while sym.info.type == rdata.parser.RObjectType.REF:
            sym = sym.referenced_object
        return sym.value.value.decode()

    def deref(obj: rdata.parser.RObject) -> rdata.parser.RObject:
        while obj.info.type == rdata.parser.RObjectType.REF:
            obj = obj.referenced_object
        return obj

    def pairs(attr):
        while attr is not None and attr.info.type == rdata.parser.RObjectType.LIST:
            yield name(attr.tag), deref(attr.value[0])
            attr = attr.value[1]

    while node.info.type == rdata.parser.RObjectType.REF:
        node = node.referenced_object
    attrs = dict(pairs(node.attributes)) if node.info.attributes else {}
    if node.info.gp & 16 and "class" in attrs:
        cls = attrs["class"]
        package = dict(pairs(cls.attributes)).get("package")
        slots = tuple((k, v.info.type.name, v.info.object, v.info.gp)
                      for k, v in pairs(node.attributes) if k != "class")
        out[cls.value[0].value.decode()] = (
            node.info.type.name, node.info.object,
            package.value[0].value.decode() if package is not None else None, slots)
    children = list(node.value) if node.info.type in (rdata.parser.RObjectType.VEC,
                                                       rdata.parser.RObjectType.LIST) else []
    for child in children + [v for _, v in pairs(node.attributes)] * bool(node.info.attributes):
        if isinstance(child, rdata.parser.RObject):
            _s4_signatures(child, out)
    return out


@pytest.mark.realdata
def test_writer_encodes_s4_objects_as_r_does(shared_data, tmp_path):
    """The test writer's v3 object has R's encoding of Seurat, Assay and dgCMatrix."""
    ref = _h5ad(shared_data)
    real = rdata.parser.parse_file(shared_data / RDA)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        meta = rdata.conversion.convert(real)["seurat_sample_tms_liver"].__dict__["meta.data"]
    path = write_seurat(tmp_path / "copy.rda", ref.X, ref.var_names.tolist(),
                        ref.obs_names.tolist(), meta, version="v3",
                        name="seurat_sample_tms_liver")
    ours = rdata.parser.parse_file(path)
    want, got = _s4_signatures(real.object), _s4_signatures(ours.object)
    assert set(want) == set(got) == {"Seurat", "Assay", "dgCMatrix"}
    for cls in want:  # slot order, slot types and flags, S4 bit, class package
        assert got[cls][:3] == want[cls][:3], cls
        assert [s[0] for s in got[cls][3]] == [s[0] for s in want[cls][3]], cls
        assert [s[1:3] for s in got[cls][3]] == [s[1:3] for s in want[cls][3]], cls


@pytest.mark.realdata
@pytest.mark.parametrize(("version", "split_by", "suffix"), [
    ("v5", None, ".rds"), ("v5", "age_group", ".rds"), ("v5", None, ".RData"),
    ("v3", None, ".rds")])
def test_seurat_files_written_like_r_read_back_exactly(shared_data, tmp_path, version, split_by,
                                                       suffix):
    """v5 Assay5 (one counts layer, or split counts.<group> layers as split() leaves them),
    v3 .rds: the counts of the real object come back exactly, per sample too."""
    ref = _h5ad(shared_data)
    rng = np.random.default_rng(3)
    order = rng.permutation(ref.n_obs)  # cells not grouped by age: split layers reorder them
    part = ref[order]
    meta = part.obs[["age_group", "cell_type", "sex"]].astype(str)
    path = write_seurat(tmp_path / f"obj{suffix}", part.X, part.var_names.tolist(),
                        part.obs_names.tolist(), meta, version=version, split_by=split_by)
    src = read_seurat(path)
    assert src.info["seurat_version"] == ("v5" if version == "v5" else "v3/v4")
    a = ingest_sample(path, {"sample": "all", "arm": "x", "format": "seurat"}, study="t",
                      species="mouse")
    _assert_same_counts(a, ref, "all")
    if split_by is None:
        assert a.obs["barcode"].tolist() == part.obs_names.tolist()
    assert a.obs["source_cell_type"].astype(str).tolist() == \
        ref[a.obs["barcode"].tolist()].obs["cell_type"].astype(str).tolist()
    combined = {"format": "seurat", "split": {"by": "obs", "column": "age_group"}}
    young = ingest_sample(path, {"sample": "young", "arm": "y", "split_value": "YOUNG"},
                          study="t", species="mouse", combined=combined)
    assert young.n_obs == 218
    _assert_same_counts(young, ref, "young")


def _tiny(n_cells: int = 8) -> tuple[sp.csr_matrix, list[str], list[str], pd.DataFrame]:
    genes = ["Actb", "Gapdh", "mt-Co1", "Alb", "Apoa1", "Cd68", "Dcn", "Stab2", "Krt19", "Cd3e",
             "Ptprc", "Lyz2"]
    X = sp.csr_matrix(np.arange(n_cells * len(genes)).reshape(n_cells, len(genes)) % 5)
    cells = [f"AAACCTGAGAAGGC{i:02d}-1" for i in range(n_cells)]
    meta = pd.DataFrame({"mouse": [f"m{i % 2}" for i in range(n_cells)]})
    return X, genes, cells, meta


@pytest.mark.parametrize("version", ["v3", "v5"])
def test_object_without_counts_is_refused(tmp_path, version):
    X, genes, cells, meta = _tiny()
    path = write_seurat(tmp_path / "data_only.rds", X, genes, cells, meta, version=version,
                        with_counts=False)
    expected = "slot 'counts' is missing or empty" if version == "v3" else \
        r"has no 'counts' layer \(layers: \['data'\]\)"
    with pytest.raises(IngestError, match=rf"data_only\.rds: assay 'RNA' .*{expected}.*raw counts"):
        ingest_sample(path, {"sample": "s", "arm": "a", "format": "seurat"}, study="t",
                      species="mouse")


def test_normalised_counts_slot_is_refused(tmp_path):
    X, genes, cells, meta = _tiny()
    path = write_seurat(tmp_path / "lognorm.rds", sp.csr_matrix(np.log1p(X.toarray())), genes,
                        cells, meta)
    with pytest.raises(IngestError, match=r"lognorm\.rds: .*not integers.*raw counts"):
        ingest_sample(path, {"sample": "s", "arm": "a", "format": "seurat"}, study="t",
                      species="mouse")


def test_non_seurat_r_objects_are_refused(tmp_path):
    b = _Builder()
    frame = write_r_file(tmp_path / "frame.rds", b.obj(pd.DataFrame({"x": [1.0, 2.0]})), b)
    with pytest.raises(IngestError, match=r"frame\.rds: holds an R object of class 'data\.frame'; "
                       r"expected a Seurat object"):
        read_seurat(frame)
    b = _Builder()
    rda = write_r_file(tmp_path / "two.rda", {"counts": b.obj(np.arange(3.0)),
                                              "cells": b.obj(np.array(["a", "b"], dtype="U"))}, b)
    with pytest.raises(IngestError, match=r"two\.rda: holds no Seurat object \(found: counts "
                       r"\(ndarray\), cells \(ndarray\)\); expected an R object of class Seurat"):
        read_seurat(rda)
    b = _Builder()
    sce = write_r_file(tmp_path / "sce.rds",
                       b.s4("SingleCellExperiment", "SingleCellExperiment", {"x": []}), b)
    with pytest.raises(IngestError, match=r"sce\.rds: .*class 'SingleCellExperiment'; expected "
                       r"a Seurat object"):
        read_seurat(sce)


def test_gzipped_copies_as_geo_serves_them_are_read(tmp_path):
    """GEO serves objects as <name>.rds.gz / .rda.gz: a gzip around R's own compression."""
    X, genes, cells, meta = _tiny()
    for suffix in (".rds", ".rda"):
        plain = write_seurat(tmp_path / f"obj{suffix}", X, genes, cells, meta, version="v5")
        wrapped = tmp_path / f"obj{suffix}.gz"
        wrapped.write_bytes(gzip.compress(plain.read_bytes()))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no warning reaches the rule log
            src = read_seurat(wrapped)
        assert (src.load() != X).nnz == 0 and src.barcodes.tolist() == cells


def test_damaged_r_files_are_refused(tmp_path):
    X, genes, cells, meta = _tiny()
    good = write_seurat(tmp_path / "good.rds", X, genes, cells, meta)
    raw = gzip.decompress(good.read_bytes())
    cut = tmp_path / "cut.rds"
    with gzip.open(cut, "wb") as fh:
        fh.write(raw[: len(raw) // 2])
    with pytest.raises(IngestError, match=r"cut\.rds: not a readable R data file"):
        read_seurat(cut)
    text = tmp_path / "text.rds"
    text.write_text("gene,cell\nActb,1\n")
    with pytest.raises(IngestError, match=r"text\.rds: not a readable R data file"):
        read_seurat(text)

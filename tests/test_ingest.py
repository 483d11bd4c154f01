"""Ingest: every reader gives back the counts it was given; bad input is refused by name."""

from __future__ import annotations

import gzip
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp
import yaml
from _ingest_writers import write_10x_h5, write_dense, write_h5ad, write_mtx
from livermsc.config import ConfigError, combined_entry, load_study, validate_sample_sheet
from livermsc.ingest import (
    IngestError,
    check_species,
    guess_orientation,
    ingest_sample,
    merge_duplicate_symbols,
    sample_path,
    symbol_style,
)

# --- real data -------------------------------------------------------------------------------

#: folder -> (file, species, var column holding symbols or None for var_names, cells to keep)
REAL = {
    "pbmc3k_partial_Dino": ("pbmcSmall_200cells_1000genes.h5ad", "human", "gene_symbol", None),
    "liver_tabula_muris_senis_scDiffCom": ("tms_liver_scDiffCom.h5ad", "mouse", None, None),
    "glioblastoma_panobinostat_lemur": ("glioblastoma_panobinostat_lemur.h5ad", "human", "symbol",
                                        ("sample", "PW030-701")),
}


def _load_real(shared_data: Path, name: str) -> dict:
    file, species, sym_col, subset = REAL[name]
    with warnings.catch_warnings():  # glioblastoma: barcodes repeat across samples
        warnings.simplefilter("ignore", UserWarning)
        a = ad.read_h5ad(shared_data / name / file)
    if subset is not None:
        col, value = subset
        a = a[a.obs[col].astype(str) == value].copy()
    X = sp.csr_matrix(a.X)
    symbols = a.var[sym_col].astype(str).tolist() if sym_col else a.var_names.tolist()
    ids = a.var_names.astype(str).tolist()
    if ids == symbols:  # no ids in the file: make Ensembl-like ones
        ids = [f"ENSMUSG{i:011d}" for i in range(len(symbols))]
    return {"X": X, "ids": ids, "symbols": symbols, "barcodes": a.obs_names.astype(str).tolist(),
            "species": species}


def _variants(d: dict, out: Path) -> list[tuple[str, Path, str, str]]:
    """(label, path, format, orientation) for every supported way of writing ``d``."""
    X, ids, sym, bc = d["X"], d["ids"], d["symbols"], d["barcodes"]
    v = []
    for version in ("v2", "v3"):
        for gz in (False, True):
            label = f"mtx_{version}{'_gz' if gz else ''}"
            v.append((label, write_mtx(out / label, X, ids, sym, bc, version, gz), "10x_mtx", "auto"))
    v.append(("h5_v3", write_10x_h5(out / "v3.h5", X, ids, sym, bc, "v3"), "10x_h5", "auto"))
    v.append(("h5_v2", write_10x_h5(out / "v2.h5", X, ids, sym, bc, "v2"), "10x_h5", "auto"))
    v.append(("h5ad", write_h5ad(out / "x.h5ad", X, ids, sym, bc), "h5ad", "auto"))
    for fmt in ("csv", "tsv"):
        for orient in ("genes_x_cells", "cells_x_genes"):
            for gz in (False, True):
                name = f"{fmt}_{orient}{'.gz' if gz else ''}"
                path = write_dense(out / f"{orient}.{fmt}{'.gz' if gz else ''}", X, sym, bc, orient)
                v.append((name, path, fmt, "auto"))
    # explicit orientation too
    v.append(("tsv_explicit", write_dense(out / "explicit.tsv", X, sym, bc, "cells_x_genes"),
              "tsv", "cells_x_genes"))
    return v


@pytest.mark.realdata
@pytest.mark.parametrize("name", list(REAL))
def test_every_format_reads_back_identical_counts(shared_data, tmp_path, name):
    d = _load_real(shared_data, name)
    expected = d["X"].toarray()
    for label, path, fmt, orient in _variants(d, tmp_path):
        row = {"sample": "s1", "arm": "healthy", "path": path.name, "format": fmt,
               "orientation": orient, "batch": "b1", "stage": "early", "donor_age": "12w"}
        a = ingest_sample(path, row, study="real", species=d["species"])
        counts = a.layers["counts"]
        assert a.X is None, label  # the counts are stored once, in layers["counts"]
        assert isinstance(counts, sp.csr_matrix), label
        assert np.array_equal(counts.toarray(), expected), label
        assert np.all(counts.data == np.round(counts.data)), label
        assert a.var_names.tolist() == d["symbols"], label
        assert a.var_names.is_unique, label
        assert a.obs_names.tolist() == [f"s1:{b}" for b in d["barcodes"]], label
        if fmt in ("10x_mtx", "10x_h5", "h5ad"):
            assert a.var["gene_ids"].tolist() == d["ids"], label
        assert a.uns["ingest"]["n_duplicated_symbols"] == 0, label
        assert a.uns["ingest"]["species_check"]["share_fitting"] > 0.9, label


@pytest.mark.realdata
def test_obs_come_from_the_sample_sheet(shared_data, tmp_path):
    d = _load_real(shared_data, "liver_tabula_muris_senis_scDiffCom")
    path = write_mtx(tmp_path / "s", d["X"], d["ids"], d["symbols"], d["barcodes"])
    row = {"sample": "old_1", "arm": "injury", "path": "s", "format": "10x_mtx",
           "orientation": "auto", "stage": "week4", "sex": "male", "qc_n_mads": "4"}
    a = ingest_sample(path, row, study="tms", species="mouse")
    obs = a.obs
    for col, value in {"study": "tms", "sample": "old_1", "arm": "injury", "animal": "old_1",
                       "batch": "old_1", "species": "mouse", "stage": "week4",
                       "sex": "male"}.items():
        assert isinstance(obs[col].dtype, pd.CategoricalDtype), col
        assert set(obs[col]) == {value}, col
    for col in ("path", "format", "orientation", "qc_n_mads"):
        assert col not in obs
    assert obs["barcode"].tolist() == d["barcodes"]


@pytest.mark.realdata
def test_mouse_data_declared_human_is_refused(shared_data, tmp_path):
    d = _load_real(shared_data, "liver_tabula_muris_senis_scDiffCom")
    path = write_mtx(tmp_path / "s", d["X"], d["ids"], d["symbols"], d["barcodes"])
    row = {"sample": "s", "arm": "a", "path": "s", "format": "10x_mtx"}
    with pytest.raises(IngestError, match=r"do not fit the declared species 'human'") as err:
        ingest_sample(path, row, study="x", species="human")
    assert str(path) in str(err.value) and "Check 'species'" in str(err.value)


@pytest.mark.realdata
def test_normalised_data_given_as_counts_is_refused(shared_data, tmp_path):
    import scanpy as sc

    a = ad.read_h5ad(shared_data / "pbmc3k_partial_Dino" / "pbmcSmall_200cells_1000genes.h5ad")
    a.X = a.X.astype(np.float32)
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    path = tmp_path / "normalised.h5ad"
    a.write_h5ad(path)
    row = {"sample": "s", "arm": "a", "path": path.name, "format": "h5ad"}
    with pytest.raises(IngestError, match=r"not integers .*normalised or log-transformed") as err:
        ingest_sample(path, row, study="x", species="human")
    assert str(err.value).startswith(str(path))


# --- synthetic cases -------------------------------------------------------------------------

def _tiny(n_cells: int = 5) -> dict:
    genes = ["Actb", "Gapdh", "mt-Co1", "Alb", "Apoa1", "Cd68", "Dcn", "Stab2", "Krt19", "Cd3e",
             "Ptprc", "Lyz2"]
    X = sp.csr_matrix(np.arange(n_cells * len(genes)).reshape(n_cells, len(genes)) % 7)
    return {"X": X, "ids": [f"ENSMUSG{i:011d}" for i in range(len(genes))], "symbols": genes,
            "barcodes": [f"AAACCTGAGAAGGC{i:02d}-1" for i in range(n_cells)]}


def test_missing_file_is_named(tmp_path):
    row = {"sample": "s1", "arm": "a", "path": "nope.h5", "format": "10x_h5"}
    with pytest.raises(IngestError, match=r"nope\.h5: file not found"):
        ingest_sample(tmp_path / "nope.h5", row, study="x", species="mouse")
    d = _tiny()
    folder = write_mtx(tmp_path / "s1", d["X"], d["ids"], d["symbols"], d["barcodes"])
    (folder / "barcodes.tsv.gz").unlink()
    with pytest.raises(IngestError, match=r"s1: file not found: barcodes\.tsv\[\.gz\]"):
        ingest_sample(folder, dict(row, format="10x_mtx"), study="x", species="mouse")


def test_empty_matrix_is_refused(tmp_path):
    d = _tiny()
    zero = write_mtx(tmp_path / "zero", sp.csr_matrix(d["X"].shape), d["ids"], d["symbols"],
                     d["barcodes"])
    row = {"sample": "s", "arm": "a", "path": "zero", "format": "10x_mtx"}
    with pytest.raises(IngestError, match=r"zero: the count matrix is empty"):
        ingest_sample(zero, row, study="x", species="mouse")
    nocells = write_mtx(tmp_path / "nocells", sp.csr_matrix((0, len(d["ids"]))), d["ids"],
                        d["symbols"], [])
    with pytest.raises(IngestError, match=r"nocells: the count matrix is empty \(0 cells"):
        ingest_sample(nocells, row, study="x", species="mouse")
    table = tmp_path / "empty.csv"
    table.write_text("gene\n")
    with pytest.raises(IngestError, match=r"empty\.csv: .*empty"):
        ingest_sample(table, dict(row, format="csv"), study="x", species="mouse")


def test_negative_or_fractional_values_are_refused(tmp_path):
    d = _tiny()
    bad = d["X"].toarray().astype(float)
    bad[0, 0] = -1
    path = write_dense(tmp_path / "neg.csv", sp.csr_matrix(bad), d["symbols"], d["barcodes"])
    row = {"sample": "s", "arm": "a", "path": "neg.csv", "format": "csv"}
    with pytest.raises(IngestError, match=r"neg\.csv: the matrix holds negative values"):
        ingest_sample(path, row, study="x", species="mouse")
    frac = d["X"].toarray().astype(float) * 0.5
    path = write_dense(tmp_path / "frac.csv", sp.csr_matrix(frac), d["symbols"], d["barcodes"])
    with pytest.raises(IngestError, match=r"frac\.csv: .*not integers"):
        ingest_sample(path, dict(row, path="frac.csv"), study="x", species="mouse")


def test_duplicated_symbols_are_summed(tmp_path):
    d = _tiny()
    symbols = list(d["symbols"])
    symbols[1] = "Actb"  # two ids, one symbol
    symbols[4] = "Alb"
    folder = write_mtx(tmp_path / "dup", d["X"], d["ids"], symbols, d["barcodes"])
    row = {"sample": "s", "arm": "a", "path": "dup", "format": "10x_mtx"}
    a = ingest_sample(folder, row, study="x", species="mouse")
    X = d["X"].toarray()
    assert a.var_names.is_unique and a.n_vars == len(symbols) - 2
    assert np.array_equal(a[:, "Actb"].layers["counts"].toarray().ravel(), X[:, 0] + X[:, 1])
    assert np.array_equal(a[:, "Alb"].layers["counts"].toarray().ravel(), X[:, 3] + X[:, 4])
    assert a.var.loc["Actb", "gene_ids"] == f"{d['ids'][0]};{d['ids'][1]}"
    assert a.uns["ingest"]["n_duplicated_symbols"] == 2
    assert a.uns["ingest"]["n_features_merged"] == 2
    assert a.layers["counts"].sum() == X.sum()


def test_merge_duplicate_symbols_hand_example():
    X = sp.csr_matrix(np.array([[1, 2, 3], [4, 5, 6]]))
    var = pd.DataFrame({"symbol": ["A", "B", "A"], "gene_id": ["i1", "i2", "i3"]})
    out, v, n = merge_duplicate_symbols(X, var)
    assert n == 1 and v.index.tolist() == ["A", "B"]
    assert out.toarray().tolist() == [[4, 2], [10, 5]]


def test_non_gene_features_are_dropped(tmp_path):
    d = _tiny()
    folder = write_mtx(tmp_path / "s", d["X"], d["ids"], d["symbols"], d["barcodes"], gz=False)
    lines = (folder / "features.tsv").read_text().splitlines()
    lines[-1] = lines[-1].replace("Gene Expression", "Antibody Capture")
    (folder / "features.tsv").write_text("\n".join(lines) + "\n")
    a = ingest_sample(folder, {"sample": "s", "arm": "a", "path": "s", "format": "10x_mtx"},
                      study="x", species="mouse")
    assert a.n_vars == len(d["symbols"]) - 1 and "Lyz2" not in a.var_names
    assert a.uns["ingest"]["n_non_gene_features_dropped"] == 1


def test_duplicated_barcodes_are_refused(tmp_path):
    d = _tiny()
    bc = list(d["barcodes"])
    bc[1] = bc[0]
    folder = write_mtx(tmp_path / "s", d["X"], d["ids"], d["symbols"], bc)
    with pytest.raises(IngestError, match="duplicated barcodes"):
        ingest_sample(folder, {"sample": "s", "arm": "a", "path": "s", "format": "10x_mtx"},
                      study="x", species="mouse")


def test_guess_orientation():
    genes = pd.Index(["Actb", "Gapdh", "Alb", "Cd68", "mt-Co1"])
    barcodes = pd.Index(["AAACCTGAGAAGGCCT-1", "AAACCTGAGACAGACC-1"])
    names = pd.Index(["Cell_1", "Cell_2", "Cell_3"])
    assert guess_orientation(genes, barcodes, "f") == "genes_x_cells"
    assert guess_orientation(barcodes, genes, "f") == "cells_x_genes"
    assert guess_orientation(names, genes, "f") == "cells_x_genes"
    with pytest.raises(IngestError, match=r"f: cannot tell which axis holds the genes.*orientation"):
        guess_orientation(pd.Index(["a1", "b2"]), pd.Index(["c3", "d4"]), "f")


@pytest.mark.parametrize(("symbol", "style"), [
    ("Actb", "mouse"), ("mt-Co1", "mouse"), ("1110008P14Rik", "mouse"), ("H2-Ab1", "mouse"),
    ("Gm10000", "mouse"), ("ENSMUSG00000029580", "mouse"),
    ("ACTB", "human"), ("MT-CO1", "human"), ("C1orf112", "human"), ("HLA-DRA", "human"),
    ("ENSG00000075624", "human"), ("F2", None), ("AAACCTGAGAAGGCCT-1", None), ("", None)])
def test_symbol_style(symbol, style):
    assert symbol_style(symbol) == style


def test_check_species_threshold():
    mouse = [f"Gene{i}" for i in range(7)] + ["ACTB", "GAPDH", "B2M"]
    assert check_species(mouse, "mouse", "f")["share_fitting"] == pytest.approx(0.7)
    with pytest.raises(IngestError, match=r"f: the gene symbols do not fit .*'human'.*e\.g\. Gene0"):
        check_species(mouse, "human", "f")
    # too few recognisable symbols: no verdict
    assert check_species(["F2", "F3", "C3"], "human", "f")["n_recognised"] == 0


def test_sample_path_of_simulated_study(tmp_path):
    row = {"sample": "healthy_1", "path": "healthy_1"}
    assert sample_path(tmp_path, row, simulated=True) == tmp_path / "healthy_1"
    assert sample_path(tmp_path / "f.h5", row, simulated=False) == tmp_path / "f.h5"


def test_simulated_sample_ingests_with_truth(sim_study):
    folder, _ = sim_study
    sheet = pd.read_csv(folder / "samples.tsv", sep="\t")
    row = sheet.iloc[0].to_dict()
    a = ingest_sample(sample_path(folder, row, True), row, study="demo", species="mouse")
    cells = pd.read_csv(folder / "cells.tsv.gz", sep="\t")
    cells = cells[cells["sample"] == row["sample"]]
    assert a.n_obs == len(cells)
    assert set(a.obs_names) == {f"{row['sample']}:{b}" for b in cells["barcode"]}
    assert a.obs["batch"].iloc[0] == row["batch"]
    with gzip.open(folder / row["path"] / "matrix.mtx.gz", "rb") as fh:
        genes_x_cells = sp.csr_matrix(scipy.io.mmread(fh))
    assert (a.layers["counts"] != genes_x_cells.T).nnz == 0


@pytest.mark.parametrize(("rows", "message"), [
    ([{"sample": "s1", "arm": "a", "path": "x", "format": "loom"}], r"row 1, field 'format'"),
    ([{"sample": "s1", "arm": "a"}], r"'path' is a required property"),
    ([{"sample": "s 1", "arm": "a", "path": "x"}], r"field 'sample'"),
    ([{"sample": "s1", "arm": "a", "path": "x", "qc_max_pct_mt": "ten"}], r"field 'qc_max_pct_mt'"),
    ([{"sample": "s1", "arm": "a", "path": "x"}, {"sample": "s1", "arm": "b", "path": "y"}],
     r"duplicated sample names \['s1'\]"),
])
def test_bad_sample_sheet_is_refused(rows, message):
    with pytest.raises(ConfigError, match=message) as err:
        validate_sample_sheet(pd.DataFrame(rows), "sheet.tsv")
    assert str(err.value).startswith("sheet.tsv")


# --- local combined files: several samples in one file ----------------------------------------

def _combined(n_per: int = 4, samples: tuple[str, ...] = ("m1", "m2", "m3")) -> dict:
    """Counts of several samples in one matrix; barcodes carry an aggr-style -<n> suffix."""
    d = _tiny(n_per * len(samples))
    d["X"] = sp.csr_matrix(d["X"].toarray() + np.repeat(np.arange(len(samples)), n_per)[:, None])
    d["barcodes"] = [f"AAACCTGAGAAGGC{i % n_per:02d}-{i // n_per + 1}"
                     for i in range(n_per * len(samples))]
    d["sample"] = [s for s in samples for _ in range(n_per)]
    return d


@pytest.mark.parametrize("layout", ["h5ad_obs", "10x_h5_barcode", "10x_mtx_table", "csv_barcode"])
def test_combined_file_is_split_into_samples(tmp_path, layout):
    d = _combined()
    X, ids, sym, bc = d["X"], d["ids"], d["symbols"], d["barcodes"]
    if layout == "h5ad_obs":
        path = write_h5ad(tmp_path / "all.h5ad", X, ids, sym, bc)
        a = ad.read_h5ad(path)
        a.obs["mouse"] = pd.Categorical(d["sample"])
        a.obs["n_genes"] = np.arange(a.n_obs)
        a.write_h5ad(path)
        spec = {"format": "h5ad", "split": {"by": "obs", "column": "mouse"}}
    elif layout == "10x_h5_barcode":
        path = write_10x_h5(tmp_path / "all.h5", X, ids, sym, bc)
        spec = {"format": "10x_h5", "split": {"by": "barcode", "pattern": r"-(\d+)$"}}
    elif layout == "10x_mtx_table":
        path = write_mtx(tmp_path / "all", X, ids, sym, bc)
        table = tmp_path / "cells.csv"
        pd.DataFrame({"cell": bc, "mouse": d["sample"]}).to_csv(table, index=False)
        spec = {"format": "10x_mtx", "table": str(table),
                "split": {"by": "table", "table": "cells.csv", "cell_column": "cell",
                          "sample_column": "mouse"}}
    else:
        path = write_dense(tmp_path / "all.csv.gz", X, sym, bc)
        spec = {"format": "csv", "split": {"by": "barcode", "pattern": r"-(\d+)$"}}
    values = {"m1": "1", "m2": "2", "m3": "3"} if "barcode" in layout else \
        {s: s for s in ("m1", "m2", "m3")}
    dense = X.toarray()
    for k, (sample, value) in enumerate(values.items()):
        row = {"sample": sample, "arm": "a", "split_value": value}
        a = ingest_sample(path, row, study="x", species="mouse", combined=spec)
        rows = np.flatnonzero(np.array(d["sample"]) == sample)
        assert a.obs["barcode"].tolist() == [bc[i] for i in rows], layout
        assert np.array_equal(a.layers["counts"].toarray(), dense[rows]), layout
        assert a.obs_names.tolist() == [f"{sample}:{bc[i]}" for i in rows]
        assert a.uns["ingest"]["split"]["value"] == value
        assert a.uns["ingest"]["split"]["n_cells_in_file"] == len(bc)
        if layout == "h5ad_obs":
            assert set(a.obs["source_mouse"]) == {sample}
            assert a.obs["source_n_genes"].tolist() == [float(i) for i in rows]
        assert a.layers["counts"].toarray().min() == k  # each sample's own offset: right cells
    with pytest.raises(IngestError, match=r"no cell has split value 'm9' \(sample 'x9'"):
        ingest_sample(path, {"sample": "x9", "arm": "a", "split_value": "m9"}, study="x",
                      species="mouse", combined=spec)


def test_combined_split_by_table_names_missing_columns(tmp_path):
    d = _combined()
    path = write_10x_h5(tmp_path / "all.h5", d["X"], d["ids"], d["symbols"], d["barcodes"])
    table = tmp_path / "cells.tsv"
    pd.DataFrame({"barcode": d["barcodes"], "mouse": d["sample"]}).to_csv(table, sep="\t",
                                                                          index=False)
    spec = {"format": "10x_h5", "table": str(table),
            "split": {"by": "table", "table": "cells.tsv", "cell_column": "cell",
                      "sample_column": "mouse"}}
    with pytest.raises(IngestError, match=r"cells\.tsv: column\(s\) \['cell'\] not found .*"
                       r"columns: \['barcode', 'mouse'\]"):
        ingest_sample(path, {"sample": "m1", "arm": "a", "split_value": "m1"}, study="x",
                      species="mouse", combined=spec)


def _local_combined_study(folder: Path, files: list[dict], samples: list[dict]) -> Path:
    studies = folder / "studies"
    studies.mkdir(parents=True, exist_ok=True)
    (studies / "comb.yaml").write_text(yaml.safe_dump({
        "id": "comb", "title": "t", "species": "mouse", "source": "local", "files": files,
        "samples": samples}))
    return studies


SEURAT_FILE = {"name": "all.rds", "layout": "combined", "format": "seurat",
               "split": {"by": "obs", "column": "mouse"}}


@pytest.mark.parametrize(("files", "samples", "message"), [
    ([SEURAT_FILE], [{"sample": "m1", "arm": "a"}],
     r"row 1, field 'path': 'path' is a required property \(expected: the sample's counts "
     r"file .*or 'split_value' for a sample of a combined file\)"),
    ([dict(SEURAT_FILE, path="../../etc/passwd")], [{"sample": "m1", "arm": "a",
                                                     "split_value": "m1"}],
     r"field 'files\[0\]\.path': '\.\./\.\./etc/passwd' points outside the study's data folder "
     r"resources/comb/"),
    ([dict(SEURAT_FILE, format="10x_h5")], [{"sample": "m1", "arm": "a", "split_value": "m1"}],
     r"field 'files\[0\]\.split': by obs needs format h5ad or seurat"),
    ([{k: v for k, v in SEURAT_FILE.items() if k != "split"}],
     [{"sample": "m1", "arm": "a", "split_value": "m1"}],
     r"field 'files\[0\]': a combined file needs 'format' and 'split'"),
    ([SEURAT_FILE, dict(SEURAT_FILE, name="other.rds")],
     [{"sample": "m1", "arm": "a", "split_value": "m1"}],
     r"sample 'm1', field 'file': cannot tell which combined file holds this sample "
     r"\(combined files: \['all\.rds', 'other\.rds'\]"),
    ([dict(SEURAT_FILE, split={"by": "table", "table": "cells.tsv", "cell_column": "c",
                               "sample_column": "s"}, format="10x_h5")],
     [{"sample": "m1", "arm": "a", "split_value": "m1"}],
     r"field 'files\[0\]\.split\.table': 'cells\.tsv' \(expected: the name of another files "
     r"entry with layout annotation\)"),
    ([dict(SEURAT_FILE, layout="raw_tar")], [{"sample": "m1", "arm": "a", "split_value": "m1"}],
     r"field 'files\[0\]\.layout': 'raw_tar' \(expected for a local study: combined or "
     r"annotation"),
])
def test_bad_local_combined_study_is_refused(tmp_path, files, samples, message):
    studies = _local_combined_study(tmp_path, files, samples)
    with pytest.raises(ConfigError, match=message) as err:
        load_study("comb", studies)
    assert str(err.value).startswith(str(studies / "comb.yaml"))


def test_local_combined_study_loads(tmp_path):
    samples = [{"sample": "m1", "arm": "a", "split_value": "1"},
               {"sample": "m2", "arm": "b", "split_value": "2", "file": "all.rds"},
               {"sample": "own", "arm": "b", "path": "own.h5ad", "format": "h5ad"}]
    study = load_study("comb", _local_combined_study(tmp_path, [SEURAT_FILE], samples))
    assert combined_entry(study.spec, study.samples.loc["m2"])["name"] == "all.rds"
    assert combined_entry(study.spec, study.samples.loc["own"]) is None


def test_geo_study_cannot_download_a_seurat_combined_file(tmp_path):
    studies = tmp_path / "studies"
    studies.mkdir()
    (studies / "g.yaml").write_text(yaml.safe_dump({
        "id": "g", "title": "t", "species": "mouse", "source": "geo", "accession": "GSE1",
        "files": [SEURAT_FILE], "samples": [{"sample": "m1", "arm": "a", "split_value": "m1",
                                             "path": "m1", "format": "h5ad"}]}))
    with pytest.raises(ConfigError, match=r"field 'files\[0\]\.format': 'seurat' is not one of "
                       r"\['csv', 'tsv', 'h5ad'\]"):
        load_study("g", studies)


@pytest.mark.slow
@pytest.mark.realdata
def test_workflow_ingests_a_local_seurat_object_per_sample(shared_data, tmp_path, repo_root):
    """A local study of one Seurat .rda split by meta.data age_group: `snakemake` writes one
    raw h5ad per sample holding exactly that group's counts."""
    for name in ("config", "seeds"):
        shutil.copytree(repo_root / name, tmp_path / name)
    rda = shared_data / "liver_tabula_muris_senis_scDiffCom" / "raw" / "seurat_sample_tms_liver.rda"
    data = tmp_path / "resources" / "tmsseurat" / "objects"
    data.mkdir(parents=True)
    (data / rda.name).symlink_to(rda)
    (tmp_path / "config" / "studies" / "tmsseurat.yaml").write_text(yaml.safe_dump({
        "id": "tmsseurat", "title": "TMS liver, Seurat object", "species": "mouse",
        "source": "local",
        "files": [{"name": rda.name, "path": f"objects/{rda.name}", "layout": "combined",
                   "format": "seurat", "split": {"by": "obs", "column": "age_group"}}],
        "samples": [{"sample": "old", "arm": "old", "split_value": "OLD"},
                    {"sample": "young", "arm": "young", "split_value": "YOUNG"}]}))
    targets = ["results/tmsseurat/raw/old.h5ad", "results/tmsseurat/raw/young.h5ad"]
    proc = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile",
                           str(repo_root / "Snakefile"), "--directory", str(tmp_path),
                           "--cores", "2", *targets, "--config", "studies=[tmsseurat]"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    ref = ad.read_h5ad(shared_data / "liver_tabula_muris_senis_scDiffCom" /
                       "tms_liver_scDiffCom.h5ad")
    for target, group in zip(targets, ("OLD", "YOUNG"), strict=True):
        a = ad.read_h5ad(tmp_path / target)
        part = ref[ref.obs["age_group"].astype(str) == group]
        assert sorted(a.obs["barcode"]) == sorted(part.obs_names)
        expected = sp.csr_matrix(ref[a.obs["barcode"].tolist()].X)
        assert a.X is None and (a.layers["counts"] != expected).nnz == 0
        assert set(a.obs["arm"]) == {group.lower()}
        assert a.uns["ingest"]["format"] == "seurat"

"""QC: hand-computed MAD thresholds, gene groups, and the planted defects of the demo study."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from livermsc.config import validate
from livermsc.ingest import ingest_sample, sample_path
from livermsc.qc import (
    REASONS,
    MtClass,
    QCSettings,
    annotate_gene_groups,
    effective_min_genes,
    flag_cells,
    is_outlier,
    mad_bounds,
    mt_classes_of,
    rule_qc,
    rule_qc_summary,
    run_qc,
)

DEFAULT_QC = validate({"studies": ["demo"]}, "config", "config.yaml")["qc"]


# --- thresholds by hand ----------------------------------------------------------------------

def test_mad_bounds_hand_example():
    # median 3; |x - 3| = 2, 1, 0, 1, 97 -> MAD 1 (unscaled); 2 MADs -> [1, 5]
    values = [1, 2, 3, 4, 100]
    assert mad_bounds(values, 2) == (3.0, 1.0, 1.0, 5.0)
    assert is_outlier(values, 2).tolist() == [False, False, False, False, True]
    assert is_outlier([0.5, 2, 3, 4, 100], 2, side="lower").tolist() == [True] + [False] * 4
    assert is_outlier(values, 2, side="upper").tolist() == [False] * 4 + [True]


def test_flag_cells_hand_example():
    # 9 cells. log1p counts: median 8, MAD 0.5 -> 5 MADs: [5.5, 10.5]; log1p genes: median 7,
    # MAD 0.2 -> [6, 8]; top-20 share: median 25, MAD 2 -> [15, 35]; mt %: median 4, MAD 1 ->
    # 3 MADs: 7, raised to the 15% floor (so 14% is kept), cap 25%
    obs = pd.DataFrame({
        "log1p_total_counts": [8.0, 8.5, 7.5, 5.0, 11.0, 8.0, 8.0, 8.5, 7.5],
        "log1p_n_genes_by_counts": [7.0, 7.2, 6.8, 7.2, 6.8, 5.9, 7.0, 7.2, 6.8],
        "pct_counts_in_top_20_genes": [25.0, 27.0, 23.0, 27.0, 23.0, 25.0, 40.0, 27.0, 23.0],
        "pct_counts_mt": [4.0, 5.0, 3.0, 4.0, 14.0, 20.0, 30.0, 4.0, 3.0],
        "n_genes_by_counts": [1000, 1300, 900, 1000, 1000, 150, 1000, 1000, 1000],
    })
    settings = QCSettings(n_mads=5, n_mads_mt=3, min_pct_mt=15, max_pct_mt=25, min_genes=200)
    flags, thr = flag_cells(obs, settings)
    assert (thr["counts_low"], thr["counts_high"]) == (5.5, 10.5)
    assert thr["genes_low"] == pytest.approx(6.0) and thr["genes_high"] == pytest.approx(8.0)
    assert (thr["top20_low"], thr["top20_high"]) == (15.0, 35.0)
    assert (thr["mt_median"], thr["mt_mad"], thr["mt_mad_upper"]) == (4.0, 1.0, 7.0)
    assert thr["mt_threshold"] == 15.0
    assert thr["counts_high_natural"] == pytest.approx(np.expm1(10.5))

    def cells(*idx):
        return [i in idx for i in range(9)]

    assert flags["counts"].tolist() == cells(3, 4)
    assert flags["genes"].tolist() == cells(5)
    assert flags["top20"].tolist() == cells(6)
    assert flags["mt_mad"].tolist() == cells(5, 6)
    assert flags["mt_cap"].tolist() == cells(6)
    assert flags["min_genes"].tolist() == cells(5)
    # a per-sample cap below the floor wins; dropping top20 from the MAD rule keeps cell 6's share
    lenient = QCSettings(max_pct_mt=10, outlier_metrics=("counts", "genes"))
    flags, thr = flag_cells(obs, lenient)
    assert thr["mt_threshold"] == 10.0
    assert flags["mt_mad"].tolist() == cells(4, 5, 6)
    assert not flags["top20"].any()


def test_flag_cells_per_mt_class_hand_example():
    # 8 cells: 4 of class hepatocyte (mt 20, 22, 24, 45 -> median 23, MAD 2 -> 3 MADs: 29,
    # raised to the class floor 30, cap 50: only 45 goes) and 4 of class other (mt 2, 3, 4, 20
    # -> median 3.5, MAD 1 -> 6.5, raised to the floor 15: 20 goes).
    obs = pd.DataFrame({
        "log1p_total_counts": [8.0] * 8, "log1p_n_genes_by_counts": [7.0] * 8,
        "pct_counts_in_top_20_genes": [25.0] * 8, "n_genes_by_counts": [1000] * 8,
        "pct_counts_mt": [20.0, 22.0, 24.0, 45.0, 2.0, 3.0, 4.0, 20.0],
    })
    hep = MtClass("hepatocyte", ("Alb",), 3.0, n_mads_mt=3, min_pct_mt=30, max_pct_mt=50)
    settings = QCSettings(n_mads_mt=3, min_pct_mt=15, max_pct_mt=25, mt_classes=(hep,))
    classes = ["hepatocyte"] * 4 + ["other"] * 4
    flags, thr = flag_cells(obs, settings, classes)
    assert (thr["mt_hepatocyte_median"], thr["mt_hepatocyte_mad"]) == (23.0, 2.0)
    assert thr["mt_hepatocyte_threshold"] == 30.0 and thr["mt_hepatocyte_cap"] == 50.0
    assert (thr["mt_median"], thr["mt_threshold"]) == (3.5, 15.0)
    assert flags["mt_mad"].tolist() == [False, False, False, True, False, False, False, True]
    assert not flags["mt_cap"].iloc[:4].any()
    # one rule for all cells: the mt-rich hepatocytes raise the median (20, MAD 10), so the
    # threshold is the 25% cap and the damaged non-hepatocyte at 20% is kept
    flags, thr = flag_cells(obs, QCSettings(n_mads_mt=3, min_pct_mt=15, max_pct_mt=25))
    assert (thr["mt_median"], thr["mt_mad"], thr["mt_threshold"]) == (20.0, 10.0, 25.0)
    assert flags["mt_mad"].tolist() == [False, False, False, True, False, False, False, False]


def test_min_genes_is_limited_by_the_genes_measured():
    s = QCSettings(min_genes=200, min_genes_max_fraction=0.1)
    assert effective_min_genes(s, 300) == 30
    assert effective_min_genes(s, 15000) == 200
    obs = pd.DataFrame({"log1p_total_counts": [6.0] * 4, "log1p_n_genes_by_counts": [4.0] * 4,
                        "pct_counts_in_top_20_genes": [30.0] * 4, "pct_counts_mt": [1.0] * 4,
                        "n_genes_by_counts": [25, 40, 60, 80]})
    flags, thr = flag_cells(obs, s, n_vars=300)
    assert flags["min_genes"].tolist() == [True, False, False, False]
    assert thr["min_genes_used"] == 30


def test_mt_classes_by_marker_share():
    """A cluster of cells rich in the class's markers is in the class; absent markers match none."""
    rng = np.random.default_rng(0)
    genes = ["Alb", "Apoa1", "Ptprc", "Cd3e", "mt-Co1"] + [f"g{i}" for i in range(40)]
    hep = rng.poisson(1.0, size=(60, len(genes)))
    hep[:, 0] += rng.poisson(30, 60)
    hep[:, 1] += rng.poisson(10, 60)
    imm = rng.poisson(1.0, size=(60, len(genes)))
    imm[:, 2] += rng.poisson(20, 60)
    imm[:, 3] += rng.poisson(10, 60)
    a = ad.AnnData(X=sp.csr_matrix(np.vstack([hep, imm]).astype(np.float32)),
                   var=pd.DataFrame(index=genes))
    a.var["mt"] = a.var_names.str.startswith("mt-")
    cls = MtClass("hepatocyte", ("Alb", "Apoa1", "Ttr"), 10.0, 3, 30, 50)
    for by in ("cluster", "cell"):
        classes, info = mt_classes_of(a, QCSettings(mt_classes=(cls,), mt_class_by=by))
        assert (classes[:60] == "hepatocyte").all() and (classes[60:] == "other").all(), by
        assert info["mt_hepatocyte_markers_found"] == 2
    absent = MtClass("hepatocyte", ("Ttr", "Apoc3"), 10.0, 3, 30, 50)
    classes, _ = mt_classes_of(a, QCSettings(mt_classes=(absent,)))
    assert (classes == "other").all()


def test_settings_from_config_and_sheet_overrides():
    s = QCSettings.from_config(DEFAULT_QC, {"qc_n_mads": "4", "qc_max_pct_mt": "40.5"}, seed=3)
    assert (s.n_mads, s.n_mads_mt, s.max_pct_mt, s.seed) == (4.0, 3, 40.5, 3)
    assert s.min_pct_mt == DEFAULT_QC["min_pct_mt"] and s.remove_doublets
    assert QCSettings.from_config(DEFAULT_QC, {"qc_n_mads_mt": ""}).n_mads_mt == 3
    with pytest.raises(ValueError, match="qc_n_mads_mt"):
        QCSettings.from_config(DEFAULT_QC, {"qc_n_mads_mt": "many"})


@pytest.mark.parametrize(("species", "hits", "misses"), [
    ("mouse", {"mt": ["mt-Co1", "mt-Nd4l"], "ribo": ["Rpl13a", "Rps4x", "Rplp0", "Rpsa", "Rpl22l1"],
               "hb": ["Hba-a1", "Hbb-bs", "Hbb-bt", "Hbq1a"]},
     ["Hbegf", "Hbp1", "Hbs1l", "Rps6ka1", "Rpl13-ps3", "Mtor", "Actb"]),
    ("human", {"mt": ["MT-CO1", "MT-ND4L"], "ribo": ["RPL13A", "RPS4X", "RPS4Y1", "RPLP0", "RPSA"],
               "hb": ["HBA1", "HBA2", "HBB", "HBD", "HBG2", "HBZ", "HBM", "HBQ1", "HBE1"]},
     ["HBEGF", "HBP1", "HBS1L", "RPS6KA1", "MTOR", "MTRNR2L8", "ACTB"]),
])
def test_gene_groups(species, hits, misses):
    names = [g for group in hits.values() for g in group] + misses
    a = ad.AnnData(X=sp.csr_matrix((1, len(names))), var=pd.DataFrame(index=names))
    counts = annotate_gene_groups(a, species)
    for group, genes in hits.items():
        assert sorted(a.var_names[a.var[group]]) == sorted(genes), group
        assert counts[group] == len(genes)
    assert not a.var.loc[misses, ["mt", "ribo", "hb"]].to_numpy().any()


# --- the demo study with its planted defects -------------------------------------------------

@pytest.fixture(scope="module")
def demo_qc(tmp_path_factory):
    """The full-size default demo study (seed 0), ingested and QC'd with the default config."""
    from conftest import REPO, demo_params
    from livermsc.simulate import simulate_study

    out = tmp_path_factory.mktemp("demo_full")
    params = validate(demo_params(), "simulate", "demo.yaml")
    simulate_study(params, "mouse", REPO / "config" / "signatures.yaml", out, seed=0)
    sheet = pd.read_csv(out / "samples.tsv", sep="\t")
    kept, rows, annotated = [], [], []
    for row in sheet.to_dict("records"):
        raw = ingest_sample(sample_path(out, row, True), row, study="demo", species="mouse")
        settings = QCSettings.from_config(DEFAULT_QC, row, seed=0)
        ann, k, table_row = run_qc(raw, settings, species="mouse")
        kept.append(k)
        rows.append(table_row)
        annotated.append(ann.obs)
    cells = pd.read_csv(out / "cells.tsv.gz", sep="\t")
    cells.index = cells["sample"] + ":" + cells["barcode"]
    return {"cells": cells, "kept": kept, "rows": pd.DataFrame(rows),
            "annotated": pd.concat(annotated)}


def test_qc_removes_planted_defects_and_keeps_good_cells(demo_qc):
    cells = demo_qc["cells"]
    kept = cells.index.isin(np.concatenate([k.obs_names for k in demo_qc["kept"]]))
    lq, db = cells["is_low_quality"].to_numpy(), cells["is_doublet"].to_numpy()
    good = ~lq & ~db
    assert 1 - kept[lq].mean() >= 0.90
    assert 1 - kept[db].mean() >= 0.60
    assert kept[good].mean() >= 0.95
    # every cell type keeps >= 90% of its good cells (no type is lost to QC)
    by_type = pd.Series(kept[good]).groupby(cells["cell_type"].to_numpy()[good]).mean()
    assert by_type.min() >= 0.90, by_type.to_dict()


def test_qc_table_counts_add_up(demo_qc):
    t = demo_qc["rows"]
    assert (t["n_cells_in"] - t["n_removed"] == t["n_cells_out"]).all()
    fails = t[[f"n_fail_{r}" for r in REASONS if r != "doublet"] + ["n_removed_doublets"]]
    assert (fails.sum(axis=1) >= t["n_removed"]).all()  # a cell can fail several reasons
    assert (fails.max(axis=1) <= t["n_removed"]).all()
    ann = demo_qc["annotated"]
    for sample, obs in ann.groupby("sample", observed=True):
        row = t.set_index("sample").loc[sample]
        for r in REASONS:
            col = "n_removed_doublets" if r == "doublet" else f"n_fail_{r}"
            assert obs[f"qc_fail_{r}"].sum() == row[col]
        assert (~obs["qc_pass"]).sum() == row["n_removed"]
    assert (t["doublet_threshold_source"] == "scrublet_auto").all()
    assert (t["n_mt_genes"] == 13).all() and (t["n_hb_genes"] == 4).all()


def test_qc_output_holds_counts_and_metrics(demo_qc):
    k = demo_qc["kept"][0]
    counts = k.layers["counts"]
    assert k.X is None  # the counts are stored once, in layers["counts"]
    assert isinstance(counts, sp.csr_matrix)
    assert np.all(counts.data == np.round(counts.data))
    for col in ("total_counts", "n_genes_by_counts", "pct_counts_mt", "pct_counts_ribo",
                "pct_counts_hb", "pct_counts_in_top_20_genes", "doublet_score",
                "predicted_doublet", "sample", "arm", "animal", "batch"):
        assert col in k.obs, col
    assert not k.obs["predicted_doublet"].any()
    assert k.obs["doublet_score"].notna().all()
    assert k.obs["pct_counts_mt"].max() <= k.uns["qc"]["mt_threshold"]
    assert k.n_vars == demo_qc["rows"]["n_genes_in"].iloc[0]  # min_cells 0 keeps every gene


def test_doublets_annotated_not_removed_and_gene_filter(sim_study):
    folder, _ = sim_study
    row = pd.read_csv(folder / "samples.tsv", sep="\t").iloc[0].to_dict()
    raw = ingest_sample(sample_path(folder, row, True), row, study="sim", species="mouse")
    qc = dict(DEFAULT_QC, min_cells=3, doublets=dict(DEFAULT_QC["doublets"], remove=False))
    settings = QCSettings.from_config(qc, row, seed=0)
    _, kept, table = run_qc(raw, settings, species="mouse")
    assert table["n_removed_doublets"] == 0
    assert table["n_predicted_doublets"] == int(kept.obs["predicted_doublet"].sum()) > 0
    n_cells = np.asarray((kept.layers["counts"] > 0).sum(axis=0)).ravel()
    assert n_cells.min() >= 3 and kept.n_vars == table["n_genes_out"] < table["n_genes_in"]
    # the same seed gives the same scores
    _, again, _ = run_qc(raw, settings, species="mouse")
    assert np.array_equal(again.obs["doublet_score"], kept.obs["doublet_score"])


@pytest.mark.realdata
def test_qc_on_real_human_cells(shared_data):
    path = shared_data / "celltypist_sample_counts" / "celltypist_sample_cell_by_gene.h5ad"
    row = {"sample": "immune", "arm": "healthy", "path": path.name, "format": "h5ad"}
    raw = ingest_sample(path, row, study="real", species="human")
    ann, _, table = run_qc(raw, QCSettings.from_config(DEFAULT_QC, seed=0), species="human")
    assert table["n_mt_genes"] >= 13 and table["n_ribo_genes"] > 80 and table["n_hb_genes"] >= 8
    assert 0 < ann.obs["pct_counts_mt"].median() < 15
    assert ann.obs["pct_counts_ribo"].median() > 3  # 8.2%, as RPS/RPL prefixes give
    assert table["doublet_threshold_source"] in ("scrublet_auto", "fallback")
    # real immune cells that passed upstream filtering: most survive
    assert 0.7 * table["n_cells_in"] <= table["n_cells_out"] < table["n_cells_in"]


@pytest.mark.realdata
def test_mt_qc_keeps_real_hepatocytes(shared_data):
    """Droin 2021, every real hepatocyte of 4 of the 10 mice (ZT12A, the worst case, and the
    three largest of the other arms; Scrublet off for speed): the default per-class rule classes
    every cell as hepatocyte and removes few of any mouse for mitochondria, where one 25% cap
    for all cells removed 47% of ZT12A's."""
    full = ad.read_h5ad(shared_data / "droin2021_liver_circadian"
                        / "droin2021_liver_hepatocytes_circadian.h5ad")
    settings = QCSettings.from_config(
        {**DEFAULT_QC, "doublets": {**DEFAULT_QC["doublets"], "detect": False}}, species="mouse")
    one_cap = QCSettings(**{**settings.__dict__, "mt_classes": ()})
    removed = {}
    for mouse in ("ZT12A", "ZT00B", "ZT06A", "ZT18B"):
        a = full[full.obs["sample"] == mouse].copy()
        a.obs = pd.DataFrame({"sample": mouse, "study": "droin"}, index=a.obs_names)
        _, _, row = run_qc(a, settings, species="mouse")
        assert row["n_class_hepatocyte"] == row["n_cells_in"], mouse
        removed[mouse] = row["n_fail_mt_hepatocyte"] / row["n_cells_in"]
        if mouse == "ZT12A":
            ann_cap, _, _ = run_qc(a, one_cap, species="mouse")
            old = (ann_cap.obs["qc_fail_mt_mad"] | ann_cap.obs["qc_fail_mt_cap"]).mean()
            assert old > 0.4  # the failure this rule fixes
    print("\nmt removal per mouse (per-class rule):", {k: round(v, 3) for k, v in removed.items()})
    assert max(removed.values()) <= 0.06
    assert removed["ZT12A"] <= 0.01


def test_snakemake_entries_write_outputs(sim_study, tmp_path):
    folder, _ = sim_study
    sheet = pd.read_csv(folder / "samples.tsv", sep="\t")
    tables = []
    for row in sheet.head(2).to_dict("records"):
        raw_path = tmp_path / "raw" / f"{row['sample']}.h5ad"
        raw_path.parent.mkdir(exist_ok=True)
        from livermsc.ingest import rule_ingest as ingest_entry

        ingest_entry(SimpleNamespace(
            input=SimpleNamespace(data=str(folder)), output=SimpleNamespace(h5ad=str(raw_path)),
            params=SimpleNamespace(sample_row={k: str(v) for k, v in row.items()},
                                   species="mouse", simulated=True, combined=None),
            wildcards=SimpleNamespace(study="sim", sample=row["sample"])))
        out = tmp_path / "qc"
        fig = out / "figures" / f"{row['sample']}.png"
        smk = SimpleNamespace(
            input=SimpleNamespace(h5ad=str(raw_path)),
            output=SimpleNamespace(h5ad=str(out / f"{row['sample']}.h5ad"),
                                   table=str(out / "tables" / f"{row['sample']}.tsv"),
                                   figures=[str(fig)]),
            params=SimpleNamespace(qc=DEFAULT_QC, overrides={"qc_max_pct_mt": "20"},
                                   species="mouse", seed=0, formats=["png"], dpi=150),
            wildcards=SimpleNamespace(study="sim", sample=row["sample"]))
        Path(smk.output.table).parent.mkdir(parents=True, exist_ok=True)
        rule_qc(smk)
        assert fig.stat().st_size > 10_000
        tables.append(smk.output.table)
        kept = ad.read_h5ad(smk.output.h5ad)
        assert kept.X is None and "counts" in kept.layers  # the counts stored once
        assert kept.uns["qc"]["max_pct_mt"] == 20.0
        assert set(kept.obs["sample"]) == {row["sample"]}
    summary = tmp_path / "qc" / "qc_summary.tsv"
    rule_qc_summary(SimpleNamespace(input=SimpleNamespace(tables=tables),
                                      output=SimpleNamespace(tsv=str(summary))))
    t = pd.read_csv(summary, sep="\t")
    assert t["sample"].tolist() == sheet["sample"].head(2).tolist()
    assert {"n_cells_in", "n_fail_mt_mad", "n_removed", "n_cells_out", "mt_threshold",
            "counts_low", "doublet_threshold"} <= set(t.columns)

"""Scoring: coverage, pseudobulk, shares and sample-level scores (known answers, simulated truth)."""

from __future__ import annotations

import math

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from livermsc import geneset
from livermsc.catalogue import load_signatures
from livermsc.config import ConfigError
from livermsc.score import (
    SCORE_COLUMNS,
    cell_shares,
    default_share_pairs,
    edger_log_cpm,
    pseudobulk,
    pseudobulk_scores,
    score_study,
    signature_coverage,
    write_gmt,
)


def tiny_adata() -> ad.AnnData:
    """2 samples x 2 cell types, 4 genes, integer counts."""
    X = np.array([[1, 0, 3, 0],   # s1 hep
                  [2, 1, 0, 1],   # s1 hep
                  [0, 4, 0, 0],   # s1 hsc
                  [5, 0, 0, 5],   # s2 hep
                  [0, 2, 2, 0],   # s2 hsc
                  [0, 2, 0, 0]])  # s2 hsc
    obs = pd.DataFrame({"sample": ["s1", "s1", "s1", "s2", "s2", "s2"],
                        "arm": ["a", "a", "a", "b", "b", "b"],
                        "cell_type": ["hep", "hep", "hsc", "hep", "hsc", "hsc"],
                        "cell_state": ["hep", "hep", "hsc_q", "hep", "hsc_a", "hsc_q"]},
                       index=[f"c{i}" for i in range(6)])
    a = ad.AnnData(X=sp.csr_matrix(X.astype(np.float32)), obs=obs,
                   var=pd.DataFrame(index=["G1", "G2", "G3", "G4"]))
    a.layers["counts"] = a.X.copy()
    return a


def test_load_signatures_picks_species_and_reports_bad_files(tmp_path):
    path = tmp_path / "sigs.yaml"
    path.write_text("signatures:\n  s1: {mouse: [Acta2, Col1a1], human: [ACTA2, COL1A1]}\n"
                    "  s2: {mouse: [Foxp3]}\n")
    assert load_signatures(path, "human") == {"s1": ["ACTA2", "COL1A1"], "s2": []}
    assert load_signatures(path, "mouse")["s2"] == ["Foxp3"]
    with pytest.raises(ConfigError, match="file not found"):
        load_signatures(tmp_path / "none.yaml", "mouse")
    path.write_text("signatures:\n  s1: {mouse: Acta2}\n")
    with pytest.raises(ConfigError, match=r"signatures\.s1\.mouse"):
        load_signatures(path, "mouse")
    path.write_text("genes: []\n")
    with pytest.raises(ConfigError, match="field 'signatures'"):
        load_signatures(path, "mouse")


def test_coverage_and_gmt(tmp_path):
    cov = signature_coverage({"a": ["G1", "G2", "X9"], "b": ["X1", "X2"]}, tiny_adata(),
                             min_genes=2)
    a = cov.set_index("signature").loc["a"]
    assert (a["n_genes"], a["n_found"], a["genes_missing"], bool(a["usable"])) == (3, 2, "X9", True)
    assert a["fraction"] == pytest.approx(2 / 3)
    assert not bool(cov.set_index("signature").loc["b", "usable"])
    gmt = write_gmt({"a": ["G1", "G2"]}, tmp_path / "x.gmt").read_text()
    assert gmt == "a\tlivermsc signature\tG1\tG2\n"


def test_pseudobulk_sums_counts_and_log_cpm():
    pb = pseudobulk(tiny_adata(), ["cell_type"])
    row = pb.obs.index.get_loc("s1|cell_type|hep")
    np.testing.assert_array_equal(pb.layers["counts"][row], [3, 1, 3, 1])
    assert pb.obs.iloc[row]["n_cells"] == 2
    np.testing.assert_allclose(pb.X[row], np.log2(np.array([3, 1, 3, 1]) / 8 * 1e6 + 1),
                               rtol=1e-6)
    all_s2 = pb.obs.index.get_loc("s2|all|all")
    np.testing.assert_array_equal(pb.layers["counts"][all_s2], [5, 4, 2, 5])
    assert set(pb.obs["population_level"]) == {"all", "cell_type"}


def test_pseudobulk_z_is_mean_of_gene_z_scores():
    pb = pseudobulk(tiny_adata(), ["cell_type"])
    out, cov = pseudobulk_scores(pb, {"s": ["G1", "G3"]}, ["pseudobulk_z", "pseudobulk_mean"],
                                 min_cells=1, min_genes=1, min_count=0, min_total_count=0)
    out = out.set_index(["pb", "method"])["value"]
    hep = pb[pb.obs["population"] == "hep"]
    y = np.asarray(hep[:, ["G1", "G3"]].layers["counts"], float)
    counts = np.asarray(hep.layers["counts"], float)
    lib = counts.sum(axis=1) * geneset.tmm_factors(pd.DataFrame(counts.T)).to_numpy()
    prior = 2 * lib / lib.mean()                      # edgeR's prior count, scaled by library
    x = np.log2((y + prior[:, None]) / (lib + 2 * prior)[:, None] * 1e6)
    z = (x - x.mean(axis=0)) / x.std(axis=0, ddof=1)
    for i, name in enumerate(hep.obs_names):
        assert out[(name, "pseudobulk_z")] == pytest.approx(z[i].mean(), abs=1e-6)
        assert out[(name, "pseudobulk_mean")] == pytest.approx(x[i].mean(), rel=1e-6)
    row = cov.set_index(["signature", "population"]).loc[("s", "hep")]
    assert (row["n_samples"], row["n_genes_used"], row["genes_used"]) == (2, 2, "G1,G3")
    # below min_cells: no value
    out2, _ = pseudobulk_scores(pb, {"s": ["G1", "G3"]}, ["pseudobulk_mean"], min_cells=2,
                                min_genes=1, min_count=0, min_total_count=0)
    out2 = out2.set_index("pb")["value"]
    assert math.isnan(out2["s2|cell_type|hep"]) and math.isnan(out2["s1|cell_type|hep"])


def test_edger_log_cpm_prior_scales_with_library():
    y = np.array([[0.0, 0.0], [10.0, 100.0]])
    out = edger_log_cpm(y, np.array([1e4, 1e5]))
    # zero counts: the same log-CPM floor whatever the library size
    assert out[0, 0] == pytest.approx(out[0, 1], abs=0.01)
    assert out[1, 0] == pytest.approx(out[1, 1], abs=1e-9)
    prior = 2 * np.array([1e4, 1e5]) / 5.5e4
    np.testing.assert_allclose(out[1], np.log2((y[1] + prior) / (np.array([1e4, 1e5])
                                                                  + 2 * prior) * 1e6))


def test_voom_scores_equal_the_signature_test_scores():
    """The voom method writes, per population, the score the signature test is built on."""
    rng = np.random.default_rng(0)
    n_genes, arms = 120, ["a"] * 3 + ["b"] * 3
    base = rng.lognormal(1.0, 1.2, n_genes)
    X, obs = [], []
    for s, arm in enumerate(arms):
        for _ in range(40):
            X.append(rng.poisson(base))
            obs.append({"sample": f"s{s}", "arm": arm, "cell_type": "hsc", "cell_state": "hsc"})
    a = ad.AnnData(X=sp.csr_matrix(np.array(X, np.float32)),
                   obs=pd.DataFrame(obs, index=[f"c{i}" for i in range(len(obs))]),
                   var=pd.DataFrame(index=[f"G{i}" for i in range(n_genes)]))
    a.layers["counts"] = a.X.copy()
    genes = [f"G{i}" for i in range(10)]
    res = score_study(a, {"sig": genes}, "x", {"methods": ["voom"], "min_cells": 10,
                                              "population_levels": ["cell_type"]})
    t = res.sample_scores
    voom = t[(t["method"] == "voom") & (t["population"] == "hsc")].set_index("sample")["value"]
    pb = res.pseudobulk[res.pseudobulk.obs["population"] == "hsc"]
    counts = pd.DataFrame(np.asarray(pb.layers["counts"]).T, index=pb.var_names,
                          columns=pb.obs["sample"].to_numpy())
    design = pd.DataFrame({"i": 1.0, "b": [0, 0, 0, 1, 1, 1.0]}, index=counts.columns)
    test = geneset.signature_test(counts, design, "b", genes, group=arms)
    np.testing.assert_allclose(voom.loc[counts.columns].to_numpy(), test.sample_scores, atol=1e-9)
    cov = res.population_coverage
    row = cov[(cov["population"] == "hsc") & (cov["signature"] == "sig")].iloc[0]
    assert row["n_genes_used"] == test.n_genes_used and row["n_found"] == 10
    assert row["genes_used"].split(",") == test.genes_used


def test_shares_count_population_over_parent():
    a = tiny_adata()
    pairs = default_share_pairs(a.obs, ["cell_type", "cell_state"])
    assert ("cell_state", "hsc_a", "cell_type", "hsc") in pairs
    assert ("cell_state", "hep", "cell_type", "hep") not in pairs  # state equal to its type
    shares = cell_shares(a.obs, pairs)

    def row(sample, pop, measure, level="cell_state"):
        sel = shares[(shares["sample"] == sample) & (shares["population"] == pop)
                     & (shares["measure"] == measure) & (shares["population_level"] == level)]
        assert len(sel) == 1
        return tuple(sel[["n_cells", "n_parent_cells", "value"]].iloc[0])

    assert row("s2", "hsc_q", "share_of:cell_type:hsc") == (1, 2, 0.5)
    assert row("s1", "hsc_a", "share_of:cell_type:hsc") == (0, 1, 0.0)
    assert row("s1", "hep", "share_of:all", "cell_type") == (2, 3, pytest.approx(2 / 3))


def test_score_study_rejects_bad_input():
    a = tiny_adata()
    del a.obs["arm"]
    with pytest.raises(ValueError, match=r"obs lacks column\(s\) \['arm'\]"):
        score_study(a, {"s": ["G1"]}, "x")
    a = tiny_adata()
    a.layers["counts"] = a.X * 0.5
    with pytest.raises(ValueError, match="raw integer counts"):
        score_study(a, {"s": ["G1"]}, "x")
    with pytest.raises(ConfigError, match=r"score\.methods"):
        score_study(tiny_adata(), {"s": ["G1"]}, "x", {"methods": ["nope"]})


@pytest.fixture(scope="module")
def scored(sim_adata, sim_study):
    _, truth = sim_study
    a = sim_adata[~(sim_adata.obs["is_doublet"] | sim_adata.obs["is_low_quality"]).to_numpy()]
    a = a.copy()
    signatures = dict(truth["signature_genes"])
    signatures["absent_set"] = ["Nosuchgene1", "Nosuchgene2", "Acta2"]
    return a, score_study(a, signatures, "sim", {"min_genes": 3, "min_cells": 10}, seed=0)


def test_score_study_outputs(scored):
    a, res = scored
    table = res.sample_scores
    assert list(table.columns) == SCORE_COLUMNS
    assert set(table["method"]) == {"voom", "pseudobulk_z", "pseudobulk_mean", "ssgsea",
                                    "score_genes", "ulm", "proportion"}
    assert set(table["measure_type"]) == {"signature", "share"}
    # one row per sample x population x measure x method
    key = ["sample", "population_level", "population", "measure", "method"]
    assert not table.duplicated(key).any()
    cov = res.coverage.set_index("signature")
    assert cov.loc["absent_set", "n_found"] == 1 and not cov.loc["absent_set", "usable"]
    assert "absent_set" not in set(table["measure"])
    assert cov.loc["hsc_activation", "fraction"] == 1.0
    # genes used per signature x population, after the expression filter
    pop = res.population_coverage.set_index(["signature", "population_level", "population"])
    hsc = pop.loc[("hsc_activation", "cell_type", "hsc")]
    assert 3 <= hsc["n_genes_used"] <= hsc["n_found"] == 14 and bool(hsc["usable"])
    assert len(hsc["genes_used"].split(",")) == hsc["n_genes_used"]
    # per-cell scores in obs and in the cell table, one row per cell
    assert "score_genes:hsc_activation" in a.obs and "ulm:m1_macrophage" in a.obs
    assert len(res.cell_scores) == a.n_obs
    assert res.pseudobulk.layers["counts"].sum() == pytest.approx(a.X.sum() * 3)  # all + 2 levels
    shares = table[(table["measure_type"] == "share")]
    assert (shares["value"].between(0, 1) | shares["value"].isna()).all()
    # sample-level signature scores exist only for samples with at least min_cells cells
    sig = table[table["measure_type"] == "signature"]
    assert sig.loc[sig["n_cells"] < 10, "value"].isna().all()
    cell_based = sig["method"].isin(["ssgsea", "score_genes", "ulm"])
    assert sig.loc[cell_based & (sig["n_cells"] >= 10), "value"].notna().mean() > 0.99
    # pseudobulk methods: a value exactly where the population keeps min_genes genes
    usable = res.population_coverage.set_index(["signature", "population_level",
                                                "population"])["usable"]
    pbm = sig[~cell_based & (sig["n_cells"] >= 10)]
    expect = usable.reindex(pd.MultiIndex.from_frame(
        pbm[["measure", "population_level", "population"]])).to_numpy(dtype=bool)
    np.testing.assert_array_equal(pbm["value"].notna().to_numpy(), expect)


def test_planted_programme_effect_in_sample_scores(scored):
    """HSC activation in HSCs: injury above healthy and MSC below injury, for every method."""
    _, res = scored
    t = res.sample_scores
    sel = t[(t["population"] == "hsc") & (t["population_level"] == "cell_type")
            & (t["measure"] == "hsc_activation")]
    means = sel.groupby(["method", "arm"])["value"].mean().unstack()
    assert (means["injury"] > means["healthy"]).all()
    assert (means["injury_msc"] < means["injury"]).all()


def test_human_symbols_for_human_study():
    a = tiny_adata()
    a.var_names = ["ACTA2", "COL1A1", "G3", "G4"]
    sigs = {"act": ["ACTA2", "COL1A1", "G3"]}
    res = score_study(a, sigs, "h", {"min_genes": 2, "min_cells": 1,
                                     "methods": ["pseudobulk_mean"]})
    assert res.coverage.loc[0, "n_found"] == 3
    assert set(res.sample_scores.loc[res.sample_scores["measure_type"] == "signature",
                                     "measure"]) == {"act"}

"""Verdicts on claims: planted truth, inconclusive reasons, a real paired design, meta-analysis."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import PLANTED_SIGNATURES
from livermsc.claims import (
    CLAIM_COLUMNS,
    META_COLUMNS,
    check_config,
    evaluate_study,
    load_catalogue,
    meta_analysis,
    snakemake_entry,
    snakemake_meta_entry,
    summary_markdown,
)
from livermsc.config import ConfigError
from livermsc.stats import dersimonian_laird
from scipy import stats as sps


def _claim(cid, level, value, measure, contrasts, direction, kind="claim"):
    return {"id": cid, "kind": kind, "statement": f"test claim {cid}",
            "population": {"level": level, "value": value}, "measure": measure,
            "contrasts": [dict(zip(("arm", "reference"), c, strict=True)) for c in contrasts],
            "direction": direction}


def sig(name):
    return {"type": "signature", "signature": name}


def share(level, value):
    return {"type": "share", "parent": {"level": level, "value": value}}


#: the demo's planted effects as claims, and the verdict the truth implies
DEMO_CLAIMS = [
    (_claim("injury_hsc_activation", "cell_type", "hsc", sig("hsc_activation"),
            [("injury", "healthy")], "up", "control"), ["supported"]),
    (_claim("injury_m1", "cell_type", "macrophage", sig("m1_macrophage"),
            [("injury", "healthy")], "up", "control"), ["supported"]),
    (_claim("injury_momac_share", "cell_state", "momac", share("cell_type", "macrophage"),
            [("injury", "healthy")], "up", "control"), ["supported"]),
    (_claim("msc_hsc_activation", "cell_type", "hsc", sig("hsc_activation"),
            [("injury_msc", "injury"), ("injury_ev", "injury")], "down"),
     ["supported", "supported"]),
    (_claim("msc_m1", "cell_type", "macrophage", sig("m1_macrophage"),
            [("injury_msc", "injury")], "down"), ["supported"]),
    (_claim("msc_m2", "cell_type", "macrophage", sig("m2_macrophage"),
            [("injury_msc", "injury")], "up"), ["supported"]),
    (_claim("msc_treg_share", "cell_state", "treg", share("cell_type", "cd4_t"),
            [("injury_msc", "injury")], "up"), ["supported"]),
    # the claim predicts more proliferation; the simulator plants less
    (_claim("msc_hepatocyte_proliferation", "cell_type", "hepatocyte",
            sig("hepatocyte_proliferation"), [("injury_msc", "injury")], "up"), ["contradicted"]),
    # planted nulls
    (_claim("msc_dc_maturation", "cell_type", "dendritic_cell", sig("dc_maturation"),
            [("injury_msc", "injury")], "down"), ["inconclusive"]),
    (_claim("msc_angiogenesis", "cell_type", "lsec", sig("angiogenesis"),
            [("injury_msc", "injury")], "up"), ["inconclusive"]),
]


@pytest.fixture(scope="module")
def demo_catalogue() -> dict:
    return {"claims": [c for c, _ in DEMO_CLAIMS]}


@pytest.fixture(scope="module")
def demo_scored(demo_catalogue):
    """The demo design simulated in memory (10,000 cells, seed 7), truth labels, scored.

    The share effects (4 and 5 SD of the logit share) are near the limit of 3 vs 3 animals: at
    some seeds they are missed (see `livermsc calibrate` for their power); seed 7 finds all.
    """
    from conftest import demo_params
    from livermsc.calibrate import simulate_adata, truth_qc
    from livermsc.config import validate
    from livermsc.score import catalogue_share_pairs, score_study

    params = validate(demo_params(n_cells=10000), "simulate", "demo.yaml")
    adata = truth_qc(simulate_adata(params, PLANTED_SIGNATURES, seed=7))
    res = score_study(adata, PLANTED_SIGNATURES, "demo", {},
                      share_pairs=catalogue_share_pairs(demo_catalogue), seed=0)
    return res


@pytest.fixture(scope="module")
def demo_verdicts(demo_scored, demo_catalogue):
    return evaluate_study(demo_scored.sample_scores, demo_scored.coverage, demo_catalogue, "demo")


def test_planted_truth_gives_expected_verdicts(demo_verdicts):
    table, methods = demo_verdicts
    assert list(table.columns) == CLAIM_COLUMNS
    expected = {}
    for claim, verdicts in DEMO_CLAIMS:
        for contrast, verdict in zip(claim["contrasts"], verdicts, strict=True):
            expected[(claim["id"], f"{contrast['arm']} vs {contrast['reference']}")] = verdict
    got = dict(zip(zip(table["claim_id"], table["contrast"], strict=True), table["verdict"],
                   strict=True))
    assert got == expected
    nulls = table[table["verdict"] == "inconclusive"]
    assert nulls["reason"].str.startswith("not significant").all()
    assert nulls["reason"].str.contains("minimum detectable").all()
    supported = table[table["verdict"] == "supported"]
    assert ((supported["effect"] > 0) == (supported["direction"] == "up")).all()
    assert (supported["q_value"] < 0.05).all() and not table["paired"].any()
    # shares are tested on the logit scale, signatures with the verdict method
    assert set(table.loc[table["measure_type"] == "share", "method"]) == {"proportion"}
    assert table.loc[table["measure_type"] == "share", "test"].str.contains("logit share").all()
    assert set(table.loc[table["measure_type"] == "signature", "method"]) == {"pseudobulk_z"}
    # the sensitivity table holds every method; programme effects agree across them
    assert set(methods["method"]) >= {"pseudobulk_z", "ssgsea", "score_genes", "ulm"}
    strong = methods[methods["claim_id"].isin(["injury_hsc_activation", "msc_m2"])]
    assert (strong["verdict"] == "supported").all()


def test_bh_families_separate_claims_and_controls(demo_verdicts):
    from livermsc.stats import bh

    table, _ = demo_verdicts
    for kind in ("claim", "control"):
        sub = table[table["kind"] == kind]
        np.testing.assert_allclose(sub["q_value"], bh(sub["p_value"]))


def _evaluate(scores, coverage, claims, **settings):
    table, _ = evaluate_study(scores, coverage, {"claims": claims}, "demo", settings)
    return table.set_index("claim_id")


def test_inconclusive_reasons_without_crash(demo_scored):
    scores, coverage = demo_scored.sample_scores, demo_scored.coverage
    # one sample left in injury_ev
    one = scores[~scores["sample"].isin(["injury_ev_2", "injury_ev_3"])]
    claims = [
        _claim("absent_pop", "cell_type", "stellate_x", sig("hsc_activation"),
               [("injury", "healthy")], "up"),
        _claim("absent_arm", "cell_type", "hsc", sig("hsc_activation"),
               [("injury_msc_ev", "injury")], "down"),
        _claim("one_sample", "cell_type", "hsc", sig("hsc_activation"),
               [("injury_ev", "injury")], "down"),
        _claim("absent_share", "cell_state", "kupffer_x", share("cell_type", "macrophage"),
               [("injury", "healthy")], "up"),
    ]
    t = _evaluate(one, coverage, claims)
    assert (t["verdict"] == "inconclusive").all()
    assert t.loc["absent_pop", "reason"] == "population cell_type 'stellate_x' absent in study"
    assert t.loc["absent_arm", "reason"].startswith("arm 'injury_msc_ev' absent in study")
    assert t.loc["one_sample", "reason"] == (
        "too few samples per arm: 1 injury_ev vs 3 injury animals (min 3)")
    assert t.loc["one_sample", "n_arm"] == 1 and math.isnan(t.loc["one_sample", "p_value"])
    assert "absent in study" in t.loc["absent_share", "reason"]
    # a population too small in some samples, and a signature mostly missing
    cov = coverage.copy()
    cov.loc[cov["signature"] == "m2_macrophage", "n_found"] = 2
    claims = [_claim("small", "cell_state", "treg", sig("treg_identity"),
                     [("injury_msc", "injury")], "up"),
              _claim("coverage", "cell_type", "macrophage", sig("m2_macrophage"),
                     [("injury_msc", "injury")], "up")]
    t = _evaluate(scores, cov, claims)
    assert t.loc["small", "reason"].startswith("population treg too small: fewer than 10 cells")
    assert t.loc["coverage", "reason"] == (
        "signature coverage too low: 2 of 12 genes of 'm2_macrophage' found (min_genes 3)")


def test_stage_restricts_samples(demo_scored):
    scores = demo_scored.sample_scores.copy()
    scores["stage"] = np.where(scores["sample"].str.endswith("_3"), "late", "early")
    claims = [_claim("staged", "cell_type", "hsc", sig("hsc_activation"),
                     [("injury", "healthy")], "up"),
              _claim("no_stage", "cell_type", "hsc", sig("hsc_activation"),
                     [("injury", "healthy")], "up")]
    claims[0]["contrasts"][0]["stage"] = "early"
    claims[1]["contrasts"][0]["stage"] = "week9"
    t = _evaluate(scores, demo_scored.coverage, claims, min_samples_per_arm=2)
    assert t.loc["staged", "n_arm"] == 2 and t.loc["staged", "stage"] == "early"
    assert t.loc["staged", "contrast"] == "injury vs healthy (early)"
    assert t.loc["no_stage", "reason"].startswith("no 'injury' samples at stage 'week9'")


def test_summary_leads_with_verdict_table(demo_verdicts):
    table, methods = demo_verdicts
    text = summary_markdown(table, methods, "demo", {})
    lines = text.splitlines()
    assert lines[0] == "# Claims tested in study `demo`"
    assert lines[2].startswith("| claim | kind | contrast |")
    assert "## Sensitivity: verdict by scoring method" in text


def test_meta_analysis_two_studies_and_one(demo_verdicts, tmp_path):
    table, _ = demo_verdicts
    other = table.copy()
    other["study"] = "other"
    other["hedges_g"] = table["hedges_g"] * 0.5
    other["ci_low"], other["ci_high"] = other["hedges_g"] - 1.0, other["hedges_g"] + 1.0
    meta = meta_analysis([table, other])
    assert list(meta.columns) == META_COLUMNS
    row = meta.set_index(["claim_id", "contrast"]).loc[("msc_m2", "injury_msc vs injury")]
    one = table.set_index("claim_id").loc["msc_m2"]
    se1 = (one["ci_high"] - one["ci_low"]) / (2 * 1.959963984540054)
    ref = dersimonian_laird([one["hedges_g"], one["hedges_g"] * 0.5], [se1 ** 2, 0.5102 ** 2])
    assert row["k"] == 2 and row["studies"] == "demo,other"
    assert row["hedges_g"] == pytest.approx(ref.estimate, rel=1e-3)
    assert row["tau2"] == pytest.approx(ref.tau2, rel=1e-2, abs=1e-4)
    single = meta_analysis([table]).set_index("claim_id")
    assert (single["k"] == 1).all() and single["i2"].isna().all()
    assert single.loc["msc_m2", "hedges_g"] == pytest.approx(one["hedges_g"])
    assert single.loc["msc_m2", "verdict"] == "supported"


def test_catalogue_and_config_errors(tmp_path):
    bad = tmp_path / "claims.yaml"
    bad.write_text(yaml.safe_dump({"claims": [_claim("x", "cell_type", "hsc", sig("nope"),
                                                     [("a", "b")], "up")]}))
    with pytest.raises(ConfigError, match=r"claims\[0\]\.measure\.signature.*'nope' of claim 'x'"):
        load_catalogue(bad, ["hsc_activation"])
    bad.write_text(yaml.safe_dump({"claims": [{"id": "x"}]}))
    with pytest.raises(ConfigError, match=r"claims\.yaml"):
        load_catalogue(bad)
    with pytest.raises(ConfigError, match=r"claims\.method"):
        check_config({"score": {"methods": ["ssgsea"]}, "claims": {"method": "pseudobulk_z"}})


# --- a user's own claim on real data: 5 patients x DMSO / panobinostat -----------------------

USER_SIGNATURES = """
signatures:
  inflammatory_cytokines:
    description: Pro-inflammatory cytokine and chemokine genes of activated myeloid cells.
    source: >-
      Leoni et al. 2002 PNAS 99:2995 (the HDAC inhibitor SAHA suppresses IL-1beta, TNF-alpha,
      IL-6 and IFN-gamma production); chemokine selection ours.
    human: [IL1B, CCL2, CCL3, CCL4, CXCL2, CXCL8, NFKBIA]
    mouse: [Il1b, Ccl2, Ccl3, Ccl4, Cxcl2, Cxcl1, Nfkbia]
"""

USER_CLAIMS = """
claims:
  - id: hdaci_lowers_inflammatory_cytokines
    statement: Pan-HDAC inhibition lowers pro-inflammatory cytokine expression in tumour explants.
    population: {level: cell_type, value: explant}
    measure: {type: signature, signature: inflammatory_cytokines}
    contrasts: [{arm: panobinostat, reference: ctrl}]
    direction: down
"""


@pytest.mark.realdata
def test_user_claim_on_real_paired_design(shared_data, tmp_path):
    import anndata as ad
    from livermsc.score import load_signatures, score_study

    path = shared_data / "glioblastoma_panobinostat_lemur" / "glioblastoma_panobinostat_lemur.h5ad"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    (tmp_path / "sigs.yaml").write_text(USER_SIGNATURES)
    (tmp_path / "claims.yaml").write_text(USER_CLAIMS)
    signatures = load_signatures(tmp_path / "sigs.yaml", "human")
    catalogue = load_catalogue(tmp_path / "claims.yaml", signatures)
    raw = ad.read_h5ad(path)
    adata = ad.AnnData(X=raw.X.copy(), var=pd.DataFrame(index=raw.var["symbol"].astype(str)))
    adata.var_names_make_unique()
    adata.obs = pd.DataFrame({"sample": raw.obs["sample_id"].astype(str).to_numpy(),
                              "animal": raw.obs["patient_id"].astype(str).to_numpy(),
                              "arm": raw.obs["condition"].astype(str).to_numpy(),
                              "cell_type": "explant", "cell_state": "explant"},
                             index=[f"c{i}" for i in range(raw.n_obs)])
    adata.layers["counts"] = adata.X.copy()
    res = score_study(adata, signatures, "gbm", {"methods": ["pseudobulk_z", "score_genes"]})
    table, methods = evaluate_study(res.sample_scores, res.coverage, catalogue, "gbm")
    row = table.iloc[0]
    assert bool(row["paired"]) and row["n_arm"] == row["n_reference"] == 5
    assert row["test"].startswith("paired t-test")
    assert row["verdict"] in ("supported", "contradicted", "inconclusive") and row["reason"]
    assert set(methods["method"]) == {"pseudobulk_z", "score_genes"}
    # known answer: the same paired t-test computed here from summed counts
    genes = signatures["inflammatory_cytokines"]
    counts = pd.DataFrame(np.asarray(adata.X.todense() if hasattr(adata.X, "todense")
                                     else adata.X), columns=adata.var_names)
    summed = counts.groupby(adata.obs["sample"].to_numpy()).sum()
    logcpm = np.log2(summed.div(summed.sum(axis=1), axis=0) * 1e6 + 1)[genes]
    score = ((logcpm - logcpm.mean()) / logcpm.std(ddof=1)).mean(axis=1)
    info = adata.obs.drop_duplicates("sample").set_index("sample")
    wide = pd.DataFrame({"arm": info["arm"], "patient": info["animal"], "score": score})
    wide = wide.pivot(index="patient", columns="arm", values="score")
    ref = sps.ttest_rel(wide["panobinostat"], wide["ctrl"])
    assert row["p_value"] == pytest.approx(ref.pvalue, rel=1e-4)
    assert row["effect"] == pytest.approx((wide["panobinostat"] - wide["ctrl"]).mean(), rel=1e-4)


# --- the rule entry points on the shared simulated fixture ---------------------------------------

def test_rule_entry_points(sim_adata, tmp_path, demo_catalogue):
    from livermsc.score import snakemake_entry as score_entry

    a = sim_adata[~(sim_adata.obs["is_doublet"] | sim_adata.obs["is_low_quality"]).to_numpy()]
    a = a.copy()
    a.obs = a.obs[["sample", "arm", "animal", "batch", "study", "cell_type", "cell_state"]]
    a.write_h5ad(tmp_path / "annotated.h5ad")
    sigs = tmp_path / "sigs.yaml"
    sigs.write_text(yaml.safe_dump({"signatures": {k: {"mouse": v, "human": [g.upper() for g in v]}
                                                   for k, v in PLANTED_SIGNATURES.items()}}))
    cat = tmp_path / "claims.yaml"
    cat.write_text(yaml.safe_dump(demo_catalogue))
    out = tmp_path / "results" / "sim"
    score_cfg = {"methods": ["pseudobulk_z", "score_genes"]}
    score_entry(SimpleNamespace(
        input=_named(adata=str(tmp_path / "annotated.h5ad"), signatures=str(sigs),
                     catalogue=str(cat)),
        output=_named(scores=str(out / "scores/sample_scores.tsv"),
                      coverage=str(out / "scores/signature_coverage.tsv"),
                      pseudobulk=str(out / "scores/pseudobulk.h5ad"),
                      cells=str(out / "scores/cell_scores.tsv.gz"),
                      gmt=str(out / "scores/signatures.gmt")),
        params=SimpleNamespace(cfg=score_cfg, species="mouse", seed=0),
        wildcards=SimpleNamespace(study="sim"), threads=1))
    scores = pd.read_csv(out / "scores/sample_scores.tsv", sep="\t")
    assert {"signature", "share"} == set(scores["measure_type"])
    snakemake_entry(SimpleNamespace(
        input=_named(scores=str(out / "scores/sample_scores.tsv"),
                     coverage=str(out / "scores/signature_coverage.tsv"),
                     catalogue=str(cat), signatures=str(sigs)),
        output=_named(claims=str(out / "claims.tsv"), methods=str(out / "claims_methods.tsv"),
                      summary=str(out / "claims_summary.md")),
        params=SimpleNamespace(cfg={}, score_cfg=score_cfg, species="mouse"),
        wildcards=SimpleNamespace(study="sim")))
    claims = pd.read_csv(out / "claims.tsv", sep="\t")
    assert list(claims.columns) == CLAIM_COLUMNS
    verdict = claims.set_index("claim_id")["verdict"]
    assert verdict["injury_hsc_activation"] == "supported"
    assert verdict["msc_hepatocyte_proliferation"] == "contradicted"
    assert verdict["msc_angiogenesis"] == "inconclusive"
    snakemake_meta_entry(SimpleNamespace(
        input=_named(claims=[str(out / "claims.tsv")]),
        output=_named(meta=str(tmp_path / "results/claims_meta.tsv")),
        params=SimpleNamespace(cfg={})))
    meta = pd.read_csv(tmp_path / "results/claims_meta.tsv", sep="\t")
    assert set(meta["k"]) <= {0, 1} and meta["i2"].isna().all()
    untested = meta[meta["k"] == 0]
    assert (untested["reason"] == "no study could test this contrast").all()
    assert (untested["verdict"] == "inconclusive").all()


class _named(SimpleNamespace):
    """Attribute and ``get`` access, like Snakemake's named input/output lists."""

    def get(self, key, default=None):
        return getattr(self, key, default)

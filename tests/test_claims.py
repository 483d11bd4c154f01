"""Verdicts on claims: designs from the contrast's own animals, confounding, declared pairing,
shares as counts, difference contrasts, control gating, TOST, MDE at the BH alpha, meta-analysis."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import PLANTED_SIGNATURES
from livermsc import stats
from livermsc.annotate import signature_marker_overlap
from livermsc.catalogue import load_catalogue, load_signatures
from livermsc.claims import (
    CLAIM_COLUMNS,
    META_COLUMNS,
    check_config,
    evaluate_study,
    meta_analysis,
    rule_claims,
    rule_claims_meta,
    summary_markdown,
)
from livermsc.config import ConfigError
from scipy import stats as sps

METHOD = "pseudobulk_z"  # a per-animal score method (the engine's voom path needs counts)
SCORE_CFG = {"methods": [METHOD]}
GENES = [f"g{i}" for i in range(10)]
CELLTYPES = Path(__file__).resolve().parents[1] / "config" / "celltypes.yaml"


def _claim(cid, level, value, measure, contrasts, direction, kind="claim"):
    return {"id": cid, "kind": kind, "statement": f"test claim {cid}",
            "population": {"level": level, "value": value}, "measure": measure,
            "contrasts": [c if isinstance(c, dict) else
                          dict(zip(("arm", "reference"), c, strict=True)) for c in contrasts],
            "direction": direction}


def sig(name="sig_a"):
    return {"type": "signature", "signature": name}


def share(level="cell_type", value="cd4_t"):
    return {"type": "share", "parent": {"level": level, "value": value}}


def _scores(values: dict, batch=None, stage=None, animal=None, shares=None, n_cells=100):
    """A sample_scores-like table: ``values`` maps arm -> per-sample signature values of hsc;
    ``shares`` maps arm -> list of (state cells, parent cells) of treg in cd4_t."""
    rows = []
    for arm, vals in values.items():
        for i, v in enumerate(vals):
            s = f"{arm}_{i}"
            common = {"study": "x", "sample": s,
                      "animal": animal(arm, i) if animal else s, "arm": arm,
                      "batch": batch(arm, i) if batch else s,
                      "stage": stage(arm, i) if stage else ""}
            rows.append({**common, "population_level": "cell_type", "population": "hsc",
                         "measure_type": "signature", "measure": "sig_a", "method": METHOD,
                         "value": v, "n_cells": n_cells, "n_parent_cells": np.nan})
            if shares:
                n, big_n = shares[arm][i]
                rows.append({**common, "population_level": "cell_state", "population": "treg",
                             "measure_type": "share", "measure": "share_of:cell_type:cd4_t",
                             "method": "proportion", "value": n / big_n, "n_cells": n,
                             "n_parent_cells": big_n})
    return pd.DataFrame(rows)


COVERAGE = pd.DataFrame({"signature": ["sig_a"], "n_genes": [10], "n_found": [10],
                         "genes_found": [",".join(GENES)]})


def _evaluate(scores, claims, pairs=None, **settings):
    table, _ = evaluate_study(scores, COVERAGE, {"claims": claims}, "x",
                              {"method": METHOD, **settings}, SCORE_CFG, pairs=pairs)
    return table.set_index(["claim_id", "contrast"], drop=False)


def _one(table, claim_id):
    rows = table[table["claim_id"] == claim_id]
    assert len(rows) == 1
    return rows.iloc[0]


# --- one contrast, hand-computed -------------------------------------------------------------------

def test_simple_contrast_is_welch_on_the_two_arms_only():
    x, y = [2.0, 4.0, 7.0], [4.0, 5.0, 6.0, 9.0]
    # a quiet third arm must not change the test (variance from the contrast's own animals)
    scores = _scores({"t": x, "r": y, "o": [0.0, 0.01, 0.02]})
    t = _evaluate(scores, [_claim("c", "cell_type", "hsc", sig(), [("t", "r")], "down")])
    row = _one(t, "c")
    assert list(t.columns) == CLAIM_COLUMNS
    ref = sps.ttest_ind(x, y, equal_var=False)
    assert row["p_value"] == pytest.approx(ref.pvalue)
    assert row["effect"] == pytest.approx(np.mean(x) - np.mean(y))
    lo, hi = stats.t_ci(row["effect"], row["se"], row["df"])
    assert (row["effect_ci_low"], row["effect_ci_high"]) == pytest.approx((lo, hi))
    assert row["ci_low"] < row["hedges_g"] < row["ci_high"]
    assert (row["n_arm"], row["n_reference"]) == (3, 4) and not row["paired"]
    assert row["batch"] == "no batch recorded"
    # one family of one test: BH alpha is alpha; MDE in effect units at that alpha
    assert row["alpha_test"] == pytest.approx(0.05)
    assert row["mde"] == pytest.approx(stats.mde_effect(row["se"], row["df"], 0.05))
    assert row["verdict"] == "inconclusive" and "minimum detectable effect" in row["reason"]
    pooled = _one(_evaluate(scores, [_claim("c", "cell_type", "hsc", sig(), [("t", "r")],
                                            "down")], pool_arms=True), "c")
    assert "3 arms pooled" in pooled["test"]


def test_samples_of_one_animal_are_averaged():
    scores = _scores({"t": [1.0, 3.0, 2.0, 3.0], "r": [4.0, 5.0, 6.0]},
                     animal=lambda arm, i: f"{arm}{min(i, 2)}" if arm == "t" else f"{arm}{i}")
    # animal t2 has two samples (2 and 3) -> animal values 1, 3, 2.5
    row = _one(_evaluate(scores, [_claim("c", "cell_type", "hsc", sig(), [("t", "r")], "up")]),
               "c")
    assert row["n_arm"] == 3
    assert row["p_value"] == pytest.approx(sps.ttest_ind([1, 3, 2.5], [4, 5, 6],
                                                         equal_var=False).pvalue)


# --- confounding and batch --------------------------------------------------------------------------

def test_batch_confounded_with_arm_is_inconclusive_and_adjusted_otherwise():
    claims = [_claim("c", "cell_type", "hsc", sig(), [("t", "r")], "up")]
    vals = {"t": [3.0, 3.2, 2.9, 3.1], "r": [0.0, 0.1, -0.1, 0.05]}
    conf = _one(_evaluate(_scores(vals, batch=lambda arm, i: f"run_{arm}"), claims), "c")
    assert conf["verdict"] == "inconclusive" and conf["reason"] == "batch confounded with arm"
    assert conf["batch"] == "confounded with arm" and math.isnan(conf["p_value"])
    nested = _one(_evaluate(_scores(vals, batch=lambda arm, i: f"{arm}{i % 2}"), claims), "c")
    assert nested["reason"] == "batch confounded with arm"
    # balanced batches: adjusted; the batch shift of +10 does not leak into the effect
    bal = _scores({"t": [3.0, 13.2, 2.9, 13.1], "r": [0.0, 10.1, -0.1, 10.05]},
                  batch=lambda arm, i: f"b{i % 2}")
    row = _one(_evaluate(bal, claims), "c")
    assert row["batch"] == "adjusted" and row["verdict"] == "supported"
    assert row["effect"] == pytest.approx(3.04, abs=0.05)
    off = _one(_evaluate(bal, claims, adjust_batch=False), "c")
    assert off["p_value"] > row["p_value"]


# --- pairing: declared, never guessed -----------------------------------------------------------------

def test_pairing_only_when_declared():
    a, b = [2.0, 4.0, 6.0], [1.0, 2.0, 4.0]
    # animals numbered 0, 1, 2 within each arm: the same ids, unrelated animals
    scores = _scores({"t": a, "r": b}, animal=lambda arm, i: f"m{i}")
    claims = [_claim("c", "cell_type", "hsc", sig(), [("t", "r")], "up")]
    unpaired = _one(_evaluate(scores, claims), "c")
    assert not unpaired["paired"] and "no pairing is declared" in unpaired["notes"]
    assert unpaired["p_value"] == pytest.approx(sps.ttest_ind(a, b, equal_var=False).pvalue)
    pairs = {f"{arm}_{i}": f"donor{i}" for arm in ("t", "r") for i in range(3)}
    paired = _one(_evaluate(scores, claims, pairs=pairs, variance="pooled"), "c")
    assert paired["paired"] and paired["p_value"] == pytest.approx(sps.ttest_rel(a, b).pvalue)


def test_partial_pairing_leaves_out_singletons_or_tests_unpaired():
    a, b = [2.0, 4.0, 6.0, 5.0], [1.0, 2.0, 4.0, 9.0]
    scores = _scores({"t": a, "r": b})
    claims = [_claim("c", "cell_type", "hsc", sig(), [("t", "r")], "up")]
    pairs = {"t_0": "d0", "t_1": "d1", "t_2": "d2", "t_3": "d3",
             "r_0": "d0", "r_1": "d1", "r_2": "d2", "r_3": "d9"}
    row = _one(_evaluate(scores, claims, pairs=pairs, variance="pooled"), "c")
    assert row["paired"] and "left out of the paired test" in row["notes"]
    assert row["p_value"] == pytest.approx(sps.ttest_rel(a[:3], b[:3]).pvalue)
    few = {**pairs, "r_2": "d8"}
    row = _one(_evaluate(scores, claims, pairs=few), "c")
    assert not row["paired"] and "tested unpaired" in row["notes"]


# --- shares ------------------------------------------------------------------------------------------

def test_share_row_is_a_count_model_with_an_odds_ratio():
    shares = {"t": [(30, 200), (36, 220), (25, 180)], "r": [(10, 210), (12, 190), (9, 200)]}
    scores = _scores({"t": [0, 0, 0], "r": [0, 0, 0]}, shares=shares)
    row = _one(_evaluate(scores, [_claim("s", "cell_state", "treg", share(), [("t", "r")],
                                         "up")]), "s")
    n = np.array([30, 36, 25, 10, 12, 9], float)
    big = np.array([200, 220, 180, 210, 190, 200], float)
    d = stats.build_design(["t"] * 3 + ["r"] * 3, {"t": 1, "r": -1}, "r")
    fit = stats.quasibinomial_test(n, big, d)
    assert row["effect"] == pytest.approx(fit.estimate)
    assert row["odds_ratio"] == pytest.approx(math.exp(fit.estimate))
    assert row["effect_unit"] == "log odds ratio" and row["verdict"] == "supported"
    assert row["mean_arm"] == pytest.approx(91 / 600)
    assert "quasi-binomial" in row["test"]


def test_share_needs_an_expected_count_per_animal():
    shares = {"t": [(0, 25), (1, 25), (0, 25)], "r": [(4, 300), (5, 300), (3, 300)]}
    scores = _scores({"t": [0, 0, 0], "r": [0, 0, 0]}, shares=shares)
    row = _one(_evaluate(scores, [_claim("s", "cell_state", "treg", share(), [("t", "r")],
                                         "up")]), "s")
    assert row["verdict"] == "inconclusive"
    assert "expected 1 state cells" in row["reason"] and math.isnan(row["p_value"])


# --- difference claims: one model each ----------------------------------------------------------------

def test_interaction_and_synergy_are_single_contrasts():
    rng = np.random.default_rng(0)
    vals = {}
    for arm in ("t", "r"):
        vals[arm] = list(rng.normal(0, 1, 8))
    scores = _scores(vals, stage=lambda arm, i: "early" if i < 4 else "late")
    inter = {"type": "interaction", "arm": "t", "reference": "r", "levels": ["early", "late"]}
    row = _one(_evaluate(scores, [_claim("i", "cell_type", "hsc", sig(), [inter], "down")],
                         min_samples_per_arm=3), "i")
    m = {(a, s): np.mean(vals[a][:4] if s == "early" else vals[a][4:]) for a in ("t", "r")
         for s in ("early", "late")}
    expected = (m["t", "early"] - m["r", "early"]) - (m["t", "late"] - m["r", "late"])
    assert row["effect"] == pytest.approx(expected)
    assert row["contrast_type"] == "interaction" and row["n_arm"] == 8 and row["n_reference"] == 8
    # per-cell variances: se^2 = sum of s_k^2 / n_k
    s2 = [np.var(vals[a][:4] if s == "early" else vals[a][4:], ddof=1) / 4 for a, s in m]
    assert row["se"] == pytest.approx(math.sqrt(sum(s2)))
    syn = _scores({"combo": [5.0, 5.5, 4.5], "a": [2.0, 2.5, 1.5], "b": [1.0, 1.5, 0.5],
                   "ref": [0.0, 0.5, -0.5]})
    spec = {"type": "synergy", "arm": "combo", "reference": "ref", "components": ["a", "b"]}
    row = _one(_evaluate(syn, [_claim("s", "cell_type", "hsc", sig(), [spec], "up")]), "s")
    assert row["effect"] == pytest.approx(5.0 - 2.0 - 1.0 + 0.0)
    assert row["reference"] == "additive(a+b)" and row["contrast_type"] == "synergy"


def test_catalogue_expresses_difference_claims(tmp_path):
    doc = {"claims": [_claim("i", "cell_type", "hsc", sig("hsc_activation"),
                             [{"type": "interaction", "arm": "a", "reference": "b",
                               "levels": ["early", "early"]}], "down")]}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=r"contrasts\[0\]\.levels"):
        load_catalogue(path)
    doc["claims"][0]["contrasts"] = [{"type": "synergy", "arm": "a", "reference": "b"}]
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match="components"):
        load_catalogue(path)


# --- controls gate claims, no_effect, BH -----------------------------------------------------------

def test_failed_control_flags_claims_of_its_population_and_measure():
    rng = np.random.default_rng(1)
    scores = _scores({"healthy": list(rng.normal(0, 1, 3)), "injury": list(rng.normal(0, 1, 3)),
                      "msc": list(rng.normal(-5, 0.3, 3))})
    claims = [_claim("ctl", "cell_type", "hsc", sig(), [("injury", "healthy")], "up", "control"),
              _claim("c", "cell_type", "hsc", sig(), [("msc", "injury")], "down")]
    t = _evaluate(scores, claims)
    row = _one(t, "c")
    assert _one(t, "ctl")["verdict"] != "supported"
    assert row["flag"].startswith("failed control: control ctl")
    assert row["reason"].startswith("FLAGGED")
    text = summary_markdown(t, t.iloc[:0], "x", {"method": METHOD})
    assert "(flagged)" in text
    # a passing control: no flag
    good = _scores({"healthy": [0.0, 0.2, -0.2], "injury": [5.0, 5.3, 4.8],
                    "msc": [0.1, -0.1, 0.2]})
    assert _one(_evaluate(good, claims), "c")["flag"] == ""


def test_no_effect_needs_the_equivalence_test():
    rng = np.random.default_rng(2)
    claims = [_claim("c", "cell_type", "hsc", sig(), [("t", "r")], "up")]
    tight = _scores({"t": list(rng.normal(0, 0.1, 6)), "r": list(rng.normal(0, 0.1, 6))})
    row = _one(_evaluate(tight, claims, sesoi_g=2.0), "c")
    assert row["verdict"] == "no_effect" and "TOST" in row["reason"]
    assert row["q_equivalence"] < 0.05
    noisy = _scores({"t": [0.0, 2.0, -1.5], "r": [1.0, -2.0, 0.5]})
    row = _one(_evaluate(noisy, claims, sesoi_g=0.2), "c")
    assert row["verdict"] == "inconclusive"


def test_bh_alpha_and_families():
    rng = np.random.default_rng(3)
    vals = {"h": list(rng.normal(0, 1, 4)), "i": list(rng.normal(4, 1, 4)),
            "m": list(rng.normal(0, 1, 4))}
    scores = _scores(vals)
    claims = [_claim("ctl", "cell_type", "hsc", sig(), [("i", "h")], "up", "control"),
              _claim("c1", "cell_type", "hsc", sig(), [("m", "i")], "down"),
              _claim("c2", "cell_type", "hsc", sig(), [("m", "h")], "up")]
    t = _evaluate(scores, claims)
    sub = t[t["kind"] == "claim"]
    np.testing.assert_allclose(sub["q_value"], stats.bh(sub["p_value"]))
    np.testing.assert_allclose(sub["alpha_test"], stats.bh_alpha(sub["p_value"], 0.05))
    assert _one(t, "ctl")["q_value"] == pytest.approx(_one(t, "ctl")["p_value"])


def test_engine_uses_the_calibrated_variance_model():
    """The engine's p-values are those of the design/variance model whose type-I error
    test_stats.py measures (heteroscedastic arms: contrast arms at SD 1, others at 0.3 / 0.5)."""
    rng = np.random.default_rng(9)
    claims = [_claim("c", "cell_type", "hsc", sig(), [("a", "b")], "up")]
    own = stats.build_design(["a"] * 3 + ["b"] * 3, {"a": 1, "b": -1}, "b")
    pool = stats.build_design(["a"] * 3 + ["b"] * 3 + ["c"] * 3 + ["d"] * 3,
                              {"a": 1, "b": -1}, "b")
    for _ in range(10):
        y = rng.normal(0, np.r_[np.ones(6), np.full(3, 0.3), np.full(3, 0.5)])
        scores = _scores({"a": list(y[:3]), "b": list(y[3:6]), "c": list(y[6:9]),
                          "d": list(y[9:])})
        p_own = _one(_evaluate(scores, claims), "c")["p_value"]
        p_pool = _one(_evaluate(scores, claims, pool_arms=True), "c")["p_value"]
        assert p_own == pytest.approx(stats.linear_contrast(y[:6], own).p_value)
        assert p_pool == pytest.approx(stats.linear_contrast(y, pool).p_value)


def test_untestable_rows_say_why():
    scores = _scores({"t": [1.0], "r": [2.0, 3.0, 4.0], "o": [1.0, 2.0, 3.0]})
    claims = [_claim("pop", "cell_type", "nope", sig(), [("t", "r")], "up"),
              _claim("arm", "cell_type", "hsc", sig(), [("x", "r")], "up"),
              _claim("few", "cell_type", "hsc", sig(), [("t", "r")], "up"),
              _claim("stage", "cell_type", "hsc", sig(),
                     [{"arm": "o", "reference": "r", "stage": "w9"}], "up")]
    t = _evaluate(scores, claims)
    assert (t["verdict"] == "inconclusive").all()
    assert _one(t, "pop")["reason"] == "population cell_type 'nope' absent in study"
    assert _one(t, "arm")["reason"].startswith("arm 'x' absent in study")
    assert _one(t, "few")["reason"] == "too few samples per arm: 1 t vs 3 r animals (min 3)"
    assert _one(t, "stage")["reason"].startswith("no 'o' samples at stage 'w9'")
    cov = COVERAGE.assign(n_found=2)
    table, _ = evaluate_study(scores, cov, {"claims": claims[2:3]}, "x", {"method": METHOD},
                              SCORE_CFG)
    assert table.iloc[0]["reason"] == (
        "signature coverage too low: 2 of 10 genes of 'sig_a' found (min_genes 3)")


# --- the voom path on pseudobulk counts ----------------------------------------------------------

def _pseudobulk(effect: float, seed: int, n: int = 4, batch=None, stages=("",)):
    """Pseudobulk counts of hsc: genes g0-g9 (the signature) shifted by ``effect`` (log2) in
    arm t (only at the first stage when there are several)."""
    import anndata as ad

    rng = np.random.default_rng(seed)
    n_genes = 200
    base = rng.gamma(2.0, 40.0, n_genes)
    obs, counts = [], []
    for arm in ("t", "r"):
        for stage in stages:
            for i in range(n):
                mu = base.copy()
                mu[:10] *= 2 ** (effect if arm == "t" and stage == stages[0] else 0.0)
                mu *= np.exp(rng.normal(0, 0.15))
                counts.append(rng.negative_binomial(10, 10 / (10 + mu)))
                s = f"{arm}{stage}_{i}"
                obs.append({"sample": s, "animal": s, "arm": arm,
                            "batch": batch(arm, i) if batch else s, "stage": stage,
                            "population_level": "cell_type", "population": "hsc",
                            "n_cells": 200})
    obs = pd.DataFrame(obs)
    obs.index = obs["sample"] + "|cell_type|hsc"
    pb = ad.AnnData(X=np.zeros((len(obs), n_genes), np.float32), obs=obs,
                    var=pd.DataFrame(index=[f"g{i}" for i in range(n_genes)]))
    pb.layers["counts"] = np.asarray(counts, np.float32)
    scores = pd.DataFrame([{"study": "x", **{k: o[k] for k in ("sample", "animal", "arm", "batch",
                                                               "stage")},
                            "population_level": "cell_type", "population": "hsc",
                            "measure_type": "signature", "measure": "sig_a", "method": METHOD,
                            "value": 0.0, "n_cells": 200, "n_parent_cells": np.nan}
                           for o in obs.to_dict("records")])
    return pb, scores


def test_voom_signature_rows_report_log2fc_and_genes_used():
    pytest.importorskip("livermsc.geneset")
    pb, scores = _pseudobulk(effect=1.0, seed=0)
    claims = [_claim("c", "cell_type", "hsc", sig(), [("t", "r")], "up")]
    table, methods = evaluate_study(scores, COVERAGE, {"claims": claims}, "x", {"method": "voom"},
                                    SCORE_CFG, pseudobulk=pb)
    row = table.iloc[0]
    assert row["method"] == "voom" and row["effect_unit"] == "log2 fold change"
    assert row["log2fc"] == pytest.approx(1.0, abs=0.3) and row["verdict"] == "supported"
    assert 8 <= row["n_genes_used"] <= 10 and set(row["genes_used"].split(",")) <= set(GENES)
    assert set(methods["method"]) == {"voom", METHOD}
    pb, scores = _pseudobulk(effect=1.0, seed=1, batch=lambda arm, i: arm)
    table, _ = evaluate_study(scores, COVERAGE, {"claims": claims}, "x", {"method": "voom"},
                              SCORE_CFG, pseudobulk=pb)
    assert table.iloc[0]["reason"] == "batch confounded with arm"
    table, _ = evaluate_study(scores, COVERAGE, {"claims": claims}, "x", {"method": "voom"},
                              SCORE_CFG)
    assert table.iloc[0]["reason"].startswith("no pseudobulk counts given")


# --- meta-analysis ------------------------------------------------------------------------------------

def _study_table(study: str, g: float, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    scores = _scores({"t": list(rng.normal(g, 1, 4)), "r": list(rng.normal(0, 1, 4))})
    table, _ = evaluate_study(scores, COVERAGE, {"claims": [
        _claim("c", "cell_type", "hsc", sig(), [("t", "r")], "up"),
        _claim("d", "cell_type", "hsc", sig(), [("r", "t")], "up")]}, study,
        {"method": METHOD}, SCORE_CFG)
    return table


def test_meta_analysis_one_two_and_three_studies():
    tables = [_study_table(f"s{i}", 2.0, i) for i in range(3)]
    one = meta_analysis(tables[:1]).set_index("claim_id")
    assert list(one.columns) == [c for c in META_COLUMNS if c != "claim_id"]
    assert (one["k"] == 1).all()
    assert one.loc["c", "verdict"] == tables[0].set_index("claim_id").loc["c", "verdict"]
    assert one.loc["c", "reason"].startswith("one study (s0)")
    two = meta_analysis(tables[:2]).set_index("claim_id")
    assert (two["k"] == 2).all() and (two["verdict"] == "inconclusive").all()
    assert two.loc["c", "reason"].startswith("two studies: descriptive pooling only")
    three = meta_analysis(tables).set_index("claim_id")
    g = pd.concat(tables).set_index(["claim_id", "study"])
    ref = stats.meta_reml_hk(g.loc["c", "hedges_g"], g.loc["c", "g_var"])
    assert three.loc["c", "hedges_g"] == pytest.approx(ref.estimate)
    assert three.loc["c", "ci_low"] == pytest.approx(ref.ci_low)
    assert np.isfinite(three.loc["c", "pi_low"])
    np.testing.assert_allclose(three["q_value"], stats.bh(three["p_value"]))
    # a row tested in one study only is left out of the pooled BH family
    mixed = meta_analysis([tables[0], tables[1], tables[2][tables[2]["claim_id"] == "c"]])
    mixed = mixed.set_index("claim_id")
    assert mixed.loc["c", "k"] == 3 and mixed.loc["d", "k"] == 2
    np.testing.assert_allclose(mixed["q_value"], stats.bh(mixed["p_value"]))


# --- catalogue, config and rule entry points -----------------------------------------------------------

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
    with pytest.raises(ConfigError, match=r"claims"):
        evaluate_study(_scores({"t": [1.0]}), COVERAGE, {"claims": []}, "x", {"alpha": 2})


class _named(SimpleNamespace):
    """Attribute and ``get`` access, like Snakemake's named input/output lists."""

    def get(self, key, default=None):
        return getattr(self, key, default)


def test_rule_entry_points(sim_adata, tmp_path):
    from livermsc.score import rule_score as score_entry

    a = sim_adata[~(sim_adata.obs["is_doublet"] | sim_adata.obs["is_low_quality"]).to_numpy()]
    a = a.copy()
    a.obs = a.obs[["sample", "arm", "animal", "batch", "study", "cell_type", "cell_state"]]
    a.write_h5ad(tmp_path / "annotated.h5ad")
    sigs = tmp_path / "sigs.yaml"
    sigs.write_text(yaml.safe_dump({"signatures": {k: {"mouse": v, "human": [g.upper() for g in v]}
                                                   for k, v in PLANTED_SIGNATURES.items()}}))
    catalogue = {"claims": [
        _claim("ctl", "cell_type", "hsc", sig("hsc_activation"), [("injury", "healthy")], "up",
               "control"),
        _claim("hsc", "cell_type", "hsc", sig("hsc_activation"), [("injury_msc", "injury")],
               "down"),
        _claim("treg", "cell_state", "treg", share("cell_type", "cd4_t"),
               [("injury_msc", "injury")], "up")]}
    cat = tmp_path / "claims.yaml"
    cat.write_text(yaml.safe_dump(catalogue))
    out = tmp_path / "results" / "sim"
    score_cfg = {"methods": ["pseudobulk_z"]}
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
    rule_claims(SimpleNamespace(
        input=_named(scores=str(out / "scores/sample_scores.tsv"),
                     coverage=str(out / "scores/signature_coverage.tsv"),
                     pseudobulk=str(out / "scores/pseudobulk.h5ad"),
                     catalogue=str(cat), signatures=str(sigs)),
        output=_named(claims=str(out / "claims.tsv"), methods=str(out / "claims_methods.tsv"),
                      summary=str(out / "claims_summary.md")),
        params=SimpleNamespace(cfg={"method": "pseudobulk_z"}, score_cfg=score_cfg,
                               species="mouse", pairs={}),
        wildcards=SimpleNamespace(study="sim")))
    claims = pd.read_csv(out / "claims.tsv", sep="\t")
    assert list(claims.columns) == CLAIM_COLUMNS
    assert claims.set_index("claim_id").loc["ctl", "verdict"] == "supported"
    assert set(claims["verdict"]) <= {"supported", "contradicted", "no_effect", "inconclusive"}
    assert (claims["reason"].fillna("") != "").all()
    text = (out / "claims_summary.md").read_text()
    assert text.splitlines()[0] == "# Claims tested in study `sim`"
    # the default method: voom on the score stage's pseudobulk counts
    rule_claims(SimpleNamespace(
        input=_named(scores=str(out / "scores/sample_scores.tsv"),
                     coverage=str(out / "scores/signature_coverage.tsv"),
                     pseudobulk=str(out / "scores/pseudobulk.h5ad"),
                     catalogue=str(cat), signatures=str(sigs), celltypes=str(CELLTYPES)),
        output=_named(claims=str(out / "claims.tsv"), methods=str(out / "claims_methods.tsv"),
                      summary=str(out / "claims_summary.md")),
        params=SimpleNamespace(cfg={}, score_cfg=score_cfg, species="mouse", pairs={}),
        wildcards=SimpleNamespace(study="sim")))
    voom = pd.read_csv(out / "claims.tsv", sep="\t").set_index("claim_id")
    assert voom.loc["ctl", "method"] == "voom" and voom.loc["ctl", "verdict"] == "supported"
    assert voom.loc["ctl", "n_genes_used"] >= 3 and np.isfinite(voom.loc["ctl", "log2fc"])
    assert voom.loc["treg", "effect_unit"] == "log odds ratio"
    expected = signature_marker_overlap(CELLTYPES, PLANTED_SIGNATURES, "cell_type", "hsc",
                                        "hsc_activation", "mouse")
    assert str(voom.loc["ctl", "marker_overlap"]) == (",".join(expected) or "nan")
    rule_claims_meta(SimpleNamespace(
        input=_named(claims=[str(out / "claims.tsv")]),
        output=_named(meta=str(tmp_path / "results/claims_meta.tsv")),
        params=SimpleNamespace(cfg={})))
    meta = pd.read_csv(tmp_path / "results/claims_meta.tsv", sep="\t")
    assert set(meta["k"]) <= {0, 1} and meta["i2"].isna().all()


# --- a user's own claim on real data: 5 patients x DMSO / panobinostat, pairing declared ---------

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
    from livermsc.score import score_study

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
    res = score_study(adata, signatures, "gbm", {"methods": ["pseudobulk_z"]})
    info = adata.obs.drop_duplicates("sample").set_index("sample")
    pairs = info["animal"].to_dict()  # the study file's paired_by: animal (the patient)
    settings = {"method": "pseudobulk_z", "variance": "pooled"}
    table, _ = evaluate_study(res.sample_scores, res.coverage, catalogue, "gbm", settings,
                              {"methods": ["pseudobulk_z"]}, pairs=pairs)
    row = table.iloc[0]
    assert bool(row["paired"]) and row["n_arm"] == row["n_reference"] == 5
    # known answer: the paired t-test on the same per-sample scores
    sc = res.sample_scores
    sc = sc[(sc["measure"] == "inflammatory_cytokines") & (sc["method"] == "pseudobulk_z")
            & (sc["population_level"] == "cell_type")]
    wide = sc.assign(patient=sc["sample"].map(pairs)).pivot(index="patient", columns="arm",
                                                             values="value")
    ref = sps.ttest_rel(wide["panobinostat"], wide["ctrl"])
    assert row["p_value"] == pytest.approx(ref.pvalue, rel=1e-6)
    assert row["effect"] == pytest.approx((wide["panobinostat"] - wide["ctrl"]).mean())
    # the same samples without the declaration: unpaired, with a note
    table, _ = evaluate_study(res.sample_scores, res.coverage, catalogue, "gbm", settings,
                              {"methods": ["pseudobulk_z"]})
    assert not bool(table.iloc[0]["paired"]) and "no pairing is declared" in table.iloc[0]["notes"]


def test_sensitivity_table_repeats_the_primary_verdicts():
    rng = np.random.default_rng(5)
    shares = {"t": [(30, 200), (36, 220), (25, 180)], "r": [(10, 210), (12, 190), (9, 200)]}
    scores = _scores({"t": list(rng.normal(1.5, 1, 3)), "r": list(rng.normal(0, 1, 3))},
                     shares=shares)
    other = scores[scores["measure_type"] == "signature"].assign(method="ssgsea")
    scores = pd.concat([scores, other], ignore_index=True)
    claims = [_claim("c", "cell_type", "hsc", sig(), [("t", "r")], "up"),
              _claim("s", "cell_state", "treg", share(), [("t", "r")], "up")]
    table, methods = evaluate_study(scores, COVERAGE, {"claims": claims}, "x",
                                    {"method": METHOD}, {"methods": [METHOD, "ssgsea"]})
    assert set(methods["method"]) == {METHOD, "ssgsea", "proportion"}
    same = methods[methods["method"].isin([METHOD, "proportion"])].reset_index(drop=True)
    pd.testing.assert_frame_equal(same, table)


def test_paired_by_is_declared_in_the_study_file(tmp_path):
    from livermsc.config import load_study

    rows = [{"sample": f"{arm}{i}", "arm": arm, "path": f"{arm}{i}.h5ad", "donor": f"d{i}"}
            for arm in ("ctrl", "drug") for i in range(3)]
    spec = {"id": "ex", "title": "explants", "species": "human", "source": "local",
            "samples": rows, "paired_by": "donor"}
    (tmp_path / "ex.yaml").write_text(yaml.safe_dump(spec))
    study = load_study("ex", tmp_path)
    assert study.pairs == {"ctrl0": "d0", "ctrl1": "d1", "ctrl2": "d2",
                           "drug0": "d0", "drug1": "d1", "drug2": "d2"}
    spec["paired_by"] = "patient"
    (tmp_path / "ex.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match=r"ex\.yaml: field 'paired_by': 'patient'"):
        load_study("ex", tmp_path)
    del spec["paired_by"]
    (tmp_path / "ex.yaml").write_text(yaml.safe_dump(spec))
    assert load_study("ex", tmp_path).pairs == {}


# --- real multi-animal liver data: circadian clock, ZT12 vs ZT00, 3 vs 3 mice ------------------------

DROIN_STUDY = """
id: droin2021
title: Mouse liver hepatocytes at four times of day (Droin et al. 2021, GSE145197)
species: mouse
source: local
model: healthy liver, circadian time
samples:
  - {sample: ZT00A, arm: ZT00, path: droin.h5ad}
  - {sample: ZT00B, arm: ZT00, path: droin.h5ad}
  - {sample: ZT00C, arm: ZT00, path: droin.h5ad}
  - {sample: ZT12A, arm: ZT12, path: droin.h5ad}
  - {sample: ZT12B, arm: ZT12, path: droin.h5ad}
  - {sample: ZT12C, arm: ZT12, path: droin.h5ad}
"""

DROIN_SIGNATURES = """
signatures:
  clock_output:
    description: Clock-controlled output and negative-limb genes, high around ZT12 in mouse liver.
    source: Droin et al. 2021 Nat Metab 3:43 and the liver circadian literature (see SOURCE.md).
    mouse: [Dbp, Tef, Per1, Per2, Per3, Nr1d2]
    human: [DBP, TEF, PER1, PER2, PER3, NR1D2]
  clock_positive_limb:
    description: Positive-limb clock genes, low around ZT12 in mouse liver.
    source: Droin et al. 2021 Nat Metab 3:43 and the liver circadian literature (see SOURCE.md).
    mouse: [Arntl, Npas2, Cry1]
    human: [ARNTL, NPAS2, CRY1]
"""

DROIN_CLAIMS = """
claims:
  - id: clock_output_up_at_zt12
    statement: Clock output genes are higher in hepatocytes at the start of the dark phase.
    population: {level: cell_type, value: hepatocyte}
    measure: {type: signature, signature: clock_output}
    contrasts: [{arm: ZT12, reference: ZT00}]
    direction: up
  - id: clock_positive_limb_down_at_zt12
    statement: Positive-limb clock genes are lower in hepatocytes at the start of the dark phase.
    population: {level: cell_type, value: hepatocyte}
    measure: {type: signature, signature: clock_positive_limb}
    contrasts: [{arm: ZT12, reference: ZT00}]
    direction: down
"""


@pytest.mark.realdata
def test_real_liver_clock_answers_through_the_engine(shared_data, tmp_path):
    """Configured only by a study file, a signatures file and a claims file: the published
    clock answers of SOURCE.md, with the default engine (voom, own arms, BH)."""
    import anndata as ad
    from livermsc.config import load_study
    from livermsc.score import score_study

    path = shared_data / "droin2021_liver_circadian" / "droin2021_liver_hepatocytes_circadian.h5ad"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    (tmp_path / "droin2021.yaml").write_text(DROIN_STUDY)
    (tmp_path / "sigs.yaml").write_text(DROIN_SIGNATURES)
    (tmp_path / "claims.yaml").write_text(DROIN_CLAIMS)
    study = load_study("droin2021", tmp_path)
    signatures = load_signatures(tmp_path / "sigs.yaml", study.species)
    catalogue = load_catalogue(tmp_path / "claims.yaml", signatures)
    raw = ad.read_h5ad(path)
    keep = raw.obs["sample"].astype(str).isin(study.samples.index).to_numpy()
    adata = ad.AnnData(X=raw.X[keep], var=pd.DataFrame(index=raw.var_names.astype(str)))
    sheet = study.samples
    samples = raw.obs["sample"].astype(str).to_numpy()[keep]
    adata.obs = pd.DataFrame({"sample": samples, "animal": sheet.loc[samples, "animal"].to_numpy(),
                              "arm": sheet.loc[samples, "arm"].to_numpy(),
                              "cell_type": "hepatocyte", "cell_state": "hepatocyte"},
                             index=raw.obs_names[keep])
    adata.layers["counts"] = adata.X.copy()
    score_cfg = {"methods": ["pseudobulk_z"]}
    res = score_study(adata, signatures, study.id, score_cfg)
    table, _ = evaluate_study(res.sample_scores, res.coverage, catalogue, study.id, {}, score_cfg,
                              pseudobulk=res.pseudobulk, pairs=study.pairs or None)
    t = table.set_index("claim_id")
    assert (t["method"] == "voom").all() and (t["n_arm"] == 3).all() and (t["n_reference"] == 3).all()
    assert t.loc["clock_output_up_at_zt12", "verdict"] == "supported"
    assert t.loc["clock_output_up_at_zt12", "log2fc"] > 1
    assert t.loc["clock_positive_limb_down_at_zt12", "verdict"] == "supported"
    assert t.loc["clock_positive_limb_down_at_zt12", "log2fc"] < -1
    assert (t["n_genes_used"] >= 3).all() and (t["batch"] == "no batch recorded").all()


def test_voom_interaction_is_the_difference_of_log2_fold_changes():
    pytest.importorskip("livermsc.geneset")
    pb, scores = _pseudobulk(effect=1.5, seed=3, n=3, stages=("early", "late"))
    inter = {"type": "interaction", "arm": "t", "reference": "r", "levels": ["early", "late"]}
    table, _ = evaluate_study(scores, COVERAGE, {"claims": [
        _claim("i", "cell_type", "hsc", sig(), [inter], "up")]}, "x", {}, SCORE_CFG,
        pseudobulk=pb)
    row = table.iloc[0]
    assert row["contrast_type"] == "interaction" and (row["n_arm"], row["n_reference"]) == (6, 6)
    assert row["log2fc"] == pytest.approx(1.5, abs=0.4) and row["verdict"] == "supported"


def test_voom_rows_need_no_score_table_values():
    pytest.importorskip("livermsc.geneset")
    pb, scores = _pseudobulk(effect=1.0, seed=2)
    only_shares = scores.iloc[:0]
    info = scores.drop_duplicates("sample").assign(
        population_level="cell_state", population="treg", measure_type="share",
        measure="share_of:cell_type:cd4_t", method="proportion", value=0.1, n_cells=10,
        n_parent_cells=100)
    table, _ = evaluate_study(pd.concat([only_shares, info]), COVERAGE, {"claims": [
        _claim("c", "cell_type", "hsc", sig(), [("t", "r")], "up")]}, "x", {}, SCORE_CFG,
        pseudobulk=pb)
    assert table.iloc[0]["verdict"] == "supported"

"""Sample-level statistics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from livermsc import stats
from scipy import stats as sps


def test_welch_test_hand_computed():
    # x: mean 2, var 1; y: mean 5.5, var 5/3 -> se^2 = 1/3 + 5/12 = 0.75
    t, df, p = stats.welch_test([1, 2, 3], [4, 5, 6, 7])
    assert t == pytest.approx(-3.5 / math.sqrt(0.75))
    assert df == pytest.approx(0.75 ** 2 / ((1 / 3) ** 2 / 2 + (5 / 12) ** 2 / 3))
    assert df == pytest.approx(4.959, abs=1e-3)
    ref = sps.ttest_ind([1, 2, 3], [4, 5, 6, 7], equal_var=False)
    assert p == pytest.approx(ref.pvalue)
    assert all(math.isnan(v) for v in stats.welch_test([1], [2, 3]))


def test_hedges_g_hand_computed():
    # pooled SD^2 = (2*1 + 3*5/3) / 5 = 1.4; d = -3.5 / sqrt(1.4); J = 1 - 3/19
    g, var = stats.hedges_g([1, 2, 3], [4, 5, 6, 7])
    expected = -3.5 / math.sqrt(1.4) * (1 - 3 / 19)
    assert g == pytest.approx(expected)
    assert g == pytest.approx(-2.491, abs=1e-3)
    assert var == pytest.approx(7 / 12 + expected ** 2 / 14)


def test_bh_hand_computed_and_missing():
    q = stats.bh([0.01, 0.04, 0.03, 0.5])
    # sorted 0.01, 0.03, 0.04, 0.5 -> 0.04, 0.06, 0.0533, 0.5 -> step-up minimum
    np.testing.assert_allclose(q, [0.04, 0.04 * 4 / 3, 0.04 * 4 / 3, 0.5])
    q = stats.bh([0.01, float("nan"), 0.02])
    assert q[0] == pytest.approx(0.02) and math.isnan(q[1]) and q[2] == pytest.approx(0.02)
    assert np.isnan(stats.bh([float("nan")])).all()


def test_paired_test_hand_computed():
    # differences 1, 2, 2: mean 5/3, sd 1/sqrt(3) -> t = 5, df 2
    t, df, p = stats.paired_test([2, 4, 6], [1, 2, 4])
    assert t == pytest.approx(5.0)
    assert df == 2
    assert p == pytest.approx(2 * sps.t.sf(5.0, 2))
    assert p == pytest.approx(0.0377, abs=1e-4)


def test_logit_share_pseudocount():
    np.testing.assert_allclose(stats.logit_share([0, 5], [10, 10]),
                               [math.log(0.5 / 10.5), 0.0])
    np.testing.assert_allclose(stats.logit_share([2], [10], pseudocount=1.0), [math.log(3 / 9)])


def test_mde_matches_power_analysis():
    from statsmodels.stats.power import TTestIndPower, TTestPower

    assert stats.mde(3, 3) == pytest.approx(
        TTestIndPower().solve_power(nobs1=3, ratio=1, alpha=0.05, power=0.8), rel=1e-6)
    assert stats.mde(3, 3) == pytest.approx(3.07, abs=0.01)
    assert stats.mde(4, 6, alpha=0.01, power=0.9) == pytest.approx(
        TTestIndPower().solve_power(nobs1=4, ratio=1.5, alpha=0.01, power=0.9), rel=1e-6)
    assert stats.mde_paired(5, r=0.0) == pytest.approx(
        TTestPower().solve_power(nobs=5, alpha=0.05, power=0.8) * math.sqrt(2), rel=1e-6)
    assert math.isnan(stats.mde(1, 3))


def _frame(rows):
    return pd.DataFrame(rows, columns=["sample", "animal", "arm", "value"])


def test_unpaired_welch_with_animals_averaged():
    df = _frame([("a1", "A", "t", 1.0), ("a1b", "A", "t", 3.0),  # animal A: mean 2
                 ("b1", "B", "t", 2.0), ("c1", "C", "t", 3.0),
                 ("d1", "D", "r", 4.0), ("e1", "E", "r", 5.0), ("f1", "F", "r", 6.0),
                 ("g1", "G", "r", 7.0)])
    # animal A's two samples average to 2 -> x = [2, 2, 3]; the same pair of values again:
    res = stats.compare_arms(df, "t", "r", min_n=3)
    assert not res.paired
    assert (res.n_arm, res.n_reference) == (3, 4)
    assert res.mean_arm == pytest.approx(7 / 3)
    assert res.p_value == pytest.approx(stats.welch_test([2, 2, 3], [4, 5, 6, 7])[2])
    assert res.hedges_g == pytest.approx(stats.hedges_g([2, 2, 3], [4, 5, 6, 7])[0])
    assert res.ci_low < res.hedges_g < res.ci_high
    assert res.mde == pytest.approx(stats.mde(3, 4))


def test_paired_design_detected_and_used():
    df = _frame([("A_t", "A", "t", 2.0), ("B_t", "B", "t", 4.0), ("C_t", "C", "t", 6.0),
                 ("A_r", "A", "r", 1.0), ("B_r", "B", "r", 2.0), ("C_r", "C", "r", 4.0),
                 ("D_r", "D", "r", 9.0)])  # D has no treated sample: left out
    res = stats.compare_arms(df, "t", "r", covariates=["batch"], pool_arms=True)
    assert res.paired
    assert res.n_arm == res.n_reference == 3
    assert res.effect == pytest.approx(5 / 3)
    assert res.p_value == pytest.approx(sps.ttest_rel([2, 4, 6], [1, 2, 4]).pvalue)
    assert "left out" in res.notes[0]


def test_ols_adjusts_for_batch_and_drops_confounded_covariate():
    rng = np.random.default_rng(0)
    arm = ["t"] * 4 + ["r"] * 4
    batch = ["b1", "b1", "b1", "b2", "b1", "b2", "b2", "b2"]
    value = [2.0 * (a == "t") + 10.0 * (b == "b2") + rng.normal(0, 0.01)
             for a, b in zip(arm, batch, strict=True)]
    df = pd.DataFrame({"sample": list("abcdefgh"), "animal": list("abcdefgh"), "arm": arm,
                       "batch": batch, "value": value})
    raw = stats.compare_arms(df, "t", "r")
    assert raw.effect == pytest.approx(2 - 10 * (3 / 4 - 1 / 4), abs=0.05)  # batch-confounded
    adj = stats.compare_arms(df, "t", "r", covariates=["batch"])
    assert adj.effect == pytest.approx(2.0, abs=0.05)
    assert adj.test.startswith("OLS value ~ arm + batch")
    # batch identical to arm: not estimable, dropped with a note, model still fitted on arm
    df["batch"] = df["arm"]
    res = stats.compare_arms(df, "t", "r", covariates=["batch"])
    assert "not used" in res.notes[0]
    assert res.effect == pytest.approx(raw.effect)


def test_pooled_arms_use_all_animals():
    rng = np.random.default_rng(1)
    rows = [(f"{a}{i}", f"{a}{i}", a, v) for a, mu in (("t", 1.0), ("r", 0.0), ("o", 5.0))
            for i, v in enumerate(mu + rng.normal(0, 1, 4))]
    df = _frame(rows)
    pooled = stats.compare_arms(df, "t", "r", pool_arms=True)
    assert "3 arms pooled" in pooled.test and "df 9" in pooled.test
    x = df.loc[df.arm == "t", "value"].to_numpy()
    y = df.loc[df.arm == "r", "value"].to_numpy()
    assert pooled.effect == pytest.approx(x.mean() - y.mean())
    resid = np.concatenate([g["value"] - g["value"].mean() for _, g in df.groupby("arm")])
    sigma = math.sqrt((resid ** 2).sum() / 9)
    t = (x.mean() - y.mean()) / (sigma * math.sqrt(1 / 4 + 1 / 4))
    assert pooled.p_value == pytest.approx(2 * sps.t.sf(abs(t), 9))


def test_too_few_animals_reports_without_testing():
    df = _frame([("a", "A", "t", 1.0), ("b", "B", "r", 2.0), ("c", "C", "r", 3.0)])
    res = stats.compare_arms(df, "t", "r", min_n=3, covariates=["batch"], pool_arms=True)
    assert (res.n_arm, res.n_reference) == (1, 2)
    assert math.isnan(res.p_value) and math.isnan(res.hedges_g)
    assert res.effect == pytest.approx(-1.5)
    empty = stats.compare_arms(df, "x", "y")
    assert empty.n_arm == 0 and math.isnan(empty.p_value)


def test_dersimonian_laird_hand_computed():
    res = stats.dersimonian_laird([0.5, 1.0, 1.5], [0.1, 0.2, 0.1])
    # w = 10, 5, 10: fixed 1.0, Q = 5, C = 25 - 225/25 = 16, tau2 = 3/16, I2 = 3/5
    assert res.k == 3
    assert res.q == pytest.approx(5.0)
    assert res.tau2 == pytest.approx(0.1875)
    assert res.i2 == pytest.approx(0.6)
    assert res.q_p == pytest.approx(sps.chi2.sf(5.0, 2))
    w = 1 / (np.array([0.1, 0.2, 0.1]) + 0.1875)
    assert res.estimate == pytest.approx(1.0)
    assert res.se == pytest.approx(math.sqrt(1 / w.sum()))
    assert res.ci_low == pytest.approx(1.0 - stats.Z95 * res.se)
    # homogeneous effects: tau2 truncated at 0
    assert stats.dersimonian_laird([1.0, 1.0], [0.1, 0.3]).tau2 == 0.0


def test_dersimonian_laird_single_study():
    res = stats.dersimonian_laird([0.8], [0.04])
    assert res.k == 1 and res.estimate == pytest.approx(0.8) and res.se == pytest.approx(0.2)
    assert res.tau2 == 0.0
    assert math.isnan(res.i2) and math.isnan(res.q)
    assert stats.dersimonian_laird([], []).k == 0

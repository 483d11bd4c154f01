"""Sample-level statistics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
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


# --- intervals, g, TOST, MDE, BH alpha ------------------------------------------------------------

def test_t_interval_and_g_interval_agree_with_p():
    rng = np.random.default_rng(0)
    for _ in range(200):
        t, df, factor = rng.normal(0, 3), rng.uniform(2, 20), rng.uniform(0.3, 1.5)
        p = stats.t_pvalue(t, df)
        lo, hi = stats.t_ci(t * 0.5, 0.5, df)
        assert (lo > 0 or hi < 0) == (p < 0.05)
        glo, ghi = stats.g_interval(t, df, factor, stats.hedges_j(df))
        assert glo < t * factor * stats.hedges_j(df) < ghi
        if abs(p - 0.05) > 1e-6:
            assert (glo > 0 or ghi < 0) == (p < 0.05)


def test_g_interval_inverts_the_noncentral_t():
    # t = 3 on 4 df, factor sqrt(2/3): the bounds are the noncentralities at which the
    # observed t is the 97.5% / 2.5% point of the noncentral t
    glo, ghi = stats.g_interval(3.0, 4, math.sqrt(2 / 3), 1.0)
    dlo, dhi = glo / math.sqrt(2 / 3), ghi / math.sqrt(2 / 3)
    assert sps.nct.sf(3.0, 4, dlo) == pytest.approx(0.025, abs=1e-8)
    assert sps.nct.cdf(3.0, 4, dhi) == pytest.approx(0.025, abs=1e-8)


def test_tost_hand_computed():
    # estimate 0.1, se 0.1, df 10, bound 0.5: t = 6 and -4 -> p = t.sf(6) vs t.cdf(-4)
    p = stats.tost(0.1, 0.1, 10, 0.5)
    assert p == pytest.approx(max(sps.t.sf(6, 10), sps.t.cdf(-4, 10)))
    assert stats.tost(0.6, 0.1, 10, 0.5) > 0.5
    assert math.isnan(stats.tost(0.1, 0.1, 10, 0.0))


def test_mde_effect_in_units_and_at_the_bh_alpha():
    from statsmodels.stats.power import TTestIndPower

    # a two-sample t with n 3 + 3: se = sigma sqrt(2/3), df 4
    d = TTestIndPower().solve_power(nobs1=3, ratio=1, alpha=0.01, power=0.8)
    assert stats.mde_effect(math.sqrt(2 / 3) * 0.7, 4, 0.01) == pytest.approx(0.7 * d, rel=1e-5)
    # at a BH per-test alpha of 0.05 / 20: power of the two-sided t at the MDE, by hand
    delta = stats.mde_effect(1.0, 4, 0.0025)
    crit = sps.t.ppf(1 - 0.0025 / 2, 4)
    assert sps.nct.sf(crit, 4, delta) == pytest.approx(0.8, abs=1e-6)  # the other tail ~0
    assert stats.mde_effect(1.0, 4, 0.0025) > stats.mde_effect(1.0, 4, 0.05)


def test_bh_alpha_hand_computed():
    # m = 4; BH at 0.05 rejects p = 0.001, 0.01 (0.0125 > 0.01, 0.0375 < 0.04 fails? no):
    p = [0.001, 0.01, 0.04, 0.5]
    q = stats.bh(p)
    r = int((q < 0.05).sum())
    assert r == 2
    np.testing.assert_allclose(stats.bh_alpha(p, 0.05), [0.025, 0.025, 0.0375, 0.0375])
    a = stats.bh_alpha([0.3, float("nan")], 0.05)
    assert a[0] == pytest.approx(0.05) and math.isnan(a[1])


# --- designs ------------------------------------------------------------------------------------

def test_design_adjusts_for_batch_and_detects_confounding():
    cells = ["t"] * 4 + ["r"] * 4
    batch = ["b1", "b1", "b1", "b2", "b1", "b2", "b2", "b2"]
    d = stats.build_design(cells, {"t": 1, "r": -1}, "r", batch=batch)
    assert d.batch == "adjusted" and not d.reason and d.X.shape == (8, 3)
    rng = np.random.default_rng(0)
    y = 2.0 * (np.array(cells) == "t") + 10.0 * (np.array(batch) == "b2") + rng.normal(0, 0.01, 8)
    assert stats.linear_contrast(y, d).estimate == pytest.approx(2.0, abs=0.05)
    # batch = arm, and batches nested in arms: the arm effect is not estimable
    for b in (cells, ["b1", "b1", "b2", "b2", "b3", "b3", "b4", "b4"]):
        d = stats.build_design(cells, {"t": 1, "r": -1}, "r", batch=b)
        assert d.reason == "batch confounded with arm" and d.batch == "confounded with arm"
    assert stats.build_design(cells, {"t": 1, "r": -1}, "r", batch=None).batch == \
        "no batch recorded"
    assert stats.build_design(cells, {"t": 1, "r": -1}, "r", batch=["x"] * 8).batch == \
        "single batch"
    one = stats.build_design(cells, {"t": 1, "r": -1}, "r", batch=list("abcdefgh"))
    assert one.batch.startswith("one batch per animal") and not one.reason


def test_linear_contrast_matches_welch_ols_and_paired_t():
    import statsmodels.api as sm

    x, y = np.array([1.0, 2.0, 4.0]), np.array([4.0, 5.0, 6.0, 9.0])
    cells = ["t"] * 3 + ["r"] * 4
    d = stats.build_design(cells, {"t": 1, "r": -1}, "r")
    welch = stats.linear_contrast(np.r_[x, y], d)
    ref = sps.ttest_ind(x, y, equal_var=False)
    assert welch.p_value == pytest.approx(ref.pvalue) and welch.t == pytest.approx(ref.statistic)
    pooled = stats.linear_contrast(np.r_[x, y], d, group_variances=False)
    ols = sm.OLS(np.r_[x, y], d.X.to_numpy()).fit()
    assert pooled.p_value == pytest.approx(ols.pvalues[1])
    assert pooled.sigma == pytest.approx(math.sqrt(ols.scale))
    assert pooled.factor == pytest.approx(math.sqrt(1 / 3 + 1 / 4))
    # declared pairs: a block per pair = the paired t-test
    a, b = np.array([2.0, 4.0, 6.0]), np.array([1.0, 2.0, 4.0])
    d = stats.build_design(["t"] * 3 + ["r"] * 3, {"t": 1, "r": -1}, "r",
                           pairs=["p1", "p2", "p3"] * 2)
    paired = stats.linear_contrast(np.r_[a, b], d, group_variances=False)
    assert d.paired and paired.p_value == pytest.approx(sps.ttest_rel(a, b).pvalue)


def _rate_ok(hits: int, n: int, rate: float = 0.05, upper: float = 0.08) -> tuple[float, float]:
    ci = sps.binomtest(hits, n).proportion_ci(0.95, method="exact")
    return hits / n, ci.high


def test_heteroscedastic_arms_type1_error():
    """Contrast arms at SD 1, two other arms at SD 0.3 / 0.5, 3 animals each, no effect: the
    default (own arms, arm-specific variances) and pooled arms with arm-specific variances keep
    the type-I error; pooling one variance over the arms is the inflated variant."""
    rng = np.random.default_rng(11)
    n_sim = 1500
    own = stats.build_design(["a"] * 3 + ["b"] * 3, {"a": 1, "b": -1}, "b")
    pool = stats.build_design(["a"] * 3 + ["b"] * 3 + ["c"] * 3 + ["d"] * 3,
                              {"a": 1, "b": -1}, "b")
    sd = np.r_[np.ones(6), np.full(3, 0.3), np.full(3, 0.5)]
    hits = {"own": 0, "pool_group": 0, "pool_one_variance": 0}
    for _ in range(n_sim):
        y = rng.normal(0, sd)
        hits["own"] += stats.linear_contrast(y[:6], own).p_value < 0.05
        hits["pool_group"] += stats.linear_contrast(y, pool).p_value < 0.05
        hits["pool_one_variance"] += stats.linear_contrast(y, pool, False).p_value < 0.05
    for key in ("own", "pool_group"):
        rate, upper = _rate_ok(hits[key], n_sim)
        assert rate <= 0.05 and upper <= 0.08, (key, rate, upper)
    assert hits["pool_one_variance"] / n_sim > 0.08  # what the old default did


# --- shares ---------------------------------------------------------------------------------------

def test_quasibinomial_matches_statsmodels_glm_without_overdispersion():
    import statsmodels.api as sm

    n = np.array([3.0, 5.0, 2.0, 20.0, 25.0, 18.0])
    N = np.array([40.0, 50.0, 45.0, 200.0, 210.0, 190.0])
    d = stats.build_design(["t"] * 3 + ["r"] * 3, {"t": 1, "r": -1}, "r")
    fit = stats.quasibinomial_test(n, N, d)
    glm = sm.GLM(np.column_stack([n, N - n]), d.X.to_numpy(), family=sm.families.Binomial()).fit()
    assert fit.estimate == pytest.approx(glm.params[1], rel=1e-6)
    x2 = float(glm.pearson_chi2)
    if x2 <= 4:  # no extra-binomial variation: binomial SE (scale floored at 1)
        assert fit.phi == 0 and fit.se == pytest.approx(glm.bse[1], rel=1e-5)
    # with overdispersion the Williams weights bring Pearson X^2 to its df
    rng = np.random.default_rng(3)
    p = 1 / (1 + np.exp(-(-2.4 + rng.normal(0, 0.6, 6))))
    n2 = rng.binomial(N.astype(int), p).astype(float)
    fit2 = stats.quasibinomial_test(n2, N, d)
    prior = 1 / (1 + (N - 1) * fit2.phi)
    glm2 = sm.GLM(np.column_stack([n2, N - n2]), d.X.to_numpy(), family=sm.families.Binomial(),
                  var_weights=prior).fit()
    assert fit2.estimate == pytest.approx(glm2.params[1], rel=1e-5)
    if fit2.phi > 0:
        assert float(glm2.pearson_chi2) == pytest.approx(4.0, rel=1e-4)
    assert math.exp(fit2.estimate) > 0


def _share_type1(p0: float, n_parent: tuple[int, int], sd: float, n_sim: int, seed: int,
                 min_expected: float = 1.0) -> tuple[int, int, int]:
    """(tested, rejected at p < 0.05, estimates up in the first arm) over simulated null studies
    of 3 vs 3 animals; animal effects on the logit scale with SD ``sd``; the claims stage's gates
    (>= 20 parent cells, expected state count >= min_expected) decide what is tested."""
    rng = np.random.default_rng(seed)
    d = stats.build_design(["a"] * 3 + ["b"] * 3, {"a": 1, "b": -1}, "b")
    N = np.array([n_parent[0]] * 3 + [n_parent[1]] * 3)
    tested = rejected = up = 0
    for _ in range(n_sim):
        p = 1 / (1 + np.exp(-(math.log(p0 / (1 - p0)) + rng.normal(0, sd, 6))))
        n = rng.binomial(N, p).astype(float)
        share = n.sum() / N.sum()
        ok = (N >= 20) & (N * share >= min_expected)
        if ok[:3].sum() < 3 or ok[3:].sum() < 3:
            continue
        fit = stats.quasibinomial_test(n, N.astype(float), d)
        if not np.isfinite(fit.p_value):
            continue
        tested += 1
        rejected += fit.p_value < 0.05
        up += fit.estimate > 0
    return tested, rejected, up


@pytest.mark.parametrize("p0, parents, sd", [
    (0.08, (25, 300), 0.0), (0.08, (25, 300), 0.4),      # the review's trap: 0.12 before
    (0.015, (100, 600), 0.4), (0.01, (100, 600), 0.0),   # rare states: 0.10-0.22 before
])
def test_share_model_type1_error(p0, parents, sd):
    tested, rejected, up = _share_type1(p0, parents, sd, n_sim=400, seed=5)
    assert tested >= 150
    rate, upper = _rate_ok(rejected, tested)
    assert rate <= 0.05 and upper <= 0.08, (rate, upper)
    assert 0.3 < up / tested < 0.7  # no systematic direction from the parent sizes


def test_rare_state_in_small_parents_is_not_tested():
    tested, _, _ = _share_type1(0.015, (25, 300), 0.3, n_sim=100, seed=2)
    assert tested <= 5  # an expected 0.4 cells per animal: below min_expected_count


def test_share_model_has_power():
    rng = np.random.default_rng(8)
    d = stats.build_design(["a"] * 4 + ["b"] * 4, {"a": 1, "b": -1}, "b")
    N = np.full(8, 200)
    hits = 0
    for _ in range(200):
        base = np.r_[np.full(4, math.log(0.2 / 0.8)), np.full(4, math.log(0.1 / 0.9))]
        p = 1 / (1 + np.exp(-(base + rng.normal(0, 0.2, 8))))
        hits += stats.quasibinomial_test(rng.binomial(N, p).astype(float), N.astype(float),
                                         d).p_value < 0.05
    assert hits / 200 > 0.6  # a doubled share (OR 2.25) at 4 vs 4 animals


# --- meta-analysis ------------------------------------------------------------------------------

#: BCG vaccine trials (Colditz et al. 1994; metafor's dat.bcg): tpos, tneg, cpos, cneg
BCG = [(4, 119, 11, 128), (6, 300, 29, 274), (3, 228, 11, 209), (62, 13536, 248, 12619),
       (33, 5036, 47, 5761), (180, 1361, 372, 1079), (8, 2537, 10, 619), (505, 87886, 499, 87892),
       (29, 7470, 45, 7232), (17, 1699, 65, 1600), (186, 50448, 141, 27197),
       (5, 2493, 3, 2338), (27, 16886, 29, 17825)]


def _bcg() -> tuple[np.ndarray, np.ndarray]:
    a, b, c, d = np.array(BCG, float).T
    return np.log(a / (a + b)) - np.log(c / (c + d)), 1 / a - 1 / (a + b) + 1 / c - 1 / (c + d)


def test_reml_hartung_knapp_matches_metafor_on_bcg():
    # metafor: rma(yi, vi, test = "knha") on the log risk ratios: tau^2 0.3132, estimate
    # -0.7145, se 0.1807, 95% CI [-1.1083, -0.3207], p 0.0019
    y, v = _bcg()
    res = stats.meta_reml_hk(y, v)
    assert res.tau2 == pytest.approx(0.3132, abs=1e-4)
    assert res.estimate == pytest.approx(-0.7145, abs=1e-4)
    assert res.se == pytest.approx(0.1807, abs=1e-4)
    assert (res.ci_low, res.ci_high) == pytest.approx((-1.1083, -0.3207), abs=2e-4)
    assert res.p_value == pytest.approx(0.0019, abs=1e-4)
    half = sps.t.ppf(0.975, 11) * math.sqrt(res.tau2 + res.se ** 2)
    assert (res.pi_low, res.pi_high) == pytest.approx((res.estimate - half, res.estimate + half))


def test_reml_maximises_the_restricted_likelihood():
    from scipy.optimize import minimize_scalar

    y, v = np.array([0.2, 0.9, 1.4, -0.1, 0.6]), np.array([0.05, 0.1, 0.2, 0.08, 0.04])

    def neg_reml(tau2: float) -> float:
        w = 1 / (v + tau2)
        mu = (w * y).sum() / w.sum()
        return 0.5 * (np.log(v + tau2).sum() + np.log(w.sum()) + (w * (y - mu) ** 2).sum())

    best = minimize_scalar(neg_reml, bounds=(0, 10), method="bounded",
                           options={"xatol": 1e-10}).x
    assert stats.reml_tau2(y, v) == pytest.approx(best, abs=1e-6)


def test_hartung_knapp_matches_statsmodels():
    from statsmodels.stats.meta_analysis import combine_effects

    y, v = np.array([0.5, 1.0, 1.5, 0.2]), np.array([0.1, 0.2, 0.1, 0.05])
    ref = combine_effects(y, v, method_re="chi2")  # DerSimonian-Laird tau^2
    res = stats.meta_reml_hk(y, v, tau2=ref.tau2)
    assert res.estimate == pytest.approx(ref.mean_effect_re)
    assert res.se == pytest.approx(ref.sd_eff_w_re_hksj)
    assert stats.dersimonian_laird(y, v).tau2 == pytest.approx(ref.tau2)


def test_meta_few_studies_keeps_type1_error():
    """Three studies, each g ~ N(0, v + tau^2) with v from 3 vs 3 animals and tau^2 = 1: the
    Hartung-Knapp interval keeps the error rate; DerSimonian-Laird's z interval does not."""
    rng = np.random.default_rng(4)
    n_sim = 2000
    hk = dl = 0
    v = np.full(3, 2 / 3 + 0.05)
    for _ in range(n_sim):
        y = rng.normal(0, np.sqrt(v + 1.0))
        hk += stats.meta_reml_hk(y, v).p_value < 0.05
        dl += stats.dersimonian_laird(y, v).p_value < 0.05
    rate, upper = _rate_ok(hk, n_sim)
    assert rate <= 0.05 and upper <= 0.08
    assert dl / n_sim > 0.08
    one = stats.meta_reml_hk([0.8], [0.04])
    assert one.k == 1 and one.se == pytest.approx(0.2) and math.isnan(one.pi_low)

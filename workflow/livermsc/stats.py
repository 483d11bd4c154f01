"""Sample-level statistics: two-arm comparisons, effect sizes, multiple testing, meta-analysis.

The biological sample (animal or donor) is the unit of replication: values of several samples
of one animal in one arm are averaged first, and cells never count as replicates.

* **Unpaired** (no animal in both arms): Welch's t-test on the animal values, or an OLS model
  ``value ~ arm + covariates`` (statsmodels) whose arm coefficient is the effect, fitted on the
  two arms or, with ``pool_arms``, on the animals of every arm (arm as a factor, so that the
  residual SD is pooled over arms); covariates (e.g. batch) confounded with the arms are dropped.
* **Paired** (animals/donors seen in both arms): the paired t-test on the within-animal
  differences (equivalent to an OLS with the animal as a block); animals seen in one arm only
  are left out, and covariates are not used (the animal block absorbs them).
* **Effect sizes**: the difference in means (arm - reference) and Hedges' g, the difference over
  the pooled within-arm SD (with OLS: the coefficient over the residual SD) times the
  small-sample correction J; its variance is ``(n1 + n2) / (n1 n2) + g^2 / (2 (n1 + n2))``
  (Welch), ``(SE / sigma)^2 + g^2 / (2 df)`` (OLS) and
  ``(1/n + g^2/(2n)) * 2 (1 - r)`` paired (Borenstein et al. 2009, r the between-arm
  correlation of the pairs); the 95% CI is g +/- 1.96 SE.
* **Shares** are compared on the logit scale, ``log((n + c) / (N - n + c))`` with pseudo-count
  c = 0.5 cells by default, so that a zero count stays finite.
* **Minimum detectable effect** (standardised, g scale) at the achieved n for a two-sided t-test
  at ``alpha`` with the requested power, for the test used (two-sample t with n1 + n2 - 2 df;
  OLS with its residual df; paired t converted with r).
* **Benjamini-Hochberg** q-values, ignoring missing p-values.
* **Random-effects meta-analysis** (DerSimonian-Laird) with tau^2, I^2 and Cochran's Q.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache

import numpy as np
import pandas as pd
from scipy import stats as sps

Z95 = float(sps.norm.ppf(0.975))


# --- building blocks ------------------------------------------------------------------------------

def hedges_j(df: float) -> float:
    """Small-sample correction factor J = 1 - 3 / (4 df - 1) of Hedges' g."""
    return 1.0 - 3.0 / (4.0 * df - 1.0) if df > 0 else float("nan")


def welch_test(x: Sequence[float], y: Sequence[float]) -> tuple[float, float, float]:
    """Welch's t-test of mean(x) - mean(y): (t, Welch-Satterthwaite df, two-sided p)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    n1, n2 = len(x), len(y)
    if n1 < 2 or n2 < 2:
        return float("nan"), float("nan"), float("nan")
    v1, v2 = x.var(ddof=1) / n1, y.var(ddof=1) / n2
    se2 = v1 + v2
    if se2 <= 0:
        return float("nan"), float("nan"), float("nan")
    t = (x.mean() - y.mean()) / math.sqrt(se2)
    df = se2 ** 2 / (v1 ** 2 / (n1 - 1) + v2 ** 2 / (n2 - 1))
    return float(t), float(df), float(2 * sps.t.sf(abs(t), df))


def paired_test(x: Sequence[float], y: Sequence[float]) -> tuple[float, float, float]:
    """Paired t-test of x - y (same order = same animal): (t, df, two-sided p)."""
    d = np.asarray(x, float) - np.asarray(y, float)
    n = len(d)
    if n < 2:
        return float("nan"), float("nan"), float("nan")
    sd = d.std(ddof=1)
    if sd <= 0:
        return float("nan"), float(n - 1), float("nan")
    t = d.mean() / (sd / math.sqrt(n))
    return float(t), float(n - 1), float(2 * sps.t.sf(abs(t), n - 1))


def pooled_sd(x: Sequence[float], y: Sequence[float]) -> float:
    """Pooled within-group SD (df-weighted)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    n1, n2 = len(x), len(y)
    if n1 + n2 - 2 <= 0:
        return float("nan")
    s2 = ((n1 - 1) * (x.var(ddof=1) if n1 > 1 else 0.0)
          + (n2 - 1) * (y.var(ddof=1) if n2 > 1 else 0.0)) / (n1 + n2 - 2)
    return float(math.sqrt(s2))


def hedges_g(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Hedges' g of x vs y for independent groups and its sampling variance."""
    n1, n2 = len(x), len(y)
    sd = pooled_sd(x, y)
    if not np.isfinite(sd) or sd <= 0:
        return float("nan"), float("nan")
    diff = float(np.mean(x) - np.mean(y))
    g = diff / sd * hedges_j(n1 + n2 - 2)
    var = (n1 + n2) / (n1 * n2) + g ** 2 / (2 * (n1 + n2))
    return float(g), float(var)


def paired_hedges_g(x: Sequence[float], y: Sequence[float]) -> tuple[float, float, float]:
    """Hedges' g for matched pairs (SD within arms, not of the differences), its variance and r."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    n = len(x)
    if n < 2:
        return float("nan"), float("nan"), float("nan")
    sd = math.sqrt((x.var(ddof=1) + y.var(ddof=1)) / 2)
    if sd <= 0:
        return float("nan"), float("nan"), float("nan")
    r = float(np.corrcoef(x, y)[0, 1]) if x.std() > 0 and y.std() > 0 else 0.0
    r = float(np.clip(r, -0.99, 0.99))
    g = float((x - y).mean() / sd * hedges_j(n - 1))
    var = (1 / n + g ** 2 / (2 * n)) * 2 * (1 - r)
    return g, float(var), r


def logit_share(n: Sequence[float], total: Sequence[float], pseudocount: float = 0.5) -> np.ndarray:
    """Logit of a share with a pseudo-count: log((n + c) / (total - n + c))."""
    n, total = np.asarray(n, float), np.asarray(total, float)
    return np.log((n + pseudocount) / (total - n + pseudocount))


def bh(pvalues: Sequence[float]) -> np.ndarray:
    """Benjamini-Hochberg q-values; missing p-values stay missing and are not counted."""
    p = np.asarray(pvalues, float)
    q = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    m = int(ok.sum())
    if m == 0:
        return q
    pv = p[ok]
    order = np.argsort(pv)
    ranked = pv[order] * m / np.arange(1, m + 1)
    ranked = np.minimum.accumulate(ranked[::-1])[::-1]
    out = np.empty(m)
    out[order] = np.minimum(ranked, 1.0)
    q[ok] = out
    return q


@lru_cache(maxsize=4096)
def _noncentrality(df: float, alpha: float, power: float) -> float:
    """Noncentrality at which a two-sided t-test with ``df`` has the requested power."""
    from scipy.optimize import brentq

    crit = sps.t.ppf(1 - alpha / 2, df)

    def gap(delta: float) -> float:
        achieved = float(sps.nct.sf(crit, df, delta) + sps.nct.cdf(-crit, df, delta))
        return (achieved if np.isfinite(achieved) else 1.0) - power

    hi = 1.0
    while gap(hi) < 0 and hi < 1e4:
        hi *= 2
    return float(brentq(gap, 0.0, hi))


def mde_t(se_factor: float, df: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """Minimum detectable standardised effect of a t-test: the noncentrality reaching ``power``
    times ``se_factor`` (the effect's standard error in units of the residual SD)."""
    if not (np.isfinite(se_factor) and np.isfinite(df)) or df < 1 or se_factor <= 0:
        return float("nan")
    return float(_noncentrality(round(float(df), 6), alpha, power) * se_factor)


def mde(n1: int, n2: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest standardised difference (Cohen's d) a two-sided two-sample t-test detects."""
    if n1 < 2 or n2 < 2:
        return float("nan")
    return mde_t(math.sqrt(1 / n1 + 1 / n2), n1 + n2 - 2, alpha, power)


def mde_paired(n: int, r: float = 0.0, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest within-arm standardised difference a paired t-test of n pairs detects
    (the detectable d_z converted with the between-arm correlation r)."""
    if n < 2:
        return float("nan")
    return mde_t(1 / math.sqrt(n), n - 1, alpha, power) * math.sqrt(2 * (1 - r))


# --- one comparison -------------------------------------------------------------------------------

@dataclass
class Comparison:
    """Result of comparing one measure between two arms at the animal level."""

    n_arm: int = 0
    n_reference: int = 0
    mean_arm: float = float("nan")
    mean_reference: float = float("nan")
    effect: float = float("nan")
    hedges_g: float = float("nan")
    g_var: float = float("nan")
    ci_low: float = float("nan")
    ci_high: float = float("nan")
    p_value: float = float("nan")
    mde: float = float("nan")
    paired: bool = False
    test: str = ""
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["notes"] = "; ".join(self.notes)
        return d


def animal_values(df: pd.DataFrame, covariates: Sequence[str] = ()) -> pd.DataFrame:
    """Average the samples of one animal within one arm; covariates take the animal's first value."""
    groups: dict[tuple[str, str], list[int]] = {}
    arms, animals = df["arm"].astype(str).to_numpy(), df["animal"].astype(str).to_numpy()
    for i, key in enumerate(zip(arms, animals, strict=True)):
        groups.setdefault(key, []).append(i)
    values = df["value"].to_numpy(float)
    cov_values = {c: df[c].astype(str).to_numpy() for c in covariates}
    keys = sorted(groups)
    out = {"arm": [k[0] for k in keys], "animal": [k[1] for k in keys],
           "value": [float(values[groups[k]].mean()) for k in keys],
           "n_samples": [len(groups[k]) for k in keys]}
    for cov in covariates:
        out[cov] = [cov_values[cov][groups[k][0]] for k in keys]
    return pd.DataFrame(out, columns=["arm", "animal", "value", "n_samples", *covariates])


@dataclass
class OLSFit:
    """The arm coefficient of an OLS fit."""

    effect: float
    se: float
    p_value: float
    df_resid: float
    sigma: float
    covariates: list[str]
    arms: list[str]


def _dummies(labels: Sequence[str]) -> np.ndarray:
    """Treatment-coded indicator columns of a factor (first level in sorted order dropped)."""
    levels = sorted(set(labels))
    return np.array([[lab == lev for lev in levels[1:]] for lab in labels], float).reshape(
        len(labels), len(levels) - 1)


def fit_ols(animals: pd.DataFrame, arm: str, reference: str, covariates: Sequence[str] = ()
            ) -> tuple[OLSFit | None, list[str]]:
    """OLS ``value ~ arm (factor, reference as baseline) + covariates`` on animal values.

    Covariates that are constant, confounded with the arms (rank-deficient design) or leave
    fewer than 2 residual df are dropped, last first; returns (fit or None, notes)."""
    import statsmodels.api as sm

    notes: list[str] = []
    arm_labels = animals["arm"].astype(str).to_numpy()
    arms = [reference, arm, *sorted(set(arm_labels) - {arm, reference})]
    base = np.column_stack([np.ones(len(animals))] + [(arm_labels == a).astype(float)
                                                      for a in arms[1:]])
    used = [c for c in covariates if c in animals and animals[c].astype(str).nunique() > 1]
    while True:
        design = np.column_stack([base] + [_dummies(animals[c].astype(str).tolist())
                                           for c in used])
        df_resid = len(animals) - design.shape[1]
        full_rank = np.linalg.matrix_rank(design) == design.shape[1]
        if full_rank and (df_resid >= 2 or not used):
            break
        notes.append(f"covariate '{used[-1]}' not used (confounded with the arms or too few "
                     "animals)")
        used = used[:-1]
    if not full_rank or df_resid < 1:
        return None, notes
    fit = sm.OLS(animals["value"].to_numpy(float), design).fit()
    sigma = float(np.sqrt(fit.scale))
    if not np.isfinite(sigma) or sigma <= 0:
        return None, notes
    return OLSFit(float(fit.params[1]), float(fit.bse[1]), float(fit.pvalues[1]),
                  float(fit.df_resid), sigma, used, arms), notes


def compare_arms(df: pd.DataFrame, arm: str, reference: str, covariates: Sequence[str] = (),
                 alpha: float = 0.05, power: float = 0.8, min_n: int = 2,
                 pool_arms: bool = False) -> Comparison:
    """Compare ``value`` between two arms with animals as units.

    ``df`` has one row per sample with columns arm, animal, value (+ covariates); rows with a
    missing value are ignored. Paired when animals appear in both arms. Otherwise Welch's t-test,
    or, with ``covariates`` or ``pool_arms``, an OLS model whose arm coefficient is the effect;
    ``pool_arms`` fits it on the animals of every arm in ``df`` (arms as a factor), so the
    residual SD is pooled over all arms. No test is run (p stays NaN) when an arm has fewer than
    ``min_n`` animals (pairs); means and the raw effect are still reported.
    """
    arms = df["arm"].astype(str).to_numpy()
    values = df["value"].to_numpy(float)
    ok = np.isfinite(values)
    res = Comparison()
    if not (ok & ((arms == arm) | (arms == reference))).any():
        return res
    covariates = [c for c in covariates if c in df]
    animals = animal_values(df[ok], covariates)
    a = animals[animals["arm"] == arm].set_index("animal")
    b = animals[animals["arm"] == reference].set_index("animal")
    in_b = set(b.index)
    shared = [x for x in a.index if x in in_b]
    need = max(min_n, 2)
    if shared:
        res.paired = True
        dropped = len(a) + len(b) - 2 * len(shared)
        if dropped:
            res.notes.append(f"{dropped} animal(s) seen in one arm only left out of the paired test")
        x, y = a.loc[shared, "value"].to_numpy(), b.loc[shared, "value"].to_numpy()
        res.n_arm = res.n_reference = len(shared)
        res.mean_arm, res.mean_reference = float(x.mean()), float(y.mean())
        res.effect = float((x - y).mean())
        res.test = "paired t-test (animal as block)"
        if len(shared) >= need:
            _, _, res.p_value = paired_test(x, y)
            res.hedges_g, res.g_var, r = paired_hedges_g(x, y)
            res.mde = mde_paired(len(shared), r if np.isfinite(r) else 0.0, alpha, power)
    else:
        x, y = a["value"].to_numpy(), b["value"].to_numpy()
        n1, n2 = len(x), len(y)
        res.n_arm, res.n_reference = n1, n2
        res.mean_arm = float(x.mean()) if n1 else float("nan")
        res.mean_reference = float(y.mean()) if n2 else float("nan")
        res.effect = res.mean_arm - res.mean_reference
        res.test = "Welch t-test"
        if min(n1, n2) >= need:
            fit = None
            if covariates or pool_arms:
                rows = animals if pool_arms else animals[animals["arm"].isin([arm, reference])]
                fit, notes = fit_ols(rows.reset_index(drop=True), arm, reference, covariates)
                res.notes += notes
            if fit is not None:
                res.effect, res.p_value = fit.effect, fit.p_value
                terms = " + ".join(["arm", *fit.covariates])
                pooled = f", {len(fit.arms)} arms pooled" if len(fit.arms) > 2 else ""
                res.test = f"OLS value ~ {terms} (df {fit.df_resid:g}{pooled})"
                g = fit.effect / fit.sigma * hedges_j(fit.df_resid)
                factor = fit.se / fit.sigma
                res.hedges_g = float(g)
                res.g_var = float(factor ** 2 + g ** 2 / (2 * fit.df_resid))
                res.mde = mde_t(factor, fit.df_resid, alpha, power)
            else:
                _, _, res.p_value = welch_test(x, y)
                res.hedges_g, res.g_var = hedges_g(x, y)
                res.mde = mde(n1, n2, alpha, power)
    if np.isfinite(res.g_var):
        half = Z95 * math.sqrt(res.g_var)
        res.ci_low, res.ci_high = res.hedges_g - half, res.hedges_g + half
    return res


# --- meta-analysis --------------------------------------------------------------------------------

@dataclass
class MetaResult:
    """A random-effects pooled estimate."""

    k: int
    estimate: float
    se: float
    ci_low: float
    ci_high: float
    p_value: float
    tau2: float
    i2: float
    q: float
    q_p: float


def dersimonian_laird(effects: Sequence[float], variances: Sequence[float]) -> MetaResult:
    """DerSimonian-Laird random-effects meta-analysis of effects with known variances.

    With one study the pooled estimate is that study's; tau^2 is 0, and I^2, Q and its p-value
    are undefined (NaN).
    """
    y, v = np.asarray(effects, float), np.asarray(variances, float)
    ok = np.isfinite(y) & np.isfinite(v) & (v > 0)
    y, v = y[ok], v[ok]
    k = len(y)
    nan = float("nan")
    if k == 0:
        return MetaResult(0, nan, nan, nan, nan, nan, nan, nan, nan, nan)
    w = 1 / v
    fixed = float((w * y).sum() / w.sum())
    if k == 1:
        tau2, q, q_p, i2 = 0.0, nan, nan, nan
    else:
        q = float((w * (y - fixed) ** 2).sum())
        c = float(w.sum() - (w ** 2).sum() / w.sum())
        tau2 = max(0.0, (q - (k - 1)) / c) if c > 0 else 0.0
        q_p = float(sps.chi2.sf(q, k - 1))
        i2 = max(0.0, (q - (k - 1)) / q) if q > 0 else 0.0
    w_star = 1 / (v + tau2)
    est = float((w_star * y).sum() / w_star.sum())
    se = float(math.sqrt(1 / w_star.sum()))
    p = float(2 * sps.norm.sf(abs(est / se)))
    return MetaResult(k, est, se, est - Z95 * se, est + Z95 * se, p, float(tau2), i2, q, q_p)

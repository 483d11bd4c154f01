"""Sample-level statistics: designs, contrasts, share models, effect sizes, BH, TOST, meta-analysis.

The biological sample (animal or donor) is the unit of replication; cells never count as
replicates. What :mod:`livermsc.claims` builds on:

* **Designs** (:func:`build_design`): the units (animals) of the cells a contrast compares (arms,
  or arm x stage cells), treatment-coded with an intercept, plus a block per declared pair and a
  batch factor where one is recorded. The contrast is a vector on the cell means
  (``arm - reference``; an interaction ``(a - r)@s1 - (a - r)@s2``; a synergy
  ``combination - component1 - component2 + reference``). Batch is adjusted for when the contrast
  stays estimable with it; when it does not (batch nested in or equal to arm within the
  contrast) the design reports ``confounded`` and no test is run.
* **Linear contrasts of sample values** (:func:`linear_contrast`): OLS with the residual variance
  of each cell (group) kept apart and Welch-Satterthwaite df (``livermsc.geneset.score_model``),
  so that a quiet healthy arm never lends its small variance to an injured one.
* **Shares as counts** (:func:`quasibinomial_test`): a logistic model of the state's cells out
  of the parent's cells per animal, with extra-binomial variation by Williams' method (1982,
  *Appl Stat* 31:144): weights ``1 / (1 + (N_i - 1) phi)``, ``phi`` chosen so that Pearson's
  X^2 equals its df, scale floored at 1; t test on ``n - p`` df. The effect is the log odds ratio.
* **Effect sizes**: Hedges' g = estimate / sigma x J(df), sigma the residual SD of the same model;
  its CI inverts the noncentral t (``g = t f J``, ``f = se / sigma``), so that CI and p agree.
* **MDE** (:func:`mde_effect`) at any per-test alpha (the claims stage uses the BH step-up
  alpha a row needs, :func:`bh_alpha`), in the unit of the estimate.
* **TOST** (:func:`tost`): equivalence within +/- a smallest effect of interest.
* **Meta-analysis** (:func:`meta_reml_hk`): REML tau^2, Hartung-Knapp(-Sidik-Jonkman) interval
  on k - 1 df, and the prediction interval on k - 2 df (Higgins et al. 2009).
"""


from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache

import numpy as np
import pandas as pd
from scipy import stats as sps
from scipy.optimize import brentq

from livermsc.geneset import score_model

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
    crit = sps.t.ppf(1 - alpha / 2, df)

    def gap(delta: float) -> float:
        upper = float(sps.nct.sf(crit, df, delta))
        lower = float(sps.nct.cdf(-crit, df, delta))  # NaN far in the tail (scipy): ~0 there
        achieved = (upper if np.isfinite(upper) else 1.0) + (lower if np.isfinite(lower) else 0.0)
        return achieved - power

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




# --- t-based intervals, g and its noncentral-t interval, TOST ------------------------------------

def t_ci(estimate: float, se: float, df: float, level: float = 0.95) -> tuple[float, float]:
    """Two-sided t interval ``estimate +/- t_{df} se`` (excludes 0 exactly when p < 1 - level)."""
    if not (np.isfinite(estimate) and np.isfinite(se) and np.isfinite(df) and df > 0):
        return float("nan"), float("nan")
    q = float(sps.t.ppf(0.5 + level / 2, df))
    return float(estimate - q * se), float(estimate + q * se)


def t_pvalue(t: float, df: float) -> float:
    """Two-sided p-value of a t statistic."""
    if not (np.isfinite(t) and np.isfinite(df) and df > 0):
        return float("nan")
    return float(2 * sps.t.sf(abs(t), df))


def _nct_root(target: float, t: float, df: float, upper: bool) -> float:
    """Noncentrality delta with P(T >= t | delta) = target (upper) or P(T <= t | delta) = target."""
    def gap(delta: float) -> float:
        prob = float(sps.nct.sf(t, df, delta) if upper else sps.nct.cdf(t, df, delta))
        if not np.isfinite(prob):  # far tails: sf rises and cdf falls with delta
            prob = float((delta > t) == upper)
        return prob - target

    width = 5.0 + 2.0 * abs(t)
    lo, hi = t - width, t + width
    for _ in range(60):
        if gap(lo) * gap(hi) < 0:
            return float(brentq(gap, lo, hi, xtol=1e-10))
        lo, hi = lo - width, hi + width
    return float("nan")


def g_interval(t: float, df: float, factor: float, j: float, level: float = 0.95
               ) -> tuple[float, float]:
    """CI of Hedges' g = t * factor * J by inverting the noncentral t of the test statistic.

    ``factor`` is se / sigma of the model (sqrt(1/n1 + 1/n2) for two groups). At delta = 0 the
    noncentral t is the central t, so the interval excludes 0 exactly when p < 1 - level."""
    if not all(np.isfinite(v) for v in (t, df, factor, j)) or df <= 0 or factor <= 0:
        return float("nan"), float("nan")
    a = (1 - level) / 2
    lo = _nct_root(a, t, df, upper=True)
    hi = _nct_root(a, t, df, upper=False)
    return float(lo * factor * j), float(hi * factor * j)


def g_variance(g: float, factor: float, df: float) -> float:
    """Large-sample variance of g (Hedges & Olkin): factor^2 + g^2 / (2 df)."""
    if not all(np.isfinite(v) for v in (g, factor, df)) or df <= 0:
        return float("nan")
    return float(factor ** 2 + g ** 2 / (2 * df))


def tost(estimate: float, se: float, df: float, bound: float) -> float:
    """Two one-sided t tests of |effect| < bound: the larger of the two p-values."""
    if not all(np.isfinite(v) for v in (estimate, se, df, bound)) or se <= 0 or bound <= 0:
        return float("nan")
    p_low = sps.t.sf((estimate + bound) / se, df)    # H0: effect <= -bound
    p_high = sps.t.cdf((estimate - bound) / se, df)  # H0: effect >= +bound
    return float(max(p_low, p_high))


def mde_effect(se: float, df: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest true effect (in the unit of ``se``) that a two-sided t test on ``df`` df at
    level ``alpha`` detects with the requested power."""
    if not (np.isfinite(se) and np.isfinite(df) and np.isfinite(alpha)) or se <= 0 or df <= 0 \
            or not 0 < alpha < 1:
        return float("nan")
    return float(_noncentrality(round(float(df), 6), float(alpha), power) * se)


def bh_alpha(pvalues: Sequence[float], alpha: float) -> np.ndarray:
    """Per-test alpha each row needs under Benjamini-Hochberg at FDR ``alpha``.

    With m tested rows and R rejections, a rejected row needed p <= alpha R / m; any other row
    would need p <= alpha (R + 1) / m (the step-up threshold once it joins the rejections).
    Missing p-values get NaN and are not counted."""
    p = np.asarray(pvalues, float)
    out = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    m = int(ok.sum())
    if m == 0:
        return out
    q = bh(p)
    rejected = ok & (q < alpha)
    r = int(rejected.sum())
    out[ok] = alpha * (r + 1) / m
    out[rejected] = alpha * r / m
    return out


# --- designs --------------------------------------------------------------------------------------

@dataclass
class Design:
    """A design over units (animals), with the contrast of interest as a coefficient vector."""

    X: pd.DataFrame                 # units x terms, full rank, first column the intercept
    contrast: np.ndarray            # coefficient vector, c'b is the effect
    cells: list[str]                # cell of each unit (row of X)
    batch: str                      # adjusted, no batch recorded, single batch, ...
    paired: bool
    notes: list[str] = field(default_factory=list)
    reason: str = ""                # non-empty: not testable (e.g. batch confounded with arm)

    @property
    def df(self) -> int:
        return int(self.X.shape[0] - self.X.shape[1])


def _indicators(labels: Sequence[str], prefix: str, levels: Sequence[str]) -> pd.DataFrame:
    labels = np.asarray([str(v) for v in labels])
    return pd.DataFrame({f"{prefix}{lev}": (labels == lev).astype(float) for lev in levels})


def estimable(X: np.ndarray, c: np.ndarray, tol: float = 1e-8) -> bool:
    """True when c'b is estimable in the (possibly rank-deficient) design X (c in its row space)."""
    proj = np.linalg.pinv(X) @ X
    return bool(np.abs(c - c @ proj).max() <= tol * max(1.0, np.abs(c).max()))


def build_design(cells: Sequence[str], weights: dict[str, float], reference_cell: str,
                 batch: Sequence[str] | None = None, pairs: Sequence[str] | None = None,
                 index: Sequence[str] | None = None) -> Design:
    """Treatment-coded design of units in ``cells`` with a contrast on the cell means.

    ``weights`` maps cell -> weight of its mean in the contrast (sum 0); ``reference_cell`` is
    the intercept. ``pairs`` (declared pairing) adds a block per pair (give only pairs seen in
    at least two cells: a singleton's block absorbs it); ``batch`` adds batch indicators (first level dropped) when the contrast stays
    estimable with every batch effect in the model, else the design carries the reason
    ``batch confounded with arm``. Batch values ``None`` mean that no batch was recorded.
    """
    cells = [str(c) for c in cells]
    n = len(cells)
    index = [str(i) for i in (index if index is not None else range(n))]
    levels = [reference_cell, *sorted(set(cells) - {reference_cell})]
    X = pd.DataFrame({"intercept": np.ones(n)}, index=index)
    for lev in levels[1:]:
        X[f"cell:{lev}"] = (np.asarray(cells) == lev).astype(float)
    c = np.array([0.0] + [float(weights.get(lev, 0.0)) for lev in levels[1:]])
    notes: list[str] = []
    paired = False
    if pairs is not None:
        pair_levels = sorted(set(pairs))
        blocks = _indicators(pairs, "pair:", pair_levels[1:])
        blocks.index = index
        X = pd.concat([X, blocks], axis=1)
        c = np.concatenate([c, np.zeros(blocks.shape[1])])
        paired = True
    status = "no batch recorded"
    if batch is not None and all(b is not None for b in batch):
        values = [str(b) for b in batch]
        n_levels = len(set(values))
        if n_levels == 1:
            status = "single batch"
        elif n_levels == n:
            status = "one batch per animal (part of the between-animal variance)"
        else:
            levs = sorted(set(values))
            dummies = _indicators(values, "batch:", levs[1:])
            dummies.index = index
            full = pd.concat([X, dummies], axis=1)
            c_full = np.concatenate([c, np.zeros(dummies.shape[1])])
            if not estimable(full.to_numpy(), c_full):
                return Design(X, c, cells, "confounded with arm", paired, notes,
                              "batch confounded with arm")
            kept = X
            rank = np.linalg.matrix_rank(kept.to_numpy())
            for col in dummies:
                trial = pd.concat([kept, dummies[[col]]], axis=1)
                r = np.linalg.matrix_rank(trial.to_numpy())
                if r > rank:
                    kept, rank = trial, r
            added = kept.shape[1] - X.shape[1]
            if added:
                X = kept
                c = np.concatenate([c, np.zeros(added)])
                status = "adjusted"
            else:
                status = "absorbed by the pair blocks" if paired else "single batch"
    return Design(X, c, cells, status, paired, notes)


# --- linear contrast of sample values -------------------------------------------------------------

@dataclass
class ContrastFit:
    """One contrast of one model: estimate, SE, df, t, p and the residual SD (g's standardiser)."""

    estimate: float = float("nan")
    se: float = float("nan")
    df: float = float("nan")
    t: float = float("nan")
    p_value: float = float("nan")
    sigma: float = float("nan")
    factor: float = float("nan")    # se / sigma
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["notes"] = "; ".join(self.notes)
        return d


def linear_contrast(y: Sequence[float], design: Design, group_variances: bool = True
                    ) -> ContrastFit:
    """OLS of unit values on the design; c'b with per-cell residual variances (Welch-
    Satterthwaite df) or, with ``group_variances=False``, the pooled residual variance."""
    y = np.asarray(y, float)
    X = design.X.to_numpy(float)
    if X.shape[0] - X.shape[1] < 1:
        return ContrastFit(notes=["no residual degrees of freedom"])
    notes: list[str] = []
    fit = score_model(y, X, design.contrast, design.cells if group_variances else None,
                      "group" if group_variances else "pooled", notes)
    out = ContrastFit(fit.estimate, fit.se, fit.df, notes=notes)
    if not (np.isfinite(fit.se) and fit.se > 0):
        out.notes.append("no variation between animals: the test is undefined")
        return out
    out.t = fit.estimate / fit.se
    out.p_value = t_pvalue(out.t, fit.df)
    xtx_inv = np.linalg.inv(X.T @ X)
    out.factor = float(np.sqrt(design.contrast @ xtx_inv @ design.contrast))
    out.sigma = fit.se / out.factor
    return out


# --- shares: quasi-binomial GLM with Williams' extra-binomial variation ---------------------------

def _irls_logit(n: np.ndarray, N: np.ndarray, X: np.ndarray, prior: np.ndarray,
                max_iter: int = 100, tol: float = 1e-10) -> tuple[np.ndarray, np.ndarray, bool]:
    """Weighted binomial logistic regression by IRLS: (coefficients, fitted probabilities, ok)."""
    y = n / N
    mu = np.clip((n + 0.5) / (N + 1.0), 1e-6, 1 - 1e-6)
    eta = np.log(mu / (1 - mu))
    beta = np.linalg.lstsq(X, eta, rcond=None)[0]
    for _ in range(max_iter):
        eta = X @ beta
        mu = 1 / (1 + np.exp(-eta))
        var = np.clip(mu * (1 - mu), 1e-12, None)
        w = prior * N * var
        z = eta + (y - mu) / var
        xw = X.T * w
        new = np.linalg.solve(xw @ X, xw @ z)
        if np.max(np.abs(new - beta)) < tol:
            beta = new
            break
        beta = new
    mu = 1 / (1 + np.exp(-(X @ beta)))
    return beta, mu, bool(np.all(np.isfinite(beta)) and np.max(np.abs(beta)) < 30)


def _pearson(n: np.ndarray, N: np.ndarray, mu: np.ndarray, prior: np.ndarray) -> float:
    return float((prior * (n - N * mu) ** 2 / (N * mu * (1 - mu))).sum())


@dataclass
class ShareFit(ContrastFit):
    """A share contrast: the estimate is a log odds ratio."""

    phi: float = float("nan")       # Williams' intra-animal correlation of cells
    scale: float = float("nan")


def quasibinomial_test(n: Sequence[float], N: Sequence[float], design: Design) -> ShareFit:
    """Log odds ratio c'b of a state's cells ``n`` out of parent cells ``N`` per unit.

    Binomial GLM (logit link) with Williams' extra-binomial variation: prior weights
    ``1 / (1 + (N_i - 1) phi)``, ``phi`` in [0, 1] solving Pearson X^2 = n - p (phi = 0 when X^2
    is already below its df); the covariance is scale x (X'WX)^-1 with the scale X^2 / df floored
    at 1, and the t test uses n - p df. A cell with no state cells at all (or only state cells)
    makes the estimate infinite: then every unit gets 0.5 state and 0.5 other cells added (noted).
    ``factor`` is sqrt(c'(X'X)^-1 c), so that g = t factor J is on the scale of an animal's SD.
    """
    n, N = np.asarray(n, float), np.asarray(N, float)
    X = design.X.to_numpy(float)
    c = design.contrast
    out = ShareFit()
    df = X.shape[0] - X.shape[1]
    if df < 1:
        out.notes.append("no residual degrees of freedom")
        return out
    cells = np.asarray(design.cells)
    for cell in dict.fromkeys(design.cells):
        sel = cells == cell
        if n[sel].sum() == 0 or n[sel].sum() == N[sel].sum():
            n, N = n + 0.5, N + 1.0
            out.notes.append("a compared arm has no (or only) state cells: 0.5 cells added to "
                             "state and rest of every animal")
            break

    def pearson_at(phi: float) -> tuple[float, np.ndarray, np.ndarray, bool]:
        prior = 1 / (1 + (N - 1) * phi)
        beta, mu, ok = _irls_logit(n, N, X, prior)
        return _pearson(n, N, mu, prior), beta, prior, ok

    x2, beta, prior, ok = pearson_at(0.0)
    phi = 0.0
    if ok and x2 > df:
        x2_max = pearson_at(1.0)[0]
        if x2_max > df:
            phi = 1.0
        else:
            phi = float(brentq(lambda f: pearson_at(f)[0] - df, 0.0, 1.0, xtol=1e-8))
        x2, beta, prior, ok = pearson_at(phi)
    if not ok:
        out.notes.append("the share model did not converge")
        return out
    mu = 1 / (1 + np.exp(-(X @ beta)))
    w = prior * N * mu * (1 - mu)
    cov = np.linalg.inv((X.T * w) @ X)
    scale = max(1.0, x2 / df)
    out.estimate = float(c @ beta)
    out.se = float(np.sqrt(scale * (c @ cov @ c)))
    out.df = float(df)
    out.phi, out.scale = phi, scale
    if not (np.isfinite(out.se) and out.se > 0):
        return out
    out.t = out.estimate / out.se
    out.p_value = t_pvalue(out.t, df)
    out.factor = float(np.sqrt(c @ np.linalg.inv(X.T @ X) @ c))
    out.sigma = out.se / out.factor
    return out


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
    pi_low: float = float("nan")
    pi_high: float = float("nan")
    method: str = ""


def _usable(effects: Sequence[float], variances: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Study effects and variances with the missing or non-positive-variance ones left out."""
    y, v = np.asarray(effects, float), np.asarray(variances, float)
    ok = np.isfinite(y) & np.isfinite(v) & (v > 0)
    return y[ok], v[ok]


def _q_stats(y: np.ndarray, v: np.ndarray) -> tuple[float, float, float]:
    """Cochran's Q, its p-value and I^2 (fixed-effect weights)."""
    k = len(y)
    if k < 2:
        return float("nan"), float("nan"), float("nan")
    w = 1 / v
    fixed = float((w * y).sum() / w.sum())
    q = float((w * (y - fixed) ** 2).sum())
    i2 = max(0.0, (q - (k - 1)) / q) if q > 0 else 0.0
    return q, float(sps.chi2.sf(q, k - 1)), i2


def dersimonian_laird(effects: Sequence[float], variances: Sequence[float]) -> MetaResult:
    """DerSimonian-Laird random-effects meta-analysis with a Wald z interval (reference only:
    anti-conservative with few studies; the claims stage uses :func:`meta_reml_hk`)."""
    y, v = _usable(effects, variances)
    k = len(y)
    nan = float("nan")
    if k == 0:
        return MetaResult(0, nan, nan, nan, nan, nan, nan, nan, nan, nan)
    w = 1 / v
    q, q_p, i2 = _q_stats(y, v)
    if k == 1:
        tau2 = 0.0
    else:
        c = float(w.sum() - (w ** 2).sum() / w.sum())
        tau2 = max(0.0, (q - (k - 1)) / c) if c > 0 else 0.0
    w_star = 1 / (v + tau2)
    est = float((w_star * y).sum() / w_star.sum())
    se = float(math.sqrt(1 / w_star.sum()))
    p = float(2 * sps.norm.sf(abs(est / se)))
    return MetaResult(k, est, se, est - Z95 * se, est + Z95 * se, p, float(tau2), i2, q, q_p,
                      method="DerSimonian-Laird, Wald z")


def reml_tau2(effects: Sequence[float], variances: Sequence[float], tol: float = 1e-10,
              max_iter: int = 1000) -> float:
    """REML estimate of the between-study variance tau^2 (Fisher scoring, truncated at 0)."""
    y, v = np.asarray(effects, float), np.asarray(variances, float)
    if len(y) < 2:
        return 0.0
    tau2 = max(0.0, float(np.var(y, ddof=1) - v.mean()))
    for _ in range(max_iter):
        w = 1 / (v + tau2)
        mu = float((w * y).sum() / w.sum())
        new = float((w ** 2 * ((y - mu) ** 2 - v)).sum() / (w ** 2).sum() + 1 / w.sum())
        new = max(0.0, new)
        if abs(new - tau2) < tol:
            return new
        tau2 = new
    return tau2


def meta_reml_hk(effects: Sequence[float], variances: Sequence[float], level: float = 0.95,
                 tau2: float | None = None) -> MetaResult:
    """Random-effects pooling for few studies: REML tau^2, Hartung-Knapp-Sidik-Jonkman SE and
    t interval on k - 1 df, and the prediction interval on k - 2 df (k >= 3).

    One study: its own estimate (SE sqrt(v), normal interval), tau^2 0, nothing else defined.
    ``tau2`` fixes the between-study variance instead of estimating it (REML)."""
    y, v = _usable(effects, variances)
    k = len(y)
    nan = float("nan")
    if k == 0:
        return MetaResult(0, nan, nan, nan, nan, nan, nan, nan, nan, nan)
    if k == 1:
        se = float(math.sqrt(v[0]))
        z = float(sps.norm.ppf(0.5 + level / 2))
        return MetaResult(1, float(y[0]), se, float(y[0] - z * se), float(y[0] + z * se),
                          float(2 * sps.norm.sf(abs(y[0] / se))), 0.0, nan, nan, nan,
                          method="one study")
    tau2 = reml_tau2(y, v) if tau2 is None else float(tau2)
    w = 1 / (v + tau2)
    est = float((w * y).sum() / w.sum())
    q_hk = float((w * (y - est) ** 2).sum() / (k - 1))
    se = float(math.sqrt(q_hk / w.sum()))
    crit = float(sps.t.ppf(0.5 + level / 2, k - 1))
    p = float(2 * sps.t.sf(abs(est / se), k - 1)) if se > 0 else nan
    q, q_p, i2 = _q_stats(y, v)
    pi_low = pi_high = nan
    if k >= 3:
        half = float(sps.t.ppf(0.5 + level / 2, k - 2)) * math.sqrt(tau2 + se ** 2)
        pi_low, pi_high = est - half, est + half
    return MetaResult(k, est, se, est - crit * se, est + crit * se, p, tau2, i2, q, q_p,
                      pi_low, pi_high, method="REML tau^2, Hartung-Knapp t")

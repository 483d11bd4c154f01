"""Signature (gene-set) test on the pseudobulk counts of one population.

One model gives the p-value, the effect and its standard error, so that a t-based confidence
interval around the effect agrees with the p-value exactly:

1. **Size factors.** TMM normalisation factors (Robinson & Oshlack 2010, *Genome Biol* 11:R25)
   on all genes of the population's pseudobulk, over the samples of the design. The effective
   library size (library size x factor) removes composition shifts: when one programme takes
   10 % of a population's UMIs in one arm, every other gene's plain CPM falls, its TMM-CPM does
   not.
2. **Expression filter**, in the spirit of edgeR's ``filterByExpr`` (Chen, Lun & Smyth 2016,
   *F1000Research* 5:1438) and judged against the smallest group: a gene is kept when its pooled
   abundance would give ``min_count x n_min / n`` counts in the *smallest* library (``n_min``:
   the smallest group) and it has ``min_total_count`` counts in all. Two changes to edgeR's
   rule, for reasons measured in simulation: edgeR judges counts at the median library, so with
   libraries of very different size (15 cells vs 60-200) a small population's genes enter with
   one or two counts, where every log transform is biased by library size (log2(y + 0.5) is
   0.24 too high at a Poisson mean of 1, 0.04 at 2, < 0.005 from 3); and it thresholds every
   sample's own CPM, so the noisy small libraries pass by chance, a selection that adds to that
   bias. With signature genes at 0.05-0.2 UMI/cell, edgeR's rule tested a third of such 3 vs 3
   nulls with a median log2 fold change of -0.16 (the small arm "up"); this filter tests none
   of them (too few counts to say anything). Judging the pooled abundance, close to independent
   of the contrast under the null, at the smallest library avoids both; for
   equal libraries it keeps what ``filterByExpr`` keeps for a gene at ``min_count`` counts in
   the smallest group's samples and absent elsewhere.
3. **voom.** log2-CPM with the effective library sizes and a precision weight for every
   observation from the mean-variance trend of all kept genes (Law, Chen, Shi & Smyth 2014,
   *Genome Biol* 15:R29). Low-count observations (a small population in a sample) get small
   weights.
4. **One value per sample.** The signature score of sample *j* is the precision-weighted mean,
   over the signature's kept genes *g*, of the gene's log2-CPM centred on that gene's weighted
   mean across the samples: ``s_j = sum_g w_gj (E_gj - m_g) / sum_g w_gj``. Its unit is log2
   expression relative to the population's average, so a difference of scores is the log2 fold
   change of the signature (the precision-weighted mean of its genes' log2 fold changes).
5. **Linear model on the score.** Ordinary least squares of ``s`` on the design; the estimate is
   ``c' b`` for the coefficient or contrast ``c``. With ``group`` given (and
   ``variance="group"``) the residual variance is estimated per group and the standard error is
   the sandwich ``c'(X'X)^-1 X' diag(sigma^2_group) X (X'X)^-1 c`` with Welch–Satterthwaite
   degrees of freedom; for two groups and an intercept + group design this is Welch's t test,
   and for a paired design it is the paired t test. With ``variance="pooled"`` it is the usual
   OLS t test (one residual variance, ``n - p`` df). ``p = 2 * t.sf(|estimate / se|, df)``.

Why a sample-level score and not a per-gene test combined afterwards: genes of a programme share
animal-level variation (correlation ~0.5 is common), so per-gene statistics are not independent;
a score per animal carries that correlation into its own residual variance, exactly as the
self-contained rotation tests do (roast, Wu et al. 2010, *Bioinformatics* 26:2176; fry, Giner &
Smyth 2016, *F1000Research* 5:2605, poster; limma's ``fry``). Without weights and with pooled
variance the score t test is identical to limma's ``fry`` directional test of the set with
``standardize="none"`` (tests/test_geneset.py checks this), so the test is fry's set statistic
expressed in log2 units, with voom's precision weights inside the score and, by default, the
residual variance of each arm kept apart (injured livers vary more than healthy ones).

Libraries: ``pyedger`` (TMM, ``filter_by_expr``) and ``pylimma`` (``voom``, ``fry``), ports of
edgeR and limma; tests/test_geneset.py checks them against the published formulas.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyedger
import pylimma
from scipy import stats

METHOD = "TMM + expression filter + voom (edgeR/limma); weighted signature score; OLS"
VARIANCE_MODES = ("group", "pooled")
MIN_TREND_GENES = 10  # fewer kept genes: voom's mean-variance trend is not fitted (unit weights)


@dataclass
class SetTest:
    """Result of one signature test (see the module docstring for the model)."""

    method: str
    estimate: float
    se: float
    df: float
    t: float
    p_value: float
    sigma: float
    n_genes_used: int
    genes_used: list[str]
    sample_scores: pd.Series
    notes: list[str] = field(default_factory=list)


@dataclass
class VoomScores:
    """Per-sample signature scores of one population and what went into them."""

    scores: pd.DataFrame            # samples x signatures (NaN where a signature has too few genes)
    genes_used: dict[str, list[str]]
    n_found: dict[str, int]
    n_kept_total: int               # genes of the population passing the expression filter
    norm_factors: pd.Series
    notes: list[str]


# --- building blocks ------------------------------------------------------------------------------

def tmm_factors(counts: pd.DataFrame) -> pd.Series:
    """TMM normalisation factors (edgeR ``calcNormFactors``, via pyedger), one per sample."""
    f = pyedger.calc_norm_factors(counts.to_numpy(dtype=float), method="TMM")
    return pd.Series(np.asarray(f, float), index=counts.columns, name="norm_factor")


def expression_filter(counts: pd.DataFrame, lib_size: np.ndarray, group: Sequence | None = None,
                      design: pd.DataFrame | None = None, min_count: float = 10.0,
                      min_total_count: float = 15.0) -> pd.Series:
    """True for the genes kept: enough counts expected in the smallest library.

    A gene is kept when its pooled abundance (its counts over the sum of the effective library
    sizes: the Poisson estimate of a common proportion) would give at least
    ``min_count * n_min / n`` counts in the smallest effective library, and it has
    ``min_total_count`` counts in all. ``n_min`` is the size of the smallest group (``group``), else ``1 / max(hat value)`` of
    ``design``, as in ``filterByExpr``; with equal libraries the rule keeps what ``filterByExpr``
    keeps for a gene at ``min_count`` in the smallest group's samples and absent elsewhere.

    Unlike ``filterByExpr``, which thresholds every sample's own CPM, the decision rests on the
    average abundance, which is (nearly) independent of the contrast under the null; and it is
    judged at the smallest library, so that no sample's log-CPM is taken from the one or two
    counts where any log transform is biased by library size.
    """
    y = counts.to_numpy(dtype=float)
    lib = np.asarray(lib_size, dtype=float)
    n = y.shape[1]
    if group is not None:
        n_min = float(pd.Series([str(g) for g in group]).value_counts().min())
    elif design is not None:
        X = design.to_numpy(dtype=float)
        n_min = 1.0 / float(np.max(np.einsum("ij,jk,ik->i", X, np.linalg.pinv(X.T @ X), X)))
    else:
        n_min = float(n)
    expected = y.sum(axis=1) / lib.sum() * lib.min()   # pooled abundance x smallest library
    keep = (expected >= min_count * n_min / n - 1e-12) & (y.sum(axis=1) >= min_total_count - 1e-12)
    return pd.Series(keep, index=counts.index, name="keep")


def filter_by_expr(counts: pd.DataFrame, lib_size: np.ndarray, group: Sequence | None = None,
                   min_count: float = 10.0, min_total_count: float = 15.0) -> pd.Series:
    """edgeR's own ``filterByExpr`` (pyedger), kept for comparison (see ``expression_filter``)."""
    keep = pyedger.filter_by_expr(counts, group=None if group is None else [str(g) for g in group],
                                  lib_size=np.asarray(lib_size, float), min_count=min_count,
                                  min_total_count=min_total_count)
    return pd.Series(np.asarray(keep, bool), index=counts.index, name="keep")


def voom_weights(counts: pd.DataFrame, design: np.ndarray, lib_size: np.ndarray,
                 notes: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """voom log2-CPM and precision weights (pylimma) of ``counts`` (genes x samples)."""
    if counts.shape[0] < MIN_TREND_GENES:
        lib = np.asarray(lib_size, float)
        E = np.log2((counts.to_numpy(float) + 0.5) / (lib[None, :] + 1) * 1e6)
        notes.append(f"only {counts.shape[0]} genes pass the expression filter: no voom "
                     "mean-variance trend, unit weights")
        return (pd.DataFrame(E, index=counts.index, columns=counts.columns),
                pd.DataFrame(1.0, index=counts.index, columns=counts.columns))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = pylimma.voom(counts.to_numpy(float), design, lib_size=np.asarray(lib_size, float))
    notes.extend(f"voom: {w.message}" for w in caught)
    return (pd.DataFrame(out["E"], index=counts.index, columns=counts.columns),
            pd.DataFrame(out["weights"], index=counts.index, columns=counts.columns))


def weighted_score(E: pd.DataFrame, W: pd.DataFrame) -> pd.Series:
    """Precision-weighted mean over genes (rows) of log2-CPM centred per gene (weighted mean).

    ``s_j = sum_g W_gj (E_gj - m_g) / sum_g W_gj`` with ``m_g = sum_j W_gj E_gj / sum_j W_gj``:
    log2 expression relative to the gene's average, averaged over the signature's genes.
    """
    e, w = E.to_numpy(float), W.to_numpy(float)
    m = (w * e).sum(axis=1, keepdims=True) / w.sum(axis=1, keepdims=True)
    s = (w * (e - m)).sum(axis=0) / w.sum(axis=0)
    return pd.Series(s, index=E.columns, name="score")


@dataclass
class LinearFit:
    """Estimate, standard error, df and residual SD of one contrast of a linear model."""

    estimate: float
    se: float
    df: float
    sigma: float
    variance: str


def score_model(y: np.ndarray, X: np.ndarray, c: np.ndarray, group: Sequence | None = None,
                variance: str = "group", notes: list[str] | None = None) -> LinearFit:
    """OLS of ``y`` on ``X``; the contrast ``c'b`` with a pooled or per-group residual variance.

    Per group ``k``: ``sigma^2_k = RSS_k / df_k`` with ``df_k = n_k - sum_{i in k} h_ii``;
    ``se^2 = sum_k a_k sigma^2_k`` with ``a_k = sum_{i in k} (c'(X'X)^-1 x_i)^2`` and
    Satterthwaite df ``se^4 / sum_k (a_k sigma^2_k)^2 / df_k``. A group whose ``df_k`` is below
    0.5 makes the fit fall back to the pooled variance (noted).
    """
    notes = [] if notes is None else notes
    n, p = X.shape
    XtX_inv = np.linalg.inv(X.T @ X)
    beta = XtX_inv @ X.T @ y
    resid = y - X @ beta
    df_res = n - p
    sigma2 = float(resid @ resid) / df_res
    est = float(c @ beta)
    lev = np.einsum("ij,jk,ik->i", X, XtX_inv, X)
    a = (X @ XtX_inv @ c) ** 2                      # contribution of each sample to Var(c'b)
    pooled = LinearFit(est, float(np.sqrt(sigma2 * (c @ XtX_inv @ c))), float(df_res),
                       float(np.sqrt(sigma2)), "pooled")
    if variance == "pooled" or group is None:
        return pooled
    g = np.asarray([str(v) for v in group])
    terms, dfs = [], []
    for level in dict.fromkeys(g):
        sel = g == level
        df_k = float(sel.sum() - lev[sel].sum())
        a_k = float(a[sel].sum())
        if a_k <= 1e-12 * float(a.sum()):
            continue                                # group does not enter the contrast
        if df_k < 0.5:
            notes.append(f"group {level!r} leaves {df_k:.2g} residual df: pooled residual "
                         "variance used")
            return pooled
        terms.append(a_k * float(resid[sel] @ resid[sel]) / df_k)
        dfs.append(df_k)
    se2 = float(sum(terms))
    if se2 <= 0:
        return LinearFit(est, 0.0, pooled.df, pooled.sigma, "group")
    df = se2 ** 2 / sum(t ** 2 / d for t, d in zip(terms, dfs, strict=True))
    return LinearFit(est, float(np.sqrt(se2)), float(df), pooled.sigma, "group")


def t_test(fit: LinearFit) -> tuple[float, float]:
    """t statistic and two-sided p-value of a fit (NaN when the SE is zero or undefined)."""
    if not (np.isfinite(fit.se) and fit.se > 0 and np.isfinite(fit.df) and fit.df > 0):
        return float("nan"), float("nan")
    t = fit.estimate / fit.se
    return float(t), float(2 * stats.t.sf(abs(t), fit.df))


def t_interval(estimate: float, se: float, df: float, level: float = 0.95) -> tuple[float, float]:
    """Two-sided t confidence interval; excludes 0 exactly when ``p < 1 - level``."""
    q = float(stats.t.ppf(0.5 + level / 2, df))
    return estimate - q * se, estimate + q * se


# --- checks ---------------------------------------------------------------------------------------

def _check_inputs(counts: pd.DataFrame, design: pd.DataFrame, coef: str | Sequence[float],
                  group: Sequence | None) -> tuple[pd.DataFrame, np.ndarray, list | None]:
    """Validate the arguments; return the design ordered like the counts' columns and ``c``."""
    if not isinstance(counts, pd.DataFrame):
        raise ValueError("counts: expected a pandas DataFrame, genes x samples")
    if not isinstance(design, pd.DataFrame):
        raise ValueError("design: expected a pandas DataFrame, samples x terms")
    if counts.columns.has_duplicates or counts.index.has_duplicates:
        raise ValueError("counts: sample (column) and gene (row) names must be unique")
    missing = [s for s in counts.columns if s not in design.index]
    if missing or len(design.index) != counts.shape[1]:
        raise ValueError(f"design: rows must be the counts' columns (missing: {missing[:5]}, "
                         f"{len(design.index)} rows for {counts.shape[1]} samples)")
    design = design.loc[counts.columns]
    X = design.to_numpy(dtype=float)
    if not np.isfinite(X).all():
        raise ValueError("design: contains NaN or infinite values")
    if np.linalg.matrix_rank(X) < X.shape[1]:
        raise ValueError(f"design: not of full rank (rank {np.linalg.matrix_rank(X)} for "
                         f"{X.shape[1]} columns {list(design.columns)})")
    if isinstance(coef, str):
        if coef not in design.columns:
            raise ValueError(f"coef: {coef!r} is not a design column {list(design.columns)}")
        c = (design.columns == coef).astype(float)
    else:
        c = np.asarray(coef, dtype=float)
        if c.shape != (X.shape[1],) or not np.isfinite(c).all() or not c.any():
            raise ValueError(f"coef: a contrast needs {X.shape[1]} finite values, not all zero "
                             f"(design columns {list(design.columns)})")
    vals = np.asarray(counts.to_numpy(dtype=float))
    if not np.isfinite(vals).all() or (vals < 0).any():
        raise ValueError("counts: expected non-negative finite counts")
    groups = None
    if group is not None:
        groups = [str(g) for g in group]
        if len(groups) != counts.shape[1]:
            raise ValueError(f"group: {len(groups)} values for {counts.shape[1]} samples")
    return design, c, groups


def _nan_result(notes: list[str], samples: pd.Index, genes_used: Sequence[str] = (),
                method: str = METHOD) -> SetTest:
    nan = float("nan")
    return SetTest(method, nan, nan, nan, nan, nan, nan, len(genes_used), list(genes_used),
                   pd.Series(np.nan, index=samples, name="score"), notes)


# --- the test -------------------------------------------------------------------------------------

def signature_test(counts: pd.DataFrame, design: pd.DataFrame, coef: str | Sequence[float],
                   genes: Sequence[str], group: Sequence[str] | None = None,
                   min_count: float = 10.0, min_total_count: float = 15.0,
                   min_genes: int = 3, variance: str = "group") -> SetTest:
    """Test a signature for the coefficient or contrast ``coef`` of ``design``.

    ``counts``: pseudobulk summed counts of one population, genes x samples (only the samples
    to compare, all genes); ``design``: samples x terms, full rank; ``group``: sample groups for
    the expression filter's smallest-group rule and (``variance="group"``) the per-group residual
    variances. Data conditions (too few genes, no residual df) give NaN results with a note;
    programming errors (rank-deficient design, unknown coefficient) raise ``ValueError``.
    """
    if variance not in VARIANCE_MODES:
        raise ValueError(f"variance: {variance!r} (expected one of {list(VARIANCE_MODES)})")
    design, c, groups = _check_inputs(counts, design, coef, group)
    notes: list[str] = []
    X = design.to_numpy(dtype=float)
    n, p = X.shape
    genes = list(dict.fromkeys(str(g) for g in genes))
    found = [g for g in genes if g in counts.index]
    if len(found) < len(genes):
        notes.append(f"{len(genes) - len(found)} of {len(genes)} signature genes not in the data")
    if n - p < 1:
        notes.append(f"no residual degrees of freedom ({n} samples, {p} design terms)")
        return _nan_result(notes, counts.columns)
    lib = counts.sum(axis=0).to_numpy(dtype=float)
    if (lib <= 0).any():
        empty = list(counts.columns[lib <= 0])
        notes.append(f"samples without counts: {empty}")
        return _nan_result(notes, counts.columns)
    nf = tmm_factors(counts).to_numpy()
    eff = lib * nf
    keep = expression_filter(counts, eff, groups, design, min_count, min_total_count)
    used = [g for g in found if keep[g]]
    notes.append(f"{len(used)} of {len(found)} signature genes kept by the expression filter")
    if len(used) < min_genes:
        notes.append(f"fewer than min_genes = {min_genes} signature genes kept: not tested")
        return _nan_result(notes, counts.columns, used)
    E, W = voom_weights(counts.loc[keep.to_numpy()], X, eff, notes)
    score = weighted_score(E.loc[used], W.loc[used])
    fit = score_model(score.to_numpy(), X, c, groups, variance, notes)
    t, pval = t_test(fit)
    if not np.isfinite(pval):
        notes.append("no variation of the score between animals: the test is undefined")
    kind = ("per-group variances, Welch-Satterthwaite df" if fit.variance == "group"
            else "pooled variance")
    method = f"{METHOD} ({kind})"
    return SetTest(method, fit.estimate, fit.se, fit.df, t, pval, fit.sigma, len(used), used,
                   score, notes)


# --- scores for figures ---------------------------------------------------------------------------

def signature_scores(counts: pd.DataFrame, design: pd.DataFrame,
                     gene_sets: Mapping[str, Sequence[str]], group: Sequence[str] | None = None,
                     min_count: float = 10.0, min_total_count: float = 15.0,
                     min_genes: int = 3, voom: bool = True) -> VoomScores:
    """The per-sample score that :func:`signature_test` uses, for several signatures at once.

    Computed on all samples given (TMM, filter and voom weights over them), e.g. every sample of
    a study for one population, with ``design`` the arms. ``voom=False``: only the size factors
    and the genes kept (no scores).
    """
    design, _, groups = _check_inputs(counts, design, design.columns[0], group)
    notes: list[str] = []
    X = design.to_numpy(dtype=float)
    out = pd.DataFrame(np.nan, index=counts.columns, columns=list(gene_sets), dtype=float)
    used: dict[str, list[str]] = {sid: [] for sid in gene_sets}
    n_found = {sid: sum(g in counts.index for g in dict.fromkeys(genes))
               for sid, genes in gene_sets.items()}
    lib = counts.sum(axis=0).to_numpy(dtype=float)
    if counts.shape[1] < 2 or (lib <= 0).any():
        notes.append("fewer than 2 samples, or samples without counts: no scores")
        return VoomScores(out, used, n_found, 0, pd.Series(np.nan, index=counts.columns), notes)
    nf = tmm_factors(counts)
    eff = lib * nf.to_numpy()
    keep = expression_filter(counts, eff, groups, design, min_count, min_total_count)
    kept_genes = set(counts.index[keep.to_numpy()])
    for sid, genes in gene_sets.items():
        used[sid] = [g for g in dict.fromkeys(genes) if g in kept_genes]
    if not voom:
        return VoomScores(out, used, n_found, int(keep.sum()), nf, notes)
    E, W = voom_weights(counts.loc[keep.to_numpy()], X, eff, notes)
    for sid, kept in used.items():
        if len(kept) >= min_genes:
            out[sid] = weighted_score(E.loc[kept], W.loc[kept]).to_numpy()
    return VoomScores(out, used, n_found, int(keep.sum()), nf, notes)

"""Per-sample quality control: QC metrics, adaptive (MAD) outlier thresholds, doublets, filters.

Follows the single-cell best-practices book (Heumos et al. 2023, "Quality control"):

* metrics from :func:`scanpy.pp.calculate_qc_metrics` with mitochondrial, ribosomal and
  haemoglobin gene groups (species-aware symbols, see :data:`GENE_GROUPS`);
* a cell is an outlier when log1p total counts, log1p detected genes or the share of counts in
  its top 20 genes lies more than ``n_mads`` median absolute deviations (MAD, unscaled:
  :func:`scipy.stats.median_abs_deviation` with ``scale=1``) from the sample median (both sides;
  ``outlier_metrics`` picks which of the three apply: cell types dominated by a few transcripts,
  such as hepatocytes (albumin, apolipoproteins) or plasma cells (immunoglobulins), have high
  top-20 shares and are the first to be lost to that rule);
* mitochondrial percentage, per coarse cell class: hepatocytes carry far more mitochondrial
  reads than immune or endothelial cells, so one limit for every cell removes hepatocytes first
  (a 25% cap removed 47% of one mouse's real hepatocytes). Each sample is split into the coarse
  classes of ``mt_classes`` (default: hepatocyte) by their marker genes - a quick per-sample
  Leiden clustering, each cluster taking the first class whose markers carry at least
  ``min_marker_pct`` % of its median cell's non-mitochondrial counts (``mt_class_by: cell``
  classifies each cell on its own) - and the rest is class ``other``. Within each class a cell
  is removed above ``median + n_mads_mt`` MADs of that class (upper side only), that threshold
  kept within the class's ``[min_pct_mt, max_pct_mt]``; ``max_pct_mt`` is a hard cap. Class
  ``other`` uses the top-level ``n_mads_mt``, ``min_pct_mt`` and ``max_pct_mt``. Liver atlases
  do the same (thresholds per cell class or cluster; hepatocytes allowed up to about 50%);
* fewer than ``min_genes`` detected genes (at most ``min_genes_max_fraction`` of the genes the
  sample measures, so that gene panels and author-filtered gene subsets keep their cells);
* doublets by Scrublet (:func:`scanpy.pp.scrublet`) per sample, on the cells that pass the
  filters above; removed unless ``doublets.remove`` is false;
* genes detected in fewer than ``min_cells`` kept cells are dropped (0 keeps every gene).

A cell can fail several reasons; the table counts each reason and the exclusive total.
"""

from __future__ import annotations

import functools
import logging
import random
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import igraph as ig
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp
from scipy.stats import median_abs_deviation
from sklearn.neighbors import kneighbors_graph

from livermsc.plotting import OKABE_ITO, save_figure
from livermsc.schema import schema_of, section_defaults, section_settings

log = logging.getLogger("livermsc.qc")

#: gene groups per species (regular expressions on symbols): mitochondrially encoded genes,
#: cytosolic ribosomal proteins (not kinases like Rps6ka1 nor pseudogenes like Rpl13-ps3) and
#: haemoglobins (not HBEGF, HBP1, HBS1L)
GENE_GROUPS: dict[str, dict[str, str]] = {
    "mouse": {
        "mt": r"^mt-",
        "ribo": r"^(Rp[sl]\d+(a|al|l\d*|x|y\d*)?|Rplp[0-2]|Rpsa)$",
        "hb": r"^(Hb[ab]-[a-z0-9]+|Hbq1[ab]?)$",
    },
    "human": {
        "mt": r"^MT-",
        "ribo": r"^(RP[SL]\d+(A|AL|L\d*|X|Y\d*)?|RPLP[0-2]|RPSA)$",
        "hb": r"^HB(A\d*|B|D|E\d*|G\d*|M|Q\d*|Z)$",
    },
}

#: removal reasons, in table order (doublets are scored only on cells passing the others)
REASONS = ("counts", "genes", "top20", "mt_mad", "mt_cap", "min_genes", "doublet")


#: the class of cells matched by no entry of ``mt_classes`` (top-level mitochondrial limits)
OTHER_CLASS = "other"


@dataclass(frozen=True)
class MtClass:
    """A coarse cell class with its own mitochondrial limits (one entry of ``qc.mt_classes``)."""

    name: str
    markers: tuple[str, ...]
    min_marker_pct: float
    n_mads_mt: float
    min_pct_mt: float
    max_pct_mt: float

    @classmethod
    def from_config(cls, entry: Mapping[str, Any], species: str) -> MtClass:
        """The class from a validated ``mt_classes`` entry, with the species' markers."""
        return cls(name=entry["name"], markers=tuple(entry["markers"].get(species, [])),
                   min_marker_pct=float(entry["min_marker_pct"]),
                   n_mads_mt=float(entry["n_mads_mt"]), min_pct_mt=float(entry["min_pct_mt"]),
                   max_pct_mt=float(entry["max_pct_mt"]))


#: QCSettings field -> its key in the validated ``qc`` config section (qc.schema.yaml)
QC_KEYS: dict[str, tuple[str, ...]] = {
    "n_mads": ("n_mads",), "outlier_metrics": ("outlier_metrics",),
    "n_mads_mt": ("n_mads_mt",), "min_pct_mt": ("min_pct_mt",), "max_pct_mt": ("max_pct_mt",),
    "min_genes": ("min_genes",), "min_genes_max_fraction": ("min_genes_max_fraction",),
    "min_cells": ("min_cells",), "detect_doublets": ("doublets", "detect"),
    "remove_doublets": ("doublets", "remove"),
    "expected_doublet_rate": ("doublets", "expected_rate"),
    "doublet_threshold": ("doublets", "threshold"),
    "doublet_fallback_threshold": ("doublets", "fallback_threshold"),
    "doublet_n_pcs": ("doublets", "n_pcs"), "doublet_log_transform": ("doublets", "log_transform"),
    "doublet_sim_ratio": ("doublets", "sim_ratio"), "doublet_min_cells": ("doublets", "min_cells"),
    "mt_classes": ("mt_classes",), "mt_class_by": ("mt_class_by",),
    "mt_class_resolution": ("mt_class_resolution",),
}


def _field_values(qc: Mapping[str, Any], seed: int, species: str) -> dict[str, Any]:
    """:class:`QCSettings` field values from a validated ``qc`` section (defaults filled)."""
    values: dict[str, Any] = {}
    for name, keys in QC_KEYS.items():
        value: Any = qc
        for key in keys:
            value = value[key]
        values[name] = value
    values["outlier_metrics"] = tuple(values["outlier_metrics"])
    values["mt_classes"] = tuple(MtClass.from_config(c, species) for c in values["mt_classes"])
    values["mt_class_resolution"] = float(values["mt_class_resolution"])
    values["seed"] = int(seed)
    return values


@functools.cache
def _schema_values() -> dict[str, Any]:
    """The field values of the schema defaults (qc.schema.yaml, the config's seed, mouse)."""
    seed = schema_of("config")["properties"]["seed"]["default"]
    return _field_values(section_defaults("qc"), seed, "mouse")


def _schema_default(name: str) -> Any:
    """A :class:`QCSettings` field whose default is read from the schema, not written here."""
    return field(default_factory=lambda: _schema_values()[name])


@dataclass(frozen=True)
class QCSettings:
    """QC thresholds of one sample (the qc config with the sample sheet's overrides).

    Every default comes from workflow/schemas/qc.schema.yaml (the mitochondrial classes with
    their mouse markers; the seed from config.schema.yaml): ``QCSettings()`` equals
    ``QCSettings.from_config({})``.
    """

    n_mads: float = _schema_default("n_mads")
    outlier_metrics: tuple[str, ...] = _schema_default("outlier_metrics")
    n_mads_mt: float = _schema_default("n_mads_mt")
    min_pct_mt: float = _schema_default("min_pct_mt")
    max_pct_mt: float = _schema_default("max_pct_mt")
    min_genes: int = _schema_default("min_genes")
    min_genes_max_fraction: float = _schema_default("min_genes_max_fraction")
    min_cells: int = _schema_default("min_cells")
    detect_doublets: bool = _schema_default("detect_doublets")
    remove_doublets: bool = _schema_default("remove_doublets")
    expected_doublet_rate: float = _schema_default("expected_doublet_rate")
    doublet_threshold: float | None = _schema_default("doublet_threshold")
    doublet_fallback_threshold: float = _schema_default("doublet_fallback_threshold")
    doublet_n_pcs: int = _schema_default("doublet_n_pcs")
    doublet_log_transform: bool = _schema_default("doublet_log_transform")
    doublet_sim_ratio: float = _schema_default("doublet_sim_ratio")
    doublet_min_cells: int = _schema_default("doublet_min_cells")
    mt_classes: tuple[MtClass, ...] = _schema_default("mt_classes")
    mt_class_by: str = _schema_default("mt_class_by")
    mt_class_resolution: float = _schema_default("mt_class_resolution")
    seed: int = _schema_default("seed")

    @classmethod
    def from_config(cls, qc: Mapping[str, Any] | None, overrides: Mapping[str, Any] | None = None,
                    seed: int | None = None, species: str = "mouse") -> QCSettings:
        """Settings from the ``qc`` config section and a sample's sheet overrides.

        ``qc`` is validated against qc.schema.yaml and its defaults filled (a partial section
        or None takes the schema's defaults); ``seed`` None is the config's default seed.
        ``overrides`` may hold the sample-sheet columns ``qc_n_mads``, ``qc_n_mads_mt`` and
        ``qc_max_pct_mt`` (strings or numbers; missing/empty values are ignored); the two
        mitochondrial overrides apply to class ``other`` (cells of no ``mt_classes`` entry).
        ``species`` picks the markers of the mitochondrial classes.
        """
        qc = section_settings(qc, "qc", "qc")
        values = _field_values(qc, _schema_values()["seed"] if seed is None else seed, species)
        for column, key in (("qc_n_mads", "n_mads"), ("qc_n_mads_mt", "n_mads_mt"),
                            ("qc_max_pct_mt", "max_pct_mt")):
            value = (overrides or {}).get(column)
            if value is None or (isinstance(value, float) and np.isnan(value)) or value == "":
                continue
            try:
                values[key] = float(value)
            except (TypeError, ValueError) as err:
                raise ValueError(f"sample sheet column {column}: {value!r} is not a number") from err
        return cls(**values)


# --- metrics and thresholds ------------------------------------------------------------------

def annotate_gene_groups(adata: ad.AnnData, species: str) -> dict[str, int]:
    """Set boolean ``var['mt'|'ribo'|'hb']`` from the species' symbol patterns; return counts."""
    if species not in GENE_GROUPS:
        raise ValueError(f"unknown species {species!r} (expected one of {sorted(GENE_GROUPS)})")
    names = adata.var_names.astype(str)
    counts = {}
    for group, pattern in GENE_GROUPS[species].items():
        rx = re.compile(pattern)
        adata.var[group] = np.fromiter((bool(rx.match(n)) for n in names), bool, len(names))
        counts[group] = int(adata.var[group].sum())
    if counts["mt"] == 0:
        log.warning("no mitochondrial genes (%s) found: pct_counts_mt is 0 for every cell",
                    GENE_GROUPS[species]["mt"])
    return counts


def compute_qc_metrics(adata: ad.AnnData, species: str) -> dict[str, int]:
    """Annotate gene groups and add scanpy's QC metrics to ``obs``/``var`` (in place)."""
    groups = annotate_gene_groups(adata, species)
    n_top = min(20, adata.n_vars)
    sc.pp.calculate_qc_metrics(adata, qc_vars=["mt", "ribo", "hb"], percent_top=[n_top],
                               log1p=True, inplace=True)
    if n_top != 20:
        adata.obs["pct_counts_in_top_20_genes"] = adata.obs.pop(f"pct_counts_in_top_{n_top}_genes")
    return groups


def mad_bounds(values: Iterable[float], n_mads: float) -> tuple[float, float, float, float]:
    """(median, MAD, lower, upper) with ``lower/upper = median -/+ n_mads * MAD`` (MAD unscaled)."""
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return (float("nan"),) * 4
    med = float(np.median(x))
    mad = float(median_abs_deviation(x, scale=1.0))
    return med, mad, med - n_mads * mad, med + n_mads * mad


def is_outlier(values: Iterable[float], n_mads: float, side: str = "both") -> np.ndarray:
    """Boolean mask of values more than ``n_mads`` MADs from the median (``both|upper|lower``)."""
    x = np.asarray(values, dtype=float)
    _, _, low, high = mad_bounds(x, n_mads)
    upper = x > high
    lower = x < low
    return {"both": upper | lower, "upper": upper, "lower": lower}[side]


def mt_threshold(values: Iterable[float], n_mads: float, floor: float, cap: float
                 ) -> tuple[float, float, float, float]:
    """(median, MAD, median + n_mads MADs, threshold): the MAD bound kept within [floor, cap].

    Without values the threshold is the cap.
    """
    med, mad, _, high = mad_bounds(values, n_mads)
    thr = cap if not np.isfinite(high) else min(max(high, floor), cap)
    return med, mad, high, float(thr)


def effective_min_genes(settings: QCSettings, n_vars: int | None) -> int:
    """``min_genes``, lowered to ``min_genes_max_fraction`` of the genes a sample measures.

    A targeted panel or an author-filtered gene subset (hundreds of genes) cannot show 200
    detected genes per cell; without this limit the rule would remove every cell.
    """
    if n_vars is None:
        return int(settings.min_genes)
    cap = int(np.floor(settings.min_genes_max_fraction * n_vars))
    if cap < settings.min_genes:
        log.warning("min_genes lowered from %d to %d (%g of the %d genes measured)",
                    settings.min_genes, cap, settings.min_genes_max_fraction, n_vars)
        return cap
    return int(settings.min_genes)


def flag_cells(obs: pd.DataFrame, settings: QCSettings,
               mt_class: pd.Series | None = None, n_vars: int | None = None
               ) -> tuple[pd.DataFrame, dict[str, float]]:
    """One boolean column per metric-based removal reason, and the thresholds used.

    ``obs`` needs the columns of :func:`compute_qc_metrics`. Thresholds on the counts and genes
    axes are returned on the natural scale (``expm1`` of the log1p bounds) as well.
    ``mt_class`` (one class name per cell, see :func:`mt_classes_of`) gives each class of
    ``settings.mt_classes`` its own mitochondrial rule, computed on its cells only; cells of
    no class (or all cells, without ``mt_class``) use the top-level limits. The ``mt_*``
    thresholds are those of class ``other``; ``mt_<class>_*`` those of each class.
    ``n_vars`` (genes measured) limits ``min_genes`` (see :func:`effective_min_genes`).
    """
    flags = pd.DataFrame(index=obs.index)
    thr: dict[str, float] = {}
    min_genes = effective_min_genes(settings, n_vars)
    for reason, column in (("counts", "log1p_total_counts"), ("genes", "log1p_n_genes_by_counts"),
                           ("top20", "pct_counts_in_top_20_genes")):
        _, _, low, high = mad_bounds(obs[column], settings.n_mads)
        flags[reason] = ((obs[column] < low) | (obs[column] > high)) & \
            (reason in settings.outlier_metrics)
        thr[f"{reason}_low"], thr[f"{reason}_high"] = low, high
    for axis in ("counts", "genes"):
        thr[f"{axis}_low_natural"] = float(np.expm1(thr[f"{axis}_low"]))
        thr[f"{axis}_high_natural"] = float(np.expm1(thr[f"{axis}_high"]))
    pct = obs["pct_counts_mt"].to_numpy(dtype=float)
    classes = np.full(len(obs), OTHER_CLASS, dtype=object) if mt_class is None else \
        np.asarray(mt_class, dtype=object)
    cell_thr = np.empty(len(obs), dtype=float)
    cell_cap = np.empty(len(obs), dtype=float)
    rules = [(OTHER_CLASS, settings.n_mads_mt, settings.min_pct_mt, settings.max_pct_mt)]
    rules += [(c.name, c.n_mads_mt, c.min_pct_mt, c.max_pct_mt) for c in settings.mt_classes]
    for name, n_mads, floor, cap in rules:
        mask = classes == name
        med, mad, high, t = mt_threshold(pct[mask], n_mads, floor, cap)
        cell_thr[mask], cell_cap[mask] = t, cap
        prefix = "mt" if name == OTHER_CLASS else f"mt_{name}"
        thr.update({f"{prefix}_median": med, f"{prefix}_mad": mad, f"{prefix}_mad_upper": high,
                    f"{prefix}_threshold": t})
        if name != OTHER_CLASS:
            thr[f"{prefix}_cap"] = cap
    flags["mt_mad"] = pct > cell_thr
    flags["mt_cap"] = pct > cell_cap
    flags["min_genes"] = obs["n_genes_by_counts"] < min_genes
    thr["min_genes_used"] = min_genes
    return flags, thr


def marker_share(adata: ad.AnnData, markers: Iterable[str]) -> np.ndarray:
    """Percent of each cell's non-mitochondrial counts (X) in ``markers`` (those present)."""
    genes = adata.var_names.isin(list(markers))
    X = sp.csr_matrix(adata.X)
    total = np.asarray(X.sum(axis=1)).ravel().astype(float)
    if "mt" in adata.var:
        total -= np.asarray(X[:, adata.var["mt"].to_numpy(dtype=bool)].sum(axis=1)).ravel()
    hits = np.asarray(X[:, genes].sum(axis=1)).ravel().astype(float)
    return np.divide(100 * hits, total, out=np.zeros_like(hits), where=total > 0)


def quick_clusters(adata: ad.AnnData, resolution: float, seed: int) -> np.ndarray:
    """Leiden clusters of one sample: log-normalised counts (X), PCA, 15-NN graph, Leiden.

    The graph is scikit-learn's kNN graph (symmetrised) and Leiden is igraph's, which keeps this
    per-sample step free of numba compilation (seconds, not half a minute, per sample).
    """
    b = ad.AnnData(X=sp.csr_matrix(adata.X, dtype=np.float32),
                   obs=pd.DataFrame(index=adata.obs_names), var=pd.DataFrame(index=adata.var_names))
    sc.pp.normalize_total(b)
    sc.pp.log1p(b)
    n_comps = int(max(2, min(30, b.n_obs - 2, b.n_vars - 2)))
    sc.pp.pca(b, n_comps=n_comps, random_state=seed)
    knn = kneighbors_graph(b.obsm["X_pca"], n_neighbors=min(15, b.n_obs - 1),
                           mode="connectivity", include_self=False)
    knn = sp.triu(knn.maximum(knn.T), k=1).tocoo()
    graph = ig.Graph(n=b.n_obs, edges=list(zip(knn.row.tolist(), knn.col.tolist(), strict=True)))
    ig.set_random_number_generator(random.Random(seed))
    try:
        parts = graph.community_leiden(objective_function="modularity", resolution=resolution,
                                       n_iterations=2)
    finally:
        ig.set_random_number_generator(random)
    return np.asarray(parts.membership).astype(str)


#: fewest cells for the per-sample clustering of ``mt_class_by: cluster`` (else per cell)
MIN_CLUSTER_CELLS = 50


def mt_classes_of(adata: ad.AnnData, settings: QCSettings) -> tuple[np.ndarray, dict[str, Any]]:
    """The mitochondrial class of each cell (raw counts in X, ``var['mt']`` set) and a record.

    A class whose markers are all absent from the sample matches no cell (logged). With
    ``mt_class_by: cluster`` each cluster of :func:`quick_clusters` takes the first class whose
    markers carry at least ``min_marker_pct`` % of its median cell's non-mitochondrial counts;
    samples with fewer than :data:`MIN_CLUSTER_CELLS` cells, or whose clustering fails, are
    classified cell by cell.
    """
    n = adata.n_obs
    classes = np.full(n, OTHER_CLASS, dtype=object)
    info: dict[str, Any] = {"mt_class_by": settings.mt_class_by}
    if not settings.mt_classes or n == 0:
        return classes, info
    shares = {}
    for c in settings.mt_classes:
        present = [g for g in c.markers if g in adata.var_names]
        info[f"mt_{c.name}_markers_found"] = len(present)
        if not present:
            log.warning("mitochondrial class %s: none of its %d markers is among the genes; "
                        "no cell is put in this class", c.name, len(c.markers))
            continue
        shares[c.name] = marker_share(adata, present)
    groups = np.arange(n).astype(str)  # one group per cell
    if settings.mt_class_by == "cluster":
        if n < MIN_CLUSTER_CELLS:
            log.warning("mitochondrial classes: %d cells (< %d) are too few to cluster; "
                        "classified cell by cell", n, MIN_CLUSTER_CELLS)
            info["mt_class_by"] = "cell"
        else:
            try:
                groups = quick_clusters(adata, settings.mt_class_resolution, settings.seed)
            except Exception as err:  # clustering is a means to an end: fall back per cell
                log.warning("mitochondrial classes: per-sample clustering failed (%s: %s); "
                            "classified cell by cell", type(err).__name__, err)
                info["mt_class_by"] = "cell"
    info["mt_class_groups"] = int(np.unique(groups).size)
    for g in np.unique(groups):
        mask = groups == g
        for c in settings.mt_classes:
            if c.name in shares and np.median(shares[c.name][mask]) >= c.min_marker_pct:
                classes[mask] = c.name
                break
    return classes, info


def detect_doublets(adata: ad.AnnData, settings: QCSettings) -> dict[str, Any]:
    """Scrublet on ``adata`` (raw counts in X); sets ``obs['doublet_score'|'predicted_doublet']``.

    The threshold is ``doublets.threshold`` when set, else Scrublet's automatic one (minimum
    between the modes of the simulated doublets' scores), else ``fallback_threshold`` when the
    automatic search fails. Samples with fewer than ``doublets.min_cells`` cells are skipped.
    """
    n = adata.n_obs
    if not settings.detect_doublets or n < settings.doublet_min_cells:
        why = "disabled" if not settings.detect_doublets else \
            f"skipped ({n} cells < doublets.min_cells={settings.doublet_min_cells})"
        if settings.detect_doublets:
            log.warning("doublet detection %s", why)
        adata.obs["doublet_score"] = np.nan
        adata.obs["predicted_doublet"] = False
        return {"doublet_threshold": float("nan"), "doublet_threshold_source": why}
    sub = ad.AnnData(X=sp.csr_matrix(adata.X), obs=pd.DataFrame(index=adata.obs_names),
                     var=pd.DataFrame(index=adata.var_names))
    n_pcs = int(max(2, min(settings.doublet_n_pcs, n - 1, adata.n_vars - 1)))
    with sc.settings.verbosity.override(0):
        sc.pp.scrublet(sub, expected_doublet_rate=settings.expected_doublet_rate,
                       sim_doublet_ratio=settings.doublet_sim_ratio, n_prin_comps=n_pcs,
                       log_transform=settings.doublet_log_transform,
                       threshold=settings.doublet_threshold, random_state=settings.seed,
                       # exact scikit-learn kNN: pynndescent would spend ~45 s compiling
                       # (numba) in every per-sample job, longer than the exact search
                       use_approx_neighbors=False)
    scores = sub.obs["doublet_score"].to_numpy(dtype=float)
    if settings.doublet_threshold is not None:
        thr, source = float(settings.doublet_threshold), "config"
    elif "threshold" in sub.uns["scrublet"]:
        thr, source = float(sub.uns["scrublet"]["threshold"]), "scrublet_auto"
    else:
        thr, source = float(settings.doublet_fallback_threshold), "fallback"
        log.warning("Scrublet found no automatic threshold; using doublets.fallback_threshold=%s",
                    thr)
    adata.obs["doublet_score"] = scores
    adata.obs["predicted_doublet"] = scores > thr
    return {"doublet_threshold": thr, "doublet_threshold_source": source}


# --- the whole per-sample QC -----------------------------------------------------------------

def run_qc(adata: ad.AnnData, settings: QCSettings, species: str
           ) -> tuple[ad.AnnData, ad.AnnData, dict[str, Any]]:
    """QC one sample: returns (all cells annotated, kept cells, table row).

    ``adata`` holds one sample's raw counts in ``layers['counts']`` (as written by the ingest
    stage; an object without that layer is read from X). The first result keeps every cell
    with its metrics and ``obs['qc_fail_<reason>']`` flags and the counts in X (for figures);
    the second is the filtered AnnData, raw counts (CSR) in ``layers['counts']`` only and X
    empty, as written to ``results/<study>/qc/<sample>.h5ad``.
    """
    if adata.n_obs == 0:
        raise ValueError("QC needs at least one cell")
    adata = adata.copy()
    if "counts" in adata.layers:  # the helpers below read the counts from X: move, not copy
        adata.X = adata.layers.pop("counts")
    if adata.X is None:
        raise ValueError("QC needs raw counts in layers['counts'] (or X); the AnnData has none")
    groups = compute_qc_metrics(adata, species)
    classes, class_info = mt_classes_of(adata, settings)
    adata.obs["qc_mt_class"] = pd.Categorical(classes)
    flags, thr = flag_cells(adata.obs, settings, classes, n_vars=adata.n_vars)
    passed = ~flags.any(axis=1).to_numpy()
    adata.obs["doublet_score"] = np.nan
    adata.obs["predicted_doublet"] = False
    dbl = detect_doublets_subset(adata, passed, settings)
    flags["doublet"] = adata.obs["predicted_doublet"].to_numpy(dtype=bool) & \
        settings.remove_doublets
    for reason in REASONS:
        adata.obs[f"qc_fail_{reason}"] = flags[reason].to_numpy()
    keep = ~flags.any(axis=1).to_numpy()
    adata.obs["qc_pass"] = keep
    per_class: dict[str, Any] = {}
    mt_any = (flags["mt_mad"] | flags["mt_cap"]).to_numpy()
    for name in [OTHER_CLASS, *(c.name for c in settings.mt_classes)]:
        mask = classes == name
        per_class[f"n_class_{name}"] = int(mask.sum())
        per_class[f"n_fail_mt_{name}"] = int((mask & mt_any).sum())
        per_class[f"n_removed_{name}"] = int((mask & ~keep).sum())
    if groups["mt"] == 0:
        log.warning("sample has no mitochondrial genes: the mitochondrial rules remove nothing")
    kept = adata[keep].copy()
    kept.obs = kept.obs.drop(columns=[f"qc_fail_{r}" for r in REASONS] + ["qc_pass"])
    kept.obs["qc_mt_class"] = kept.obs["qc_mt_class"].astype(str).astype("category")
    kept.var = kept.var[["gene_ids", "n_features", "mt", "ribo", "hb"]
                        if {"gene_ids", "n_features"} <= set(kept.var) else ["mt", "ribo", "hb"]]
    n_cells_gene = np.asarray((kept.X > 0).sum(axis=0)).ravel()
    kept.var["n_cells"] = n_cells_gene
    n_genes_in = kept.n_vars
    if settings.min_cells > 0:
        kept = kept[:, n_cells_gene >= settings.min_cells].copy()
    kept.layers["counts"] = sp.csr_matrix(kept.X)  # the one copy of the counts on disk
    kept.X = None
    obs0 = adata.obs
    row: dict[str, Any] = {
        "study": str(obs0["study"].iloc[0]) if "study" in obs0 else "",
        "sample": str(obs0["sample"].iloc[0]) if "sample" in obs0 else "",
        "arm": str(obs0["arm"].iloc[0]) if "arm" in obs0 else "",
        "n_cells_in": int(adata.n_obs),
        **{f"n_fail_{r}": int(flags[r].sum()) for r in REASONS if r != "doublet"},
        "n_predicted_doublets": int(adata.obs["predicted_doublet"].sum()),
        "n_removed_doublets": int(flags["doublet"].sum()),
        "n_removed": int((~keep).sum()),
        "n_cells_out": int(keep.sum()),
        "pct_removed": round(100 * float((~keep).mean()), 2),
        "n_genes_in": int(n_genes_in),
        "n_genes_out": int(kept.n_vars),
        "n_mt_genes": groups["mt"], "n_ribo_genes": groups["ribo"], "n_hb_genes": groups["hb"],
        "median_total_counts_out": float(np.median(kept.obs["total_counts"])) if kept.n_obs
        else float("nan"),
        "median_genes_out": float(np.median(kept.obs["n_genes_by_counts"])) if kept.n_obs
        else float("nan"),
        **per_class,
        **{k: round(float(v), 4) for k, v in thr.items()},
        **_settings_record(settings),
        **class_info,
        **dbl,
    }
    if not kept.n_obs:
        log.warning("sample %s: QC removed every cell", row["sample"])
    kept.uns["qc"] = {k: (None if isinstance(v, float) and np.isnan(v) else v)
                      for k, v in row.items()}
    return adata, kept, row


def _settings_record(settings: QCSettings) -> dict[str, Any]:
    """The settings as flat table columns (the classes as one text column)."""
    out: dict[str, Any] = {}
    for k, v in asdict(settings).items():
        if k == "mt_classes":
            out[k] = "; ".join(
                f"{c.name}: markers>={c.min_marker_pct:g}%, {c.n_mads_mt:g} MADs within "
                f"[{c.min_pct_mt:g}, {c.max_pct_mt:g}]%" for c in settings.mt_classes)
        else:
            out[k] = ",".join(v) if isinstance(v, tuple) else v
    return out


def detect_doublets_subset(adata: ad.AnnData, mask: np.ndarray, settings: QCSettings
                           ) -> dict[str, Any]:
    """Run :func:`detect_doublets` on the cells in ``mask``; scores of the others stay NaN."""
    sub = adata[mask].copy()
    info = detect_doublets(sub, settings)
    adata.obs.loc[sub.obs_names, "doublet_score"] = sub.obs["doublet_score"].to_numpy()
    adata.obs.loc[sub.obs_names, "predicted_doublet"] = sub.obs["predicted_doublet"].to_numpy()
    adata.obs["predicted_doublet"] = adata.obs["predicted_doublet"].astype(bool)
    return info


# --- figures and tables ----------------------------------------------------------------------

def plot_qc(adata: ad.AnnData, row: Mapping[str, Any], stem: str | Path,
            formats: Iterable[str] = ("png",), dpi: int = 300) -> list[Path]:
    """Distributions of the QC metrics (kept vs removed cells) with the thresholds drawn.

    The mitochondrial panel draws each coarse class separately with its own threshold, and a
    bar panel shows how many cells each rule flags (a cell can fail several).
    """
    obs = adata.obs
    kept = obs["qc_pass"].to_numpy(dtype=bool)
    fig, axes = plt.subplots(2, 4, figsize=(16, 7))
    mad, hard = "--", ":"
    panels = [
        ("log1p_total_counts", "log1p(total counts)",
         [(row["counts_low"], mad), (row["counts_high"], mad)]),
        ("log1p_n_genes_by_counts", "log1p(detected genes)",
         [(row["genes_low"], mad), (row["genes_high"], mad), (np.log1p(row.get("min_genes_used", row["min_genes"])), hard)]),
        ("pct_counts_in_top_20_genes", "% counts in top 20 genes",
         [(row["top20_low"], mad), (row["top20_high"], mad)]),
        ("doublet_score", "Scrublet doublet score", [(row["doublet_threshold"], mad)]),
    ]
    flat = list(axes.flat)
    for ax, (col, label, lines) in zip(flat[:4], panels, strict=True):
        values = obs[col].to_numpy(dtype=float)
        finite = np.isfinite(values)
        if finite.any():
            bins = np.histogram_bin_edges(values[finite], bins=50)
            ax.hist([values[finite & kept], values[finite & ~kept]], bins=bins, stacked=True,
                    color=["#0072B2", "#D55E00"], label=["kept", "removed"])
        else:
            ax.text(0.5, 0.5, "not computed", ha="center", va="center", transform=ax.transAxes)
        for x, style in lines:
            if x is not None and np.isfinite(x):
                ax.axvline(x, color="black", ls=style, lw=1)
        ax.set_xlabel(label)
        ax.set_ylabel("cells")
    flat[0].legend(frameon=False)
    # mitochondrial share per coarse class, each with its threshold (dashed) and cap (dotted)
    ax = flat[4]
    pct = obs["pct_counts_mt"].to_numpy(dtype=float)
    classes = obs["qc_mt_class"].astype(str).to_numpy() if "qc_mt_class" in obs else \
        np.full(len(obs), OTHER_CLASS)
    names = [c for c in dict.fromkeys([*sorted(set(classes) - {OTHER_CLASS}), OTHER_CLASS])
             if (classes == c).any()]
    if row.get("n_mt_genes", 1) == 0:
        ax.text(0.5, 0.5, "no mitochondrial genes:\nno mitochondrial rule", ha="center",
                va="center", transform=ax.transAxes)
    elif len(pct):
        bins = np.histogram_bin_edges(pct, bins=50)
        for i, name in enumerate(names):
            colour = OKABE_ITO[i % 7]
            prefix = "mt" if name == OTHER_CLASS else f"mt_{name}"
            cap = row["max_pct_mt"] if name == OTHER_CLASS else row.get(f"{prefix}_cap")
            n_out = row.get(f"n_fail_mt_{name}", 0)
            ax.hist(pct[classes == name], bins=bins, histtype="step", color=colour,
                    label=f"{name}: {int((classes == name).sum())} cells, {n_out} removed")
            for x, style in ((row.get(f"{prefix}_threshold"), mad), (cap, hard)):
                if x is not None and np.isfinite(x):
                    ax.axvline(x, color=colour, ls=style, lw=1)
        ax.legend(frameon=False, fontsize=7)
    ax.set_xlabel("% mitochondrial counts (per coarse class)")
    ax.set_ylabel("cells")
    # cells flagged by each rule
    ax = flat[5]
    reasons = [r for r in REASONS if f"qc_fail_{r}" in obs]
    n_flag = [int(obs[f"qc_fail_{r}"].sum()) for r in reasons]
    ax.barh(reasons[::-1], n_flag[::-1], color="#D55E00")
    for y, v in enumerate(n_flag[::-1]):
        ax.text(v, y, f" {v}", va="center", fontsize=7)
    ax.set_xlabel(f"cells flagged by each rule (of {len(obs)}; {int((~kept).sum())} removed)")
    ax = flat[6]
    points = ax.scatter(obs["total_counts"], obs["n_genes_by_counts"], c=obs["pct_counts_mt"],
                        s=3, cmap="viridis", rasterized=True)
    fig.colorbar(points, ax=ax, label="% mitochondrial counts")
    if len(obs) and (obs["total_counts"] > 0).all() and (obs["n_genes_by_counts"] > 0).all():
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlabel("total counts")
    ax.set_ylabel("detected genes")
    flat[7].axis("off")
    fig.suptitle(f"{row['study']} / {row['sample']}: {row['n_cells_in']} cells in, "
                 f"{row['n_cells_out']} kept (dashed: adaptive thresholds; dotted: fixed limits)")
    fig.tight_layout()
    return save_figure(fig, stem, formats=formats, dpi=dpi)


def summarise(tables: Iterable[str | Path | pd.DataFrame]) -> pd.DataFrame:
    """Concatenate per-sample QC tables (files or frames) into one study table."""
    parts = [t if isinstance(t, pd.DataFrame) else pd.read_csv(t, sep="\t") for t in tables]
    return pd.concat(parts, ignore_index=True)


def rule_qc(smk: Any) -> None:
    """Rule ``qc``: filtered h5ad, per-sample table and figures of one sample."""
    settings = QCSettings.from_config(smk.params.qc, smk.params.overrides,
                                      seed=int(smk.params.seed), species=smk.params.species)
    adata = ad.read_h5ad(smk.input.h5ad)
    annotated, kept, row = run_qc(adata, settings, species=smk.params.species)
    kept.write_h5ad(smk.output.h5ad, compression="gzip")
    pd.DataFrame([row]).to_csv(smk.output.table, sep="\t", index=False)
    # save_figure takes "<stem>.<fmt>" as the stem "<stem>" (sample ids may hold dots)
    plot_qc(annotated, row, smk.output.figures[0], formats=smk.params.formats,
            dpi=int(smk.params.dpi))
    log.info("%s: %d -> %d cells", row["sample"], row["n_cells_in"], row["n_cells_out"])


def rule_qc_summary(smk: Any) -> None:
    """Rule ``qc_summary``: the study's per-sample QC tables in one TSV."""
    summarise(smk.input.tables).to_csv(smk.output.tsv, sep="\t", index=False)

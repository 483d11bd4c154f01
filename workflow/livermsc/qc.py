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
* mitochondrial percentage: removed above ``median + n_mads_mt`` MADs (upper side only), with
  that threshold kept within ``[min_pct_mt, max_pct_mt]``. Liver hepatocytes carry far more
  mitochondrial reads than immune or endothelial cells, so an unbounded MAD rule removes
  hepatocytes first; ``min_pct_mt`` protects them and ``max_pct_mt`` is a hard cap;
* fewer than ``min_genes`` detected genes;
* doublets by Scrublet (:func:`scanpy.pp.scrublet`) per sample, on the cells that pass the
  filters above; removed unless ``doublets.remove`` is false;
* genes detected in fewer than ``min_cells`` kept cells are dropped (0 keeps every gene).

A cell can fail several reasons; the table counts each reason and the exclusive total.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp
from scipy.stats import median_abs_deviation

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


@dataclass(frozen=True)
class QCSettings:
    """QC thresholds of one sample (the qc config with the sample sheet's overrides)."""

    n_mads: float = 5.0
    outlier_metrics: tuple[str, ...] = ("counts", "genes", "top20")
    n_mads_mt: float = 3.0
    min_pct_mt: float = 15.0
    max_pct_mt: float = 25.0
    min_genes: int = 200
    min_cells: int = 0
    detect_doublets: bool = True
    remove_doublets: bool = True
    expected_doublet_rate: float = 0.06
    doublet_threshold: float | None = None
    doublet_fallback_threshold: float = 0.25
    doublet_n_pcs: int = 10
    doublet_log_transform: bool = True
    doublet_sim_ratio: float = 2.0
    doublet_min_cells: int = 100
    seed: int = 0

    @classmethod
    def from_config(cls, qc: Mapping[str, Any], overrides: Mapping[str, Any] | None = None,
                    seed: int = 0) -> QCSettings:
        """Settings from the validated ``qc`` config section and a sample's sheet overrides.

        ``overrides`` may hold the sample-sheet columns ``qc_n_mads``, ``qc_n_mads_mt`` and
        ``qc_max_pct_mt`` (strings or numbers; missing/empty values are ignored).
        """
        dbl = dict(qc.get("doublets", {}))
        values: dict[str, Any] = {
            "n_mads": qc.get("n_mads", cls.n_mads),
            "outlier_metrics": tuple(qc.get("outlier_metrics", cls.outlier_metrics)),
            "n_mads_mt": qc.get("n_mads_mt", cls.n_mads_mt),
            "min_pct_mt": qc.get("min_pct_mt", cls.min_pct_mt),
            "max_pct_mt": qc.get("max_pct_mt", cls.max_pct_mt),
            "min_genes": qc.get("min_genes", cls.min_genes),
            "min_cells": qc.get("min_cells", cls.min_cells),
            "detect_doublets": dbl.get("detect", cls.detect_doublets),
            "remove_doublets": dbl.get("remove", cls.remove_doublets),
            "expected_doublet_rate": dbl.get("expected_rate", cls.expected_doublet_rate),
            "doublet_threshold": dbl.get("threshold", cls.doublet_threshold),
            "doublet_fallback_threshold": dbl.get("fallback_threshold",
                                                  cls.doublet_fallback_threshold),
            "doublet_n_pcs": dbl.get("n_pcs", cls.doublet_n_pcs),
            "doublet_log_transform": dbl.get("log_transform", cls.doublet_log_transform),
            "doublet_sim_ratio": dbl.get("sim_ratio", cls.doublet_sim_ratio),
            "doublet_min_cells": dbl.get("min_cells", cls.doublet_min_cells),
            "seed": seed,
        }
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


def flag_cells(obs: pd.DataFrame, settings: QCSettings) -> tuple[pd.DataFrame, dict[str, float]]:
    """One boolean column per metric-based removal reason, and the thresholds used.

    ``obs`` needs the columns of :func:`compute_qc_metrics`. Thresholds on the counts and genes
    axes are returned on the natural scale (``expm1`` of the log1p bounds) as well.
    """
    flags = pd.DataFrame(index=obs.index)
    thr: dict[str, float] = {}
    for reason, column in (("counts", "log1p_total_counts"), ("genes", "log1p_n_genes_by_counts"),
                           ("top20", "pct_counts_in_top_20_genes")):
        _, _, low, high = mad_bounds(obs[column], settings.n_mads)
        flags[reason] = ((obs[column] < low) | (obs[column] > high)) & \
            (reason in settings.outlier_metrics)
        thr[f"{reason}_low"], thr[f"{reason}_high"] = low, high
    for axis in ("counts", "genes"):
        thr[f"{axis}_low_natural"] = float(np.expm1(thr[f"{axis}_low"]))
        thr[f"{axis}_high_natural"] = float(np.expm1(thr[f"{axis}_high"]))
    med, mad, _, high = mad_bounds(obs["pct_counts_mt"], settings.n_mads_mt)
    mt_thr = min(max(high, settings.min_pct_mt), settings.max_pct_mt)
    thr.update({"mt_median": med, "mt_mad": mad, "mt_mad_upper": high, "mt_threshold": mt_thr})
    flags["mt_mad"] = obs["pct_counts_mt"] > mt_thr
    flags["mt_cap"] = obs["pct_counts_mt"] > settings.max_pct_mt
    flags["min_genes"] = obs["n_genes_by_counts"] < settings.min_genes
    return flags, thr


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
                       threshold=settings.doublet_threshold, random_state=settings.seed)
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

    ``adata`` holds one sample's raw counts in X (as written by the ingest stage). The first
    result keeps every cell with its metrics and ``obs['qc_fail_<reason>']`` flags (for
    figures); the second is the filtered AnnData (counts in X and ``layers['counts']``).
    """
    if adata.n_obs == 0:
        raise ValueError("QC needs at least one cell")
    adata = adata.copy()
    if "counts" in adata.layers:
        adata.X = adata.layers["counts"].copy()
    groups = compute_qc_metrics(adata, species)
    flags, thr = flag_cells(adata.obs, settings)
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
    kept = adata[keep].copy()
    kept.obs = kept.obs.drop(columns=[f"qc_fail_{r}" for r in REASONS] + ["qc_pass"])
    kept.var = kept.var[["gene_ids", "n_features", "mt", "ribo", "hb"]
                        if {"gene_ids", "n_features"} <= set(kept.var) else ["mt", "ribo", "hb"]]
    n_cells_gene = np.asarray((kept.X > 0).sum(axis=0)).ravel()
    kept.var["n_cells"] = n_cells_gene
    n_genes_in = kept.n_vars
    if settings.min_cells > 0:
        kept = kept[:, n_cells_gene >= settings.min_cells].copy()
    kept.X = sp.csr_matrix(kept.X)
    kept.layers["counts"] = kept.X.copy()
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
        **{k: round(float(v), 4) for k, v in thr.items()},
        **{k: (",".join(v) if isinstance(v, tuple) else v) for k, v in asdict(settings).items()},
        **dbl,
    }
    if not kept.n_obs:
        log.warning("sample %s: QC removed every cell", row["sample"])
    kept.uns["qc"] = {k: (None if isinstance(v, float) and np.isnan(v) else v)
                      for k, v in row.items()}
    return adata, kept, row


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
            formats: Iterable[str] = ("png",), dpi: int = 150) -> list[Path]:
    """Distributions of the QC metrics (kept vs removed cells) with the thresholds drawn."""
    import matplotlib.pyplot as plt

    from livermsc.plotting import save_figure

    obs = adata.obs
    kept = obs["qc_pass"].to_numpy(dtype=bool)
    fig, axes = plt.subplots(2, 3, figsize=(12, 7))
    mad, hard = "--", ":"
    panels = [
        ("log1p_total_counts", "log1p(total counts)",
         [(row["counts_low"], mad), (row["counts_high"], mad)]),
        ("log1p_n_genes_by_counts", "log1p(detected genes)",
         [(row["genes_low"], mad), (row["genes_high"], mad), (np.log1p(row["min_genes"]), hard)]),
        ("pct_counts_in_top_20_genes", "% counts in top 20 genes",
         [(row["top20_low"], mad), (row["top20_high"], mad)]),
        ("pct_counts_mt", "% mitochondrial counts",
         [(row["mt_threshold"], mad), (row["max_pct_mt"], hard)]),
        ("doublet_score", "Scrublet doublet score", [(row["doublet_threshold"], mad)]),
    ]
    for ax, (col, label, lines) in zip(axes.flat, panels, strict=False):
        values = obs[col].to_numpy(dtype=float)
        finite = np.isfinite(values)
        if finite.any():
            bins = np.histogram_bin_edges(values[finite], bins=50)
            ax.hist([values[finite & kept], values[finite & ~kept]], bins=bins, stacked=True,
                    color=["#0072B2", "#D55E00"], label=["kept", "removed"])
        for x, style in lines:
            if x is not None and np.isfinite(x):
                ax.axvline(x, color="black", ls=style, lw=1)
        ax.set_xlabel(label)
        ax.set_ylabel("cells")
    axes[0, 0].legend(frameon=False)
    ax = axes.flat[5]
    points = ax.scatter(obs["total_counts"], obs["n_genes_by_counts"], c=obs["pct_counts_mt"],
                        s=3, cmap="viridis", rasterized=True)
    fig.colorbar(points, ax=ax, label="% mitochondrial counts")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("total counts")
    ax.set_ylabel("detected genes")
    fig.suptitle(f"{row['study']} / {row['sample']}: {row['n_cells_in']} cells in, "
                 f"{row['n_cells_out']} kept (dashed: adaptive thresholds; dotted: fixed limits)")
    fig.tight_layout()
    return save_figure(fig, stem, formats=formats, dpi=dpi)


def summarise(tables: Iterable[str | Path | pd.DataFrame]) -> pd.DataFrame:
    """Concatenate per-sample QC tables (files or frames) into one study table."""
    parts = [t if isinstance(t, pd.DataFrame) else pd.read_csv(t, sep="\t") for t in tables]
    return pd.concat(parts, ignore_index=True)


def snakemake_entry(smk: Any) -> None:
    """Rule ``qc``: filtered h5ad, per-sample table and figures of one sample."""
    settings = QCSettings.from_config(smk.params.qc, smk.params.overrides,
                                      seed=int(smk.params.seed))
    adata = ad.read_h5ad(smk.input.h5ad)
    annotated, kept, row = run_qc(adata, settings, species=smk.params.species)
    kept.write_h5ad(smk.output.h5ad, compression="gzip")
    pd.DataFrame([row]).to_csv(smk.output.table, sep="\t", index=False)
    # save_figure takes "<stem>.<fmt>" as the stem "<stem>" (sample ids may hold dots)
    plot_qc(annotated, row, smk.output.figures[0], formats=smk.params.formats,
            dpi=int(smk.params.qc["figure_dpi"]))
    log.info("%s: %d -> %d cells", row["sample"], row["n_cells_in"], row["n_cells_out"])


def snakemake_summary(smk: Any) -> None:
    """Rule ``qc_summary``: the study's per-sample QC tables in one TSV."""
    summarise(smk.input.tables).to_csv(smk.output.tsv, sep="\t", index=False)

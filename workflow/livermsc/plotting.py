"""Shared figure style and the project's standard figures.

Importing this module applies the project style (:data:`STYLE`: small sans-serif fonts,
despined axes, the colour-blind-safe Okabe-Ito colour cycle, editable text in PDF and SVG,
reproducible files). Arms keep one colour in every figure (:func:`arm_colour`).

Figures any stage can draw from its tables:

* :func:`sample_level_plot` - one claim: a box per arm with one point per animal/donor, effect
  and q value in the title;
* :func:`claims_heatmap` - claims x studies, coloured by Hedges' g, with verdict marks;
* :func:`forest_plot` - per claim, each study's effect with its CI and the pooled diamond;
* :func:`integration_metric_plot` - integration metrics as dots (one colour per embedding).

Each returns a matplotlib Figure; write it with :func:`save_figure` in every configured format.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib import cycler
from matplotlib.colors import TwoSlopeNorm
from matplotlib.patches import Polygon

#: Okabe-Ito palette, colour-blind safe; arms keep the same colour in every figure.
OKABE_ITO = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442",
             "#000000"]
ARM_COLOURS = {"healthy": "#0072B2", "injury": "#D55E00", "injury_msc": "#009E73",
               "injury_ev": "#CC79A7", "injury_msc_ev": "#E69F00"}
#: Colour of missing values (untestable claims) in heat maps.
MISSING_COLOUR = "#DDDDDD"
#: Diverging colour map for effects (ColorBrewer RdBu, colour-blind safe); blue = lower in arm.
EFFECT_CMAP = "RdBu_r"

#: Marks drawn on heat maps and in tables for each verdict; unknown verdicts get ``"·"``.
VERDICT_MARKS = {
    "supported": "✓",
    "contradicted": "✗",
    "opposite": "✗",
    "not_supported": "○",
    "no_effect": "○",
    "null": "○",
    "inconclusive": "?",
    "untestable": "–",
    "not_testable": "–",
}

#: Matplotlib settings of every project figure.
STYLE: dict[str, Any] = {
    "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans", "Arial", "Helvetica", "Liberation Sans"],
    "font.size": 8,
    "axes.titlesize": 9,
    "axes.titleweight": "regular",
    "axes.labelsize": 8,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 7,
    "legend.frameon": False,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.linewidth": 0.6,
    "xtick.major.width": 0.6,
    "ytick.major.width": 0.6,
    "xtick.major.size": 3,
    "ytick.major.size": 3,
    "lines.linewidth": 1.0,
    "lines.markersize": 4,
    "axes.prop_cycle": cycler(color=OKABE_ITO),
    "figure.dpi": 100,
    "savefig.dpi": 300,
    "savefig.bbox": "tight",
    # editable text in vector files; fixed SVG ids so that reruns give identical files
    "pdf.fonttype": 42,
    "ps.fonttype": 42,
    "svg.fonttype": "none",
    "svg.hashsalt": "livermsc",
}

#: File formats :func:`save_figure` recognises as a suffix of the stem.
_FORMATS = {"png", "pdf", "svg", "jpg", "jpeg", "tif", "tiff", "eps", "ps"}
#: Metadata that would make saved files differ between identical runs, per format.
_NO_DATES = {"pdf": {"CreationDate": None}, "svg": {"Date": None}}


# Saving PDFs subsets fonts, which logs every font table at INFO; keep the rules' logs readable.
logging.getLogger("fontTools").setLevel(logging.WARNING)


def apply_style() -> None:
    """Apply :data:`STYLE` to matplotlib (done once when this module is imported)."""
    plt.rcParams.update(STYLE)


apply_style()


def arm_colour(arm: str, arms: Iterable[str] = ()) -> str:
    """Colour of an arm: fixed for the standard arms, then Okabe-Ito order for others."""
    if arm in ARM_COLOURS:
        return ARM_COLOURS[arm]
    others = [a for a in dict.fromkeys(arms) if a not in ARM_COLOURS]
    idx = others.index(arm) if arm in others else len(others)
    return OKABE_ITO[(4 + idx) % len(OKABE_ITO)]


def save_figure(fig: plt.Figure, stem: str | Path, formats: Iterable[str] = ("png",),
                dpi: int = 300) -> list[Path]:
    """Save ``fig`` as ``<stem>.<fmt>`` for every format, close it, return the paths."""
    stem = Path(stem)
    if stem.suffix.lstrip(".").lower() in _FORMATS:  # "x.png" names the stem "x"
        stem = stem.with_suffix("")
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        path = stem.with_name(f"{stem.name}.{fmt}")  # keeps dots inside the stem
        fig.savefig(path, dpi=dpi, bbox_inches="tight", metadata=_NO_DATES.get(fmt))
        paths.append(path)
    plt.close(fig)
    return paths


def verdict_mark(verdict: Any) -> str:
    """The mark of a verdict (see :data:`VERDICT_MARKS`); blank for a missing verdict."""
    if verdict is None or (isinstance(verdict, float) and math.isnan(verdict)):
        return ""
    return VERDICT_MARKS.get(str(verdict).strip().lower(), "·")


def format_number(value: Any, digits: int = 2) -> str:
    """A number for titles and tables: ``digits`` significant digits, ``NA`` when missing."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return "NA" if value is None else str(value)
    if math.isnan(x):
        return "NA"
    if math.isinf(x) or x == 0:
        return str(x) if x else "0"
    if abs(x) >= 10 ** digits:
        return f"{x:.0f}"
    return f"{x:.{max(digits, 1)}g}"


def _require(df: pd.DataFrame, columns: Iterable[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{what}: missing column(s) {missing} (has: {list(df.columns)})")


def _ordered_arms(arms: Iterable[str]) -> list[str]:
    """Arms in a stable order: the standard arms first (in their fixed order), then the rest."""
    arms = list(dict.fromkeys(arms))
    standard = [a for a in ARM_COLOURS if a in arms]
    return standard + sorted(a for a in arms if a not in ARM_COLOURS)


def claim_title(claim: Mapping[str, Any]) -> str:
    """Two-line title of a claim row: id and contrast, then effect, CI, q and verdict."""
    cid = claim.get("claim_id", "claim")
    contrast = f"{claim.get('arm', '?')} vs {claim.get('reference', '?')}"
    stage = claim.get("stage")
    if isinstance(stage, str) and stage:
        contrast += f" ({stage})"
    stats = [f"g = {format_number(claim.get('hedges_g'))}"]
    if "ci_low" in claim and "ci_high" in claim:
        stats.append(f"95% CI [{format_number(claim['ci_low'])}, "
                     f"{format_number(claim['ci_high'])}]")
    stats.append(f"q = {format_number(claim.get('q_value'))}")
    verdict = claim.get("verdict")
    if isinstance(verdict, str) and verdict:
        stats.append(verdict)
    return f"{cid}: {contrast}\n" + ", ".join(stats)


def sample_level_plot(df: pd.DataFrame, claim: Mapping[str, Any] | None = None, *,
                      value_col: str = "value", arm_col: str = "arm",
                      unit_col: str = "animal", arms: Sequence[str] | None = None,
                      ylabel: str | None = None, title: str | None = None,
                      ax: plt.Axes | None = None) -> plt.Figure:
    """Box per arm with one point per animal/donor (the unit of replication).

    ``df`` holds sample-level values (e.g. rows of ``sample_scores.tsv`` for one measure).
    Samples of the same animal are averaged into one point. ``claim`` (a row of
    ``claims.tsv``) picks the two arms (reference first) and gives the title; ``arms``
    overrides the arms shown. Arms without samples are shown empty, with ``n = 0``.
    """
    _require(df, [value_col, arm_col], "sample_level_plot")
    data = df.copy()
    if unit_col not in data.columns:
        unit_col = "sample" if "sample" in data.columns else arm_col
    if arms is None:
        if claim is not None and "arm" in claim and "reference" in claim:
            arms = [str(claim["reference"]), str(claim["arm"])]
        else:
            arms = _ordered_arms(data[arm_col].astype(str))
    arms = list(arms)
    data[arm_col] = data[arm_col].astype(str)
    data = data[data[arm_col].isin(arms)]
    per_unit = (data.groupby([arm_col, unit_col], observed=True)[value_col].mean()
                .dropna().reset_index())

    if ax is None:
        fig, ax = plt.subplots(figsize=(0.9 + 0.75 * len(arms), 2.8))
    else:
        fig = ax.figure
    rng = np.random.default_rng(0)  # fixed jitter: identical figures on every run
    values = [per_unit.loc[per_unit[arm_col] == arm, value_col].to_numpy() for arm in arms]
    positions = np.arange(len(arms))
    filled = [i for i, v in enumerate(values) if len(v)]
    if filled:
        box = ax.boxplot([values[i] for i in filled], positions=positions[filled], widths=0.55,
                         showfliers=False, patch_artist=True, medianprops={"color": "black"},
                         whiskerprops={"linewidth": 0.6}, capprops={"linewidth": 0.6})
        for patch, i in zip(box["boxes"], filled, strict=True):
            patch.set_facecolor(arm_colour(arms[i], arms))
            patch.set_alpha(0.25)
            patch.set_edgecolor(arm_colour(arms[i], arms))
    for i, v in enumerate(values):
        jitter = rng.uniform(-0.12, 0.12, size=len(v))
        ax.scatter(positions[i] + jitter, v, s=18, color=arm_colour(arms[i], arms),
                   edgecolor="black", linewidth=0.4, zorder=3)
    ax.set_xticks(positions, [f"{arm}\n(n = {len(v)})" for arm, v in zip(arms, values,
                                                                        strict=True)])
    ax.set_xlim(-0.6, len(arms) - 0.4)
    if ylabel is None:
        ylabel = value_col
        if claim is not None and claim.get("measure"):
            measure, population = str(claim["measure"]), claim.get("population", "?")
            if measure.startswith("share_of:"):  # share_of:<level>:<parent>
                ylabel = f"{population} share of {measure.rsplit(':', 1)[-1]}"
            else:
                ylabel = f"{measure} in {population}"
    ax.set_ylabel(ylabel)
    if title is None and claim is not None:
        title = claim_title(claim)
    if title:
        ax.set_title(title, loc="left")
    if not filled:
        ax.text(0.5, 0.5, "no samples with a value", transform=ax.transAxes, ha="center",
                va="center", color="grey")
    return fig


def claim_label(row: Mapping[str, Any]) -> str:
    """Row label of a claim contrast: ``claim_id (arm vs reference[, stage])``."""
    label = f"{row['claim_id']} ({row.get('arm', '?')} vs {row.get('reference', '?')}"
    stage = row.get("stage")
    if isinstance(stage, str) and stage:
        label += f", {stage}"
    return label + ")"


def claims_heatmap(claims: pd.DataFrame, *, value_col: str = "hedges_g",
                   verdict_col: str = "verdict", study_col: str = "study",
                   studies: Sequence[str] | None = None, limit: float = 3.0) -> plt.Figure:
    """Claims x studies heat map of the effect (Hedges' g) with each verdict's mark.

    Colours saturate at ``±limit``; untestable cells (no effect) are grey. One row per
    claim contrast (``claim_label``), in the order of first appearance.
    """
    _require(claims, ["claim_id", value_col, verdict_col, study_col], "claims_heatmap")
    if claims.empty:
        raise ValueError("claims_heatmap: the claims table has no rows")
    data = claims.copy()
    data["_label"] = [claim_label(r) for r in data.to_dict("records")]
    rows = list(dict.fromkeys(data["_label"]))
    cols = list(studies) if studies is not None else list(dict.fromkeys(data[study_col]))
    effect = (data.pivot_table(index="_label", columns=study_col, values=value_col,
                               aggfunc="first", dropna=False)
              .reindex(index=rows, columns=cols))
    verdicts = (data.pivot_table(index="_label", columns=study_col, values=verdict_col,
                                 aggfunc="first", dropna=False)
                .reindex(index=rows, columns=cols))
    grid = effect.to_numpy(dtype=float)

    fig, ax = plt.subplots(figsize=(2.6 + 0.8 * len(cols), 0.9 + 0.26 * len(rows)))
    cmap = plt.get_cmap(EFFECT_CMAP).with_extremes(bad=MISSING_COLOUR)
    norm = TwoSlopeNorm(vmin=-limit, vcenter=0.0, vmax=limit)
    image = ax.imshow(np.ma.masked_invalid(np.clip(grid, -limit, limit)), cmap=cmap,
                      norm=norm, aspect="auto", interpolation="nearest")
    for i in range(len(rows)):
        for j in range(len(cols)):
            mark = verdict_mark(verdicts.iat[i, j])
            if mark:
                strong = np.isfinite(grid[i, j]) and abs(grid[i, j]) > 0.6 * limit
                ax.text(j, i, mark, ha="center", va="center", fontsize=8,
                        color="white" if strong else "black")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.tick_params(length=0)
    for side in ("left", "bottom"):
        ax.spines[side].set_visible(False)
    bar = fig.colorbar(image, ax=ax, shrink=min(1.0, 4.0 / max(len(rows), 1) + 0.3),
                       pad=0.02)
    bar.set_label(f"Hedges' g (arm vs reference, capped at ±{limit:g})")
    used = list(dict.fromkeys(data[verdict_col].dropna().astype(str)))
    legend = "   ".join(f"{verdict_mark(v)} {v}" for v in used)
    if legend:
        ax.set_title(legend, loc="left", fontsize=7)
    return fig


def forest_plot(studies: pd.DataFrame, pooled: pd.DataFrame | None = None, *,
                label_col: str = "label", study_col: str = "study",
                effect_col: str = "effect", low_col: str = "ci_low",
                high_col: str = "ci_high", xlabel: str = "Hedges' g (95% CI)") -> plt.Figure:
    """Forest plot: per claim (``label_col``), each study's effect and CI, then the pooled one.

    ``studies`` has one row per claim x study; ``pooled`` (optional) one row per claim with
    the same label, effect and CI columns, drawn as a diamond. Claims keep the order of
    first appearance in ``studies``.
    """
    _require(studies, [label_col, study_col, effect_col, low_col, high_col], "forest_plot")
    if studies.empty:
        raise ValueError("forest_plot: no study effects to draw")
    if pooled is not None:
        _require(pooled, [label_col, effect_col, low_col, high_col], "forest_plot (pooled)")
        pooled = pooled.drop_duplicates(label_col).set_index(label_col)
    labels = list(dict.fromkeys(studies[label_col]))
    lines: list[tuple[str, str, float, float, float]] = []  # kind, text, effect, low, high
    for label in labels:
        lines.append(("claim", str(label), np.nan, np.nan, np.nan))
        for row in studies[studies[label_col] == label].itertuples(index=False):
            r = row._asdict()
            lines.append(("study", f"  {r[study_col]}", r[effect_col], r[low_col],
                          r[high_col]))
        if pooled is not None and label in pooled.index:
            p = pooled.loc[label]
            lines.append(("pooled", "  pooled", p[effect_col], p[low_col], p[high_col]))

    fig, ax = plt.subplots(figsize=(5.0, 0.6 + 0.2 * len(lines)))
    ys = np.arange(len(lines))[::-1]
    for y, (kind, _, eff, low, high) in zip(ys, lines, strict=True):
        if kind == "study" and np.isfinite(eff):
            if np.isfinite(low) and np.isfinite(high):
                ax.plot([low, high], [y, y], color="black", linewidth=0.8)
            ax.plot(eff, y, marker="s", color=OKABE_ITO[0], markersize=4)
        elif kind == "pooled" and np.isfinite(eff):
            low = low if np.isfinite(low) else eff
            high = high if np.isfinite(high) else eff
            ax.add_patch(Polygon([(low, y), (eff, y + 0.3), (high, y), (eff, y - 0.3)],
                                 closed=True, facecolor=OKABE_ITO[1], edgecolor="black",
                                 linewidth=0.5))
    ax.axvline(0, color="grey", linewidth=0.6, linestyle="--")
    ax.set_yticks(ys, [text for _, text, *_ in lines])
    for tick, (kind, *_) in zip(ax.get_yticklabels(), lines, strict=True):
        if kind == "claim":
            tick.set_fontweight("bold")
    ax.tick_params(axis="y", length=0)
    ax.spines["left"].set_visible(False)
    finite = [v for _, _, e, lo, hi in lines for v in (e, lo, hi) if np.isfinite(v)]
    if finite:
        span = max(1.0, max(abs(v) for v in finite))
        ax.set_xlim(-1.1 * span, 1.1 * span)
    ax.set_ylim(-0.7, len(lines) - 0.3)
    ax.set_xlabel(xlabel)
    return fig


def integration_metric_plot(metrics: pd.DataFrame, *, metric_col: str = "metric",
                            value_col: str = "value",
                            group_col: str | None = "embedding") -> plt.Figure:
    """Dot plot of integration metrics, one row per metric, one colour per embedding/method.

    Accepts a long table (``metric_col``, ``value_col``, optionally ``group_col``) or a wide
    one (``group_col`` plus one numeric column per metric).
    """
    data = metrics.copy()
    if metric_col not in data.columns or value_col not in data.columns:
        numeric = [c for c in data.columns if pd.api.types.is_numeric_dtype(data[c])]
        if not numeric:
            raise ValueError(
                f"integration_metric_plot: expected columns '{metric_col}' and "
                f"'{value_col}' (long table) or numeric metric columns (wide table); "
                f"has {list(data.columns)}")
        ids = [group_col] if group_col in data.columns else []
        data = data.melt(id_vars=ids, value_vars=numeric, var_name=metric_col,
                         value_name=value_col)
    if group_col is None or group_col not in data.columns:
        group_col = "_group"
        data[group_col] = "value"
    data = data.dropna(subset=[value_col])
    if data.empty:
        raise ValueError("integration_metric_plot: no metric values to draw")
    names = list(dict.fromkeys(data[metric_col].astype(str)))
    groups = list(dict.fromkeys(data[group_col].astype(str)))
    fig, ax = plt.subplots(figsize=(4.2, 0.7 + 0.25 * len(names)))
    ys = {name: len(names) - 1 - i for i, name in enumerate(names)}
    offsets = np.linspace(-0.15, 0.15, len(groups)) if len(groups) > 1 else [0.0]
    for group, offset, colour in zip(groups, offsets, OKABE_ITO, strict=False):
        sub = data[data[group_col].astype(str) == group]
        ax.scatter(sub[value_col].astype(float),
                   [ys[m] + offset for m in sub[metric_col].astype(str)],
                   color=colour, s=22, edgecolor="black", linewidth=0.3, label=group, zorder=3)
    ax.set_yticks(list(ys.values()), list(ys.keys()))
    ax.grid(axis="y", color="#EEEEEE", linewidth=0.6)
    ax.set_xlabel(value_col)
    if group_col != "_group":
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), title=group_col)
    return fig


def message_figure(text: str, title: str | None = None) -> plt.Figure:
    """A small figure carrying only a message (e.g. why a claim could not be drawn)."""
    fig, ax = plt.subplots(figsize=(3.5, 1.6))
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, color="#444444")
    if title:
        ax.set_title(title, loc="left")
    return fig

"""Report stage: a figure per claim, cross-study figures and the run summary.

* :func:`plot_claim_figures` - one sample-level figure per row of a study's ``claims.tsv``
  (points per animal/donor from ``scores/sample_scores.tsv``);
* :func:`plot_claims_heatmap` / :func:`plot_forest` - claims x studies heat map of Hedges' g
  with verdict marks, and the forest plot of the meta-analysis (``claims_meta.tsv``);
* :func:`write_summary` - ``results/summary.md`` (leading with the verdict table across
  studies) and the same content as a self-contained ``results/summary.html``, plus the
  verdict table as TSV.

Every figure is written in every configured format with :func:`livermsc.plotting.save_figure`.
"""

from __future__ import annotations

import base64
import html
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from livermsc import plotting

log = logging.getLogger(__name__)

#: Columns of ``claims.tsv`` the report reads.
CLAIMS_COLUMNS = ["study", "claim_id", "kind", "arm", "reference", "population", "measure_type",
                  "measure", "method", "direction", "n_arm", "n_reference", "hedges_g",
                  "ci_low", "ci_high", "q_value", "verdict"]
#: Columns of ``sample_scores.tsv`` the report reads.
SCORES_COLUMNS = ["study", "sample", "animal", "arm", "population", "measure_type", "measure",
                  "method", "value"]
#: Columns naming what a claim measures; a claim's samples are the score rows matching them.
MEASURE_KEYS = ["population", "measure_type", "measure", "method"]
#: Columns that identify a claim contrast within a study.
CONTRAST_KEYS = ["claim_id", "arm", "reference", "stage"]
#: Candidate column names in ``claims_meta.tsv``: pooled effect and its CI.
META_EFFECT = ["pooled_g", "pooled_hedges_g", "hedges_g", "pooled_effect", "effect"]
META_LOW = ["pooled_ci_low", "ci_low"]
META_HIGH = ["pooled_ci_high", "ci_high"]
#: Order of preference of a figure format for embedding/linking (bitmap, vector, document).
PREFERRED_FORMATS = ["png", "svg", "pdf"]


# --- inputs -----------------------------------------------------------------------------------

def read_table(path: str | Path, required: Iterable[str], what: str) -> pd.DataFrame:
    """Read a TSV and check its columns; errors name the file, the table and what is missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} not found")
    try:
        df = pd.read_csv(path, sep="\t")
    except pd.errors.EmptyDataError as err:
        raise ValueError(f"{path}: {what} is empty (expected a header line)") from err
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: {what} lacks column(s) {missing} (has: {list(df.columns)})")
    return df


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value)) or value == ""


def preferred_format(formats: Sequence[str]) -> str:
    """The format to show in reports: PNG, else SVG, else PDF, else the first one."""
    for fmt in PREFERRED_FORMATS:
        if fmt in formats:
            return fmt
    if not formats:
        raise ValueError("report: no figure format configured (figures.formats is empty)")
    return formats[0]


def figure_stem(claim: Mapping[str, Any]) -> str:
    """File stem of a claim contrast's figure: ``<claim_id>__<arm>_vs_<reference>[__<stage>]``."""
    stem = f"{claim['claim_id']}__{claim['arm']}_vs_{claim['reference']}"
    stage = claim.get("stage")
    if not _blank(stage):
        stem += f"__{stage}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", stem)


def contrast_text(claim: Mapping[str, Any]) -> str:
    """``arm vs reference`` (plus ``, stage``) of a claim row."""
    text = f"{claim['arm']} vs {claim['reference']}"
    stage = claim.get("stage")
    return text if _blank(stage) else f"{text}, {stage}"


# --- per-claim figures --------------------------------------------------------------------

def claim_samples(scores: pd.DataFrame, claim: Mapping[str, Any],
                  stages: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Sample-level rows of ``scores`` measuring ``claim`` in its two arms.

    Rows match the claim's study, population (and population level), measure type and
    measure. Of several score methods, the claim's is taken; where the scores hold the measure
    under a single other method (shares are tested on the logit scale of the proportion the
    scores hold), that one is. If the claim is restricted to a ``stage``, only samples of that
    stage are kept (from a ``stage`` column of the scores, else ``stages``: sample -> stage).
    """
    mask = scores["arm"].astype(str).isin([str(claim["arm"]), str(claim["reference"])])
    for key in ["study", "population_level", *MEASURE_KEYS]:
        value = claim.get(key)
        if key != "method" and not _blank(value) and key in scores.columns:
            mask &= scores[key].astype(str) == str(value)
    out = scores[mask]
    if "method" in out.columns and not _blank(claim.get("method")):
        methods = out["method"].astype(str)
        if (methods == str(claim["method"])).any():
            out = out[methods == str(claim["method"])]
        elif methods.nunique() > 1:
            raise ValueError(f"claim {claim['claim_id']}: the scores hold measure "
                             f"{claim.get('measure')} under methods {sorted(methods.unique())} "
                             f"but not under the claim's method '{claim['method']}'")
    stage = claim.get("stage")
    if not _blank(stage):
        if "stage" in out.columns:
            out = out[out["stage"].astype(str) == str(stage)]
        elif stages:
            keep = {s for s, v in stages.items() if str(v) == str(stage)}
            out = out[out["sample"].astype(str).isin(keep)]
        else:
            raise ValueError(f"claim {claim['claim_id']} is restricted to stage '{stage}' but "
                             "neither the scores nor the sample sheet give a stage per sample")
    return out


def plot_claim_figures(scores: pd.DataFrame, claims: pd.DataFrame, outdir: str | Path,
                       formats: Sequence[str] = ("png",), dpi: int = 300,
                       stages: Mapping[str, str] | None = None) -> list[Path]:
    """Write one sample-level figure per claim contrast into ``outdir``; return the paths.

    A contrast without sample values (e.g. the population is absent from the study) still gets
    a figure, which states why (the claim's ``reason``).
    """
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    rows = claims.to_dict("records")
    stems = [figure_stem(r) for r in rows]
    dup = sorted({s for s in stems if stems.count(s) > 1})
    if dup:
        raise ValueError(f"claims table: several rows for the same claim contrast {dup} "
                         "(expected one row per claim_id x arm x reference x stage)")
    paths: list[Path] = []
    for row, stem in zip(rows, stems, strict=True):
        sub = claim_samples(scores, row, stages)
        if sub["value"].notna().any():
            fig = plotting.sample_level_plot(sub, row)
        else:
            reason = row.get("reason")
            text = "no sample-level values" + ("" if _blank(reason) else f":\n{reason}")
            fig = plotting.message_figure(text, title=plotting.claim_title(row))
        paths.extend(plotting.save_figure(fig, outdir / stem, formats, dpi))
    log.info("wrote %d claim figures (%d files) to %s", len(rows), len(paths), outdir)
    return paths


# --- cross-study figures ----------------------------------------------------------------------

def combine_claims(tables: Iterable[pd.DataFrame]) -> pd.DataFrame:
    """Concatenate the studies' claims tables (claims first, then controls, stable order)."""
    frames = [t for t in tables if not t.empty]
    if not frames:
        raise ValueError("report: every claims table is empty - nothing to report")
    claims = pd.concat(frames, ignore_index=True)
    if "stage" not in claims.columns:
        claims["stage"] = np.nan
    order = claims["kind"].map({"claim": 0, "control": 1}).fillna(2)
    return claims.assign(_order=order).sort_values("_order", kind="stable").drop(
        columns="_order").reset_index(drop=True)


def plot_claims_heatmap(claims: pd.DataFrame, stem: str | Path, formats: Sequence[str],
                        dpi: int = 300, limit: float = 3.0) -> list[Path]:
    """Claims x studies heat map of Hedges' g with verdict marks, in every format."""
    fig = plotting.claims_heatmap(claims, limit=limit)
    return plotting.save_figure(fig, stem, formats, dpi)


def _first_column(df: pd.DataFrame, candidates: Sequence[str], what: str,
                  source: str) -> str:
    for col in candidates:
        if col in df.columns:
            return col
    raise ValueError(f"{source}: no {what} column (expected one of {list(candidates)}; "
                     f"has {list(df.columns)})")


def forest_tables(claims: pd.DataFrame, meta: pd.DataFrame | None,
                  source: str = "claims_meta.tsv") -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Rows of the forest plot: each study's Hedges' g with its 95% CI (``ci_low``/``ci_high``
    of the claims table, on the g scale), and the pooled effects of the meta-analysis table,
    matched on ``claim_id`` and on ``arm``/``reference``/``stage`` where it has them. Only rows
    pooled from at least two studies (column ``k``, where the table has it) get a pooled line:
    with one study the "pooled" effect would only repeat that study.
    """
    studies = claims.copy()
    studies["label"] = [plotting.claim_label(r) for r in studies.to_dict("records")]
    studies = studies.assign(effect=studies["hedges_g"].astype(float),
                             ci_low=studies["ci_low"].astype(float),
                             ci_high=studies["ci_high"].astype(float))
    # contrasts no study could test (arm or stage absent, ...) have nothing to draw
    studies = studies.loc[np.isfinite(studies["effect"]),
                          ["label", "study", "effect", "ci_low", "ci_high"]]
    if meta is None:
        return studies, None
    effect = _first_column(meta, META_EFFECT, "pooled effect", source)
    low = _first_column(meta, META_LOW, "lower CI", source)
    high = _first_column(meta, META_HIGH, "upper CI", source)
    if "k" in meta.columns:
        meta = meta[pd.to_numeric(meta["k"], errors="coerce").fillna(0) >= 2]
    pooled = match_meta(claims, meta, source)
    pooled = pooled.rename(columns={effect: "effect", low: "ci_low", high: "ci_high"})
    pooled = pooled[pooled["label"].isin(studies["label"])]
    return studies, pooled[["label", "effect", "ci_low", "ci_high"]]


def _key_strings(df: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """The key columns as strings, missing values as empty strings (safe to merge on)."""
    return pd.DataFrame({k: ["" if _blank(v) else str(v) for v in df[k]] for k in keys},
                        index=df.index)


def match_meta(claims: pd.DataFrame, meta: pd.DataFrame,
               source: str = "claims_meta.tsv") -> pd.DataFrame:
    """Rows of the meta-analysis table with the ``label`` and ``contrast`` of their claim.

    Matched on ``claim_id`` and on ``arm``/``reference``/``stage`` where the meta table has
    them; meta rows matching no claim contrast are dropped.
    """
    if "claim_id" not in meta.columns:
        raise ValueError(f"{source}: no 'claim_id' column (has {list(meta.columns)})")
    keys = ["claim_id"] + [k for k in ("arm", "reference", "stage") if k in meta.columns]
    contrasts = claims.drop_duplicates(
        ["claim_id", "arm", "reference", "stage"]).reset_index(drop=True)
    left = _key_strings(contrasts, keys)
    left["label"] = [plotting.claim_label(r) for r in contrasts.to_dict("records")]
    left["contrast"] = [contrast_text(r) for r in contrasts.to_dict("records")]
    left = left.drop_duplicates(keys)
    right = meta.drop(columns=[c for c in ("label", "contrast") if c in meta.columns])
    right = pd.concat([_key_strings(right, keys).add_prefix("_key_"),
                       right.drop(columns=keys)], axis=1)
    merged = left.merge(right, left_on=keys, right_on=[f"_key_{k}" for k in keys],
                        how="inner")
    return merged.drop(columns=[f"_key_{k}" for k in keys])


def plot_forest(claims: pd.DataFrame, meta: pd.DataFrame | None, stem: str | Path,
                formats: Sequence[str], dpi: int = 300,
                source: str = "claims_meta.tsv") -> list[Path]:
    """Forest plot of every claim contrast: study effects with CIs and the pooled diamond."""
    studies, pooled = forest_tables(claims, meta, source)
    if studies.empty:  # no contrast could be tested anywhere: say so, do not stop the run
        fig, ax = plotting.plt.subplots(figsize=(6.5, 1.5))
        ax.axis("off")
        ax.text(0.0, 0.8, "forest plot: not drawn\nno claim contrast has a study effect "
                "(every row inconclusive; see the claims tables for why)", va="top",
                ha="left", fontsize=9, transform=ax.transAxes)
        return plotting.save_figure(fig, stem, formats, dpi)
    fig = plotting.forest_plot(studies, pooled)
    return plotting.save_figure(fig, stem, formats, dpi)


# --- summary ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Block:
    """One piece of the summary: ``kind`` is h1, h2, h3, p, table or image."""

    kind: str
    content: Any
    caption: str = ""


def verdict_overview(claims: pd.DataFrame, meta: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per claim contrast, one column per study: verdict mark, verdict, g and q."""
    claims = claims.copy()
    claims["contrast"] = [contrast_text(r) for r in claims.to_dict("records")]
    claims["cell"] = [
        f"{plotting.verdict_mark(r['verdict'])} {r['verdict']} "
        f"(g = {plotting.format_number(r['hedges_g'])}, "
        f"q = {plotting.format_number(r['q_value'])})".strip()
        for r in claims.to_dict("records")]
    index = ["claim_id", "kind", "contrast", "population", "measure", "direction"]
    studies = list(dict.fromkeys(claims["study"].astype(str)))
    base = claims.drop_duplicates(["claim_id", "contrast"])[index]
    wide = claims.pivot_table(index=["claim_id", "contrast"], columns="study", values="cell",
                              aggfunc="first")
    table = base.merge(wide.reset_index(), on=["claim_id", "contrast"], how="left")
    table = table[[*index, *studies]].rename(columns={"claim_id": "claim",
                                                      "direction": "predicted"})
    if meta is not None:
        effect = next((c for c in META_EFFECT if c in meta.columns), None)
        pooled = match_meta(claims, meta)
        pooled["pooled"] = [
            (f"{plotting.verdict_mark(r['verdict'])} {r['verdict']} "
             if "verdict" in pooled.columns else "")
            + (f"(g = {plotting.format_number(r[effect])})" if effect else "")
            for r in pooled.to_dict("records")]
        table = table.merge(pooled[["claim_id", "contrast", "pooled"]].rename(
            columns={"claim_id": "claim"}), on=["claim", "contrast"], how="left")
        table["pooled"] = table["pooled"].fillna("")
    return table


def verdict_counts(claims: pd.DataFrame) -> pd.DataFrame:
    """Number of claim contrasts per study, kind (claim or control) and verdict."""
    counts = pd.crosstab([claims["study"], claims["kind"]], claims["verdict"])
    return counts.reset_index()


def study_claims_table(claims: pd.DataFrame, figure_dir: str, fmt: str) -> pd.DataFrame:
    """A study's claim contrasts with effect, CI, p, q, verdict, reason and figure link."""
    rows = []
    for r in claims.to_dict("records"):
        rows.append({
            "claim": r["claim_id"],
            "contrast": contrast_text(r),
            "n (arm / ref)": f"{plotting.format_number(r['n_arm'], 0)} / "
                             f"{plotting.format_number(r['n_reference'], 0)}",
            "g": plotting.format_number(r["hedges_g"]),
            "95% CI": (f"[{plotting.format_number(r.get('ci_low'))}, "
                       f"{plotting.format_number(r.get('ci_high'))}]"),
            "q": plotting.format_number(r["q_value"]),
            "verdict": f"{plotting.verdict_mark(r['verdict'])} {r['verdict']}",
            "reason": "" if _blank(r.get("reason")) else str(r["reason"]),
            "figure": f"[{figure_stem(r)}]({figure_dir}/{figure_stem(r)}.{fmt})",
        })
    return pd.DataFrame(rows)


def build_summary(claims: pd.DataFrame, meta: pd.DataFrame | None, *,
                  figures: Mapping[str, str], claim_figure_dirs: Mapping[str, str],
                  qc: Mapping[str, pd.DataFrame] | None = None,
                  metrics: Mapping[str, pd.DataFrame] | None = None,
                  fmt: str = "png", config: Mapping[str, Any] | None = None) -> list[Block]:
    """The summary's content, leading with the verdict table across studies.

    ``figures`` maps a title to a figure path and ``claim_figure_dirs`` a study to the folder
    of its claim figures, both relative to the summary's folder.
    """
    studies = list(dict.fromkeys(claims["study"].astype(str)))
    blocks = [
        Block("h1", "livermsc: verdicts on the claimed mechanisms of MSC therapy"),
        Block("p", f"Studies: {', '.join(studies)}. Each claim contrast is tested with the "
                   "animal or donor as the unit of replication (cells are never replicates). "
                   "g: Hedges' g of arm vs reference; q: Benjamini-Hochberg adjusted p value."
                   + (f" Seed: {config.get('seed')}." if config else "")),
        Block("h2", "Claims verdicts across studies"),
        Block("table", verdict_overview(claims, meta)),
        Block("p", "Marks: " + ", ".join(
            f"{plotting.verdict_mark(v)} {v}"
            for v in dict.fromkeys(claims["verdict"].dropna().astype(str)))),
        Block("h2", "Verdict counts"),
        Block("table", verdict_counts(claims)),
    ]
    for title, path in figures.items():
        blocks += [Block("h2", title), Block("image", path, caption=title)]
    for study in studies:
        sub = claims[claims["study"].astype(str) == study]
        blocks += [Block("h2", f"Study {study}"), Block("h3", "Claims"),
                   Block("table", study_claims_table(sub, claim_figure_dirs[study], fmt))]
        if qc and study in qc:
            blocks += [Block("h3", "Quality control"), *qc_notes(qc[study]),
                       Block("table", qc[study])]
        if metrics and study in metrics:
            blocks += [Block("h3", "Integration metrics"), Block("table", metrics[study])]
    return blocks


def qc_notes(qc: pd.DataFrame) -> list[Block]:
    """A sentence naming the samples QC left without cells (the study went on without them)."""
    if "n_cells_out" not in qc or "sample" not in qc:
        return []
    lost = qc.loc[pd.to_numeric(qc["n_cells_out"], errors="coerce") == 0, "sample"].astype(str)
    if lost.empty:
        return []
    return [Block("p", f"Left out: {', '.join(lost)} lost every cell in QC; this study's "
                       "statistics use its other samples.")]


def _cell(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        return plotting.format_number(value, 3)
    return "" if value is None else str(value)


def render_markdown(blocks: Sequence[Block]) -> str:
    """The summary as GitHub-flavoured Markdown."""
    out: list[str] = []
    for b in blocks:
        if b.kind in {"h1", "h2", "h3"}:
            out.append("#" * int(b.kind[1]) + " " + str(b.content))
        elif b.kind == "p":
            out.append(str(b.content))
        elif b.kind == "table":
            df: pd.DataFrame = b.content
            def esc(text: str) -> str:
                return text.replace("|", "\\|").replace("\n", " ")
            out.append("| " + " | ".join(esc(str(c)) for c in df.columns) + " |")
            out.append("|" + "---|" * len(df.columns))
            for row in df.itertuples(index=False):
                out.append("| " + " | ".join(esc(_cell(v)) for v in row) + " |")
        elif b.kind == "image":
            out.append(f"![{b.caption}]({b.content})")
        else:
            raise ValueError(f"unknown summary block kind '{b.kind}'")
        out.append("")
    return "\n".join(out)


_LINK = re.compile(r"\[([^\]]+)\]\(([^)]+)\)")


def _html_text(text: str) -> str:
    """Escape text for HTML, turning Markdown links ``[a](b)`` into anchors."""
    parts, last = [], 0
    for m in _LINK.finditer(text):
        parts.append(html.escape(text[last:m.start()]))
        parts.append(f'<a href="{html.escape(m.group(2))}">{html.escape(m.group(1))}</a>')
        last = m.end()
    parts.append(html.escape(text[last:]))
    return "".join(parts)


_MIME = {"png": "image/png", "svg": "image/svg+xml", "jpg": "image/jpeg", "jpeg": "image/jpeg"}
_CSS = """
body { font-family: "DejaVu Sans", Arial, Helvetica, sans-serif; font-size: 14px;
       max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 12px; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
img { max-width: 100%; }
h1, h2, h3 { font-weight: 600; }
"""


def render_html(blocks: Sequence[Block], base_dir: str | Path, embed: bool = True) -> str:
    """The summary as one HTML page; PNG/SVG figures are embedded when ``embed`` is true.

    Image paths are relative to ``base_dir`` (the summary's folder); PDFs are linked.
    """
    base_dir = Path(base_dir)
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">']
    title = next((str(b.content) for b in blocks if b.kind == "h1"), "livermsc summary")
    out += [f"<title>{html.escape(title)}</title>", f"<style>{_CSS}</style>", "</head>",
            "<body>"]
    for b in blocks:
        if b.kind in {"h1", "h2", "h3"}:
            out.append(f"<{b.kind}>{html.escape(str(b.content))}</{b.kind}>")
        elif b.kind == "p":
            out.append(f"<p>{_html_text(str(b.content))}</p>")
        elif b.kind == "table":
            df = b.content
            out.append("<table>")
            out.append("<tr>" + "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
                       + "</tr>")
            for row in df.itertuples(index=False):
                out.append("<tr>" + "".join(f"<td>{_html_text(_cell(v))}</td>" for v in row)
                           + "</tr>")
            out.append("</table>")
        elif b.kind == "image":
            rel = str(b.content)
            suffix = Path(rel).suffix.lstrip(".").lower()
            if suffix in _MIME:
                src = html.escape(rel)
                if embed:
                    data = base64.b64encode((base_dir / rel).read_bytes()).decode("ascii")
                    src = f"data:{_MIME[suffix]};base64,{data}"
                out.append(f'<figure><img src="{src}" alt="{html.escape(b.caption)}">'
                           f"<figcaption>{html.escape(b.caption)}</figcaption></figure>")
            else:
                out.append(f'<p><a href="{html.escape(rel)}">{html.escape(b.caption)} '
                           f"({suffix.upper()})</a></p>")
        else:
            raise ValueError(f"unknown summary block kind '{b.kind}'")
    out += ["</body>", "</html>", ""]
    return "\n".join(out)


def _relative(path: str | Path, start: str | Path) -> str:
    """``path`` relative to the folder ``start``, with forward slashes."""
    return Path(os.path.relpath(Path(path), Path(start))).as_posix()


def write_summary(claims_paths: Sequence[str | Path], meta_path: str | Path | None,
                  md_path: str | Path, html_path: str | Path, verdicts_path: str | Path,
                  heatmap_stem: str | Path, forest_stem: str | Path,
                  claim_figure_dirs: Mapping[str, str | Path],
                  formats: Sequence[str] = ("png",), dpi: int = 300,
                  qc_paths: Mapping[str, str | Path] | None = None,
                  metrics_paths: Mapping[str, str | Path] | None = None,
                  effect_limit: float = 3.0, embed: bool = True,
                  config: Mapping[str, Any] | None = None) -> None:
    """Draw the heat map and forest plot, then write the summary (Markdown, HTML, TSV).

    All tables are read and checked before any figure is drawn.
    """
    tables = [read_table(p, CLAIMS_COLUMNS, "claims table") for p in claims_paths]
    claims = combine_claims(tables)
    meta = (read_table(meta_path, ["claim_id"], "meta-analysis table")
            if meta_path is not None else None)
    qc = {s: read_table(p, [], "QC summary") for s, p in (qc_paths or {}).items()}
    metrics = {s: read_table(p, [], "integration metrics")
               for s, p in (metrics_paths or {}).items()}
    fmt = preferred_format(formats)
    summary_dir = Path(md_path).parent

    plot_claims_heatmap(claims, heatmap_stem, formats, dpi, limit=effect_limit)
    figures = {"Effects across studies": _relative(f"{heatmap_stem}.{fmt}", summary_dir)}
    if meta is not None:
        plot_forest(claims, meta, forest_stem, formats, dpi, source=str(meta_path))
        figures["Meta-analysis (forest plot)"] = _relative(f"{forest_stem}.{fmt}", summary_dir)
    dirs = {s: _relative(d, summary_dir) for s, d in claim_figure_dirs.items()}
    missing = sorted(set(claims["study"].astype(str)) - set(dirs))
    if missing:
        raise ValueError(f"report: no claim-figure folder for stud(ies) {missing}")
    blocks = build_summary(claims, meta, figures=figures, claim_figure_dirs=dirs, qc=qc,
                           metrics=metrics, fmt=fmt, config=config)
    Path(md_path).parent.mkdir(parents=True, exist_ok=True)
    Path(md_path).write_text(render_markdown(blocks))
    Path(html_path).parent.mkdir(parents=True, exist_ok=True)
    Path(html_path).write_text(render_html(blocks, summary_dir, embed=embed))
    Path(verdicts_path).parent.mkdir(parents=True, exist_ok=True)
    verdict_overview(claims, meta).to_csv(verdicts_path, sep="\t", index=False)
    log.info("wrote %s, %s and %s", md_path, html_path, verdicts_path)


# --- Snakemake entry points -----------------------------------------------------------------

def _stem(paths: Sequence[str]) -> Path:
    """The common stem of one figure's files (``x.pdf``, ``x.png`` -> ``x``)."""
    stems = {Path(p).with_suffix("") for p in paths}
    if len(stems) != 1:
        raise ValueError(f"expected the files of one figure, got {list(paths)}")
    return stems.pop()


def rule_report_claims(smk: Any) -> None:
    """Rule ``report_claims``: one figure per claim contrast of one study."""
    scores = read_table(smk.input.scores, SCORES_COLUMNS, "sample scores")
    claims = read_table(smk.input.claims, CLAIMS_COLUMNS, "claims table")
    plot_claim_figures(scores, claims, smk.output.figures, smk.params.formats, smk.params.dpi,
                       stages=dict(smk.params.stages))


def rule_report_summary(smk: Any) -> None:
    """Rule ``report_summary``: heat map, forest plot and the summary of every study."""
    studies = list(smk.params.studies)
    write_summary(
        claims_paths=list(smk.input.claims), meta_path=smk.input.meta,
        md_path=smk.output.md, html_path=smk.output.html, verdicts_path=smk.output.verdicts,
        heatmap_stem=_stem(smk.output.heatmap), forest_stem=_stem(smk.output.forest),
        claim_figure_dirs=dict(zip(studies, smk.input.figures, strict=True)),
        formats=smk.params.formats, dpi=smk.params.dpi,
        qc_paths=dict(zip(studies, smk.input.qc, strict=True)),
        metrics_paths=dict(zip(studies, smk.input.metrics, strict=True)),
        effect_limit=smk.params.effect_limit, embed=smk.params.embed, config=smk.config)

"""Verdicts on claims: one row per claim x contrast per study, and the claims pooled across studies.

For every claim of the catalogue (``claims.catalogue``, schema ``claims.schema.yaml``) and each
of its contrasts, one model is fitted on the animals (donors) of the cells the contrast compares
(:mod:`livermsc.stats`):

* **Contrasts**: ``arm`` vs ``reference`` (optionally within one ``stage``); an ``interaction``
  (the arm effect at one stage minus the arm effect at another); a ``synergy`` (a combination
  arm against the additive expectation of its components, ``combo - A - B + reference``). Each
  is one contrast vector of one model, so each row has one p-value.
* **Design**: by default only the animals of the compared cells, each cell with its own residual
  variance (Welch-Satterthwaite df); ``pool_arms`` adds the other arms' animals (still with
  arm-specific variances), which only helps to estimate a batch effect. A recorded batch is
  adjusted for where the contrast stays estimable; a batch confounded with arm makes the row
  ``inconclusive`` ("batch confounded with arm"); a study without a batch column reads "no batch
  recorded". Pairing comes only from the study file (``paired_by``): pairs seen in both arms get
  a block; animals of a declared pair seen in one arm only are left out (noted); with fewer
  complete pairs than ``min_samples_per_arm`` the row is tested unpaired (noted).
* **Signatures** (primary method ``voom``): :func:`livermsc.geneset.signature_test` on the
  population's pseudobulk counts (TMM, expression filter, voom weights); the effect is the
  signature's log2 fold change. Other score methods (``sample_scores.tsv``) are tested with the
  same design on their per-animal values (``claims_methods.tsv``, a sensitivity analysis).
* **Shares**: the state's cells out of the parent's cells per animal in a quasi-binomial GLM
  (Williams' extra-binomial variation); the effect is the log odds ratio. A sample counts when
  its parent has ``min_parent_cells`` cells and the state's expected count there (parent cells x
  the pooled share) reaches ``min_expected_count``.

Effects: Hedges' g is the estimate over the same model's residual SD (times J); its 95% CI
inverts the noncentral t, the raw effect's CI is the t interval, so both agree with p.
q-values are Benjamini-Hochberg within a study, separately for claims and controls
(``alpha_test`` is the per-test alpha the step-up rule needed for the row); the minimum
detectable effect is given at that alpha, in the unit of the effect and as g. Verdicts:

* ``supported`` / ``contradicted``: q < alpha, effect with / against the predicted direction;
* ``no_effect``: not significant, and a TOST against the smallest effect of interest
  (``sesoi_fold_change`` for signatures, ``sesoi_odds_ratio`` for shares, ``sesoi_g`` for
  score methods without a natural unit) has its BH q below alpha;
* ``inconclusive``: otherwise, with the reason (untestable, confounded, or underpowered).

A claim row whose population x measure has a failed positive control in the same study (a
tested control that is not ``supported``; for a population or a signature, when none of its
tested controls is supported) carries a ``flag`` and the flag leads its reason.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from livermsc import annotate, stats
from livermsc.catalogue import load_catalogue, load_panel, load_signatures
from livermsc.config import claims_settings, score_settings
from livermsc.geneset import signature_test
from livermsc.schema import ConfigError, validate
from livermsc.vocabulary import ALL, SHARE_METHOD, VOOM, share_measure

log = logging.getLogger("livermsc.claims")

CLAIM_COLUMNS = ["study", "claim_id", "kind", "statement", "contrast", "contrast_type", "arm",
                 "reference", "stage", "population", "population_level", "measure_type",
                 "measure", "method", "direction", "n_arm", "n_reference", "mean_arm",
                 "mean_reference", "effect", "effect_unit", "effect_ci_low", "effect_ci_high",
                 "log2fc", "odds_ratio", "hedges_g", "ci_low", "ci_high", "g_var", "se", "df",
                 "p_value", "q_value", "alpha_test", "mde", "mde_g", "sesoi", "p_equivalence",
                 "q_equivalence", "paired", "batch", "n_genes_used", "genes_used",
                 "marker_overlap", "verdict", "flag", "reason", "test", "notes"]
KEY_COLUMNS = ["claim_id", "kind", "contrast", "arm", "reference", "stage", "population",
               "measure_type", "measure", "method", "direction"]
META_COLUMNS = [*KEY_COLUMNS, "k", "studies", "effect_unit", "hedges_g", "se", "ci_low",
                "ci_high", "pi_low", "pi_high", "p_value", "q_value", "tau2", "i2", "q_stat",
                "q_p", "method_meta", "verdict", "reason"]
VERDICTS = ("supported", "contradicted", "no_effect", "inconclusive")


# --- config check ---------------------------------------------------------------------------------

def check_config(config: Mapping) -> None:
    """Check, before any job runs, the claims catalogue and signatures file a run will use:
    both parse, every signature a claim names exists, and the verdict method is computed."""
    score_cfg = score_settings(config.get("score"))
    settings = claims_settings(config.get("claims"))
    if settings["method"] != VOOM and settings["method"] not in score_cfg["methods"]:
        raise ConfigError(f"config: field 'claims.method': '{settings['method']}' is not among "
                          f"score.methods {score_cfg['methods']} (expected one of them, or voom)")
    known = set(load_signatures(score_cfg["signatures"], "mouse")) | set(
        load_signatures(score_cfg["signatures"], "human"))
    load_catalogue(settings["catalogue"], known)


def measure_name(claim: Mapping) -> str:
    """The ``measure`` string of a claim: the signature id or the share measure name."""
    m = claim["measure"]
    if m["type"] == "signature":
        return m["signature"]
    parent = m.get("parent") or {"level": ALL, "value": ALL}
    return share_measure(parent["level"], parent["value"])


# --- contrasts ------------------------------------------------------------------------------------

@dataclass
class ContrastSpec:
    """The cells a contrast compares and its weights on their means."""

    type: str
    arm: str
    reference: str
    stage: str                                   # the stage column of the table row
    label: str
    cells: dict[str, tuple[str, str]]            # cell -> (arm, stage or "")
    weights: dict[str, float]
    reference_cell: str
    extra: list[str] = field(default_factory=list)   # pooled arms (weight 0)


def contrast_spec(contrast: Mapping) -> ContrastSpec:
    """Cells, weights and labels of a contrast of a validated catalogue."""
    kind = contrast["type"]
    arm, ref = str(contrast["arm"]), str(contrast["reference"])
    if kind == "interaction":
        s1, s2 = (str(s) for s in contrast["levels"])
        cells = {f"{arm}@{s1}": (arm, s1), f"{ref}@{s1}": (ref, s1),
                 f"{arm}@{s2}": (arm, s2), f"{ref}@{s2}": (ref, s2)}
        weights = {f"{arm}@{s1}": 1.0, f"{ref}@{s1}": -1.0, f"{arm}@{s2}": -1.0,
                   f"{ref}@{s2}": 1.0}
        return ContrastSpec(kind, arm, ref, f"{s1} minus {s2}",
                            f"{arm} vs {ref}: {s1} minus {s2} (interaction)", cells, weights,
                            f"{ref}@{s2}")
    stage = str(contrast.get("stage", "") or "")
    if kind == "synergy":
        a, b = (str(x) for x in contrast["components"])
        names = [arm, a, b, ref]
        cells = {x: (x, stage) for x in names}
        weights = {arm: 1.0, a: -1.0, b: -1.0, ref: 1.0}
        label = f"{arm} vs additive {a} + {b} - {ref} (synergy)" + (f" ({stage})" if stage else "")
        return ContrastSpec(kind, arm, f"additive({a}+{b})", stage, label, cells, weights, ref)
    label = f"{arm} vs {ref}" + (f" ({stage})" if stage else "")
    return ContrastSpec("simple", arm, ref, stage, label, {arm: (arm, stage), ref: (ref, stage)},
                        {arm: 1.0, ref: -1.0}, ref)


# --- evaluation -----------------------------------------------------------------------------------

def _fmt(x: float, digits: int = 3) -> str:
    return "NA" if x is None or not np.isfinite(x) else f"{x:.{digits}g}"


def score_index(scores: pd.DataFrame) -> dict:
    """Rows of the score table by (level, population, measure type, measure, method), and the
    largest cell count of each population."""
    keys = ["population_level", "population", "measure_type", "measure", "method"]
    return {"rows": dict(iter(scores.groupby(keys, sort=False, observed=True))),
            "pop_cells": scores.groupby(["population_level", "population"], observed=True)
            ["n_cells"].max().fillna(0).to_dict()}


@dataclass
class StudyData:
    """What every row of one study needs: sample info, indexed scores, counts, pairing."""

    info: pd.DataFrame                      # sample -> animal, arm, batch, stage
    index: dict
    coverage: pd.DataFrame
    batch_recorded: bool
    pairs: Mapping[str, str] | None
    pseudobulk: Any = None                  # AnnData of the score stage, or None
    pb_rows: dict = field(default_factory=dict)
    symbol_to_var: dict = field(default_factory=dict)
    marker_overlap: Callable[[str, str, str], Sequence[str]] | None = None


def _study_data(scores: pd.DataFrame, coverage: pd.DataFrame, pseudobulk: Any,
                pairs: Mapping[str, str] | None, marker_overlap: Any) -> StudyData:
    scores = scores.copy()
    for col in ("stage", "batch"):
        if col not in scores:
            scores[col] = ""
        scores[col] = scores[col].fillna("").astype(str)
    scores["sample"] = scores["sample"].astype(str)
    scores["animal"] = scores["animal"].fillna(scores["sample"]).astype(str)
    info = scores[["sample", "animal", "arm", "batch", "stage"]].drop_duplicates("sample")
    info = info.set_index("sample")
    batch = info["batch"]
    recorded = bool(((batch != "") & (batch != info.index.to_series())).any())
    data = StudyData(info, score_index(scores), coverage, recorded, pairs,
                     marker_overlap=marker_overlap)
    if pseudobulk is not None:
        obs = pseudobulk.obs
        data.pseudobulk = pseudobulk
        keys = list(zip(obs["population_level"].astype(str), obs["population"].astype(str),
                        strict=True))
        rows: dict = {}
        for i, (key, sample) in enumerate(zip(keys, obs["sample"].astype(str), strict=True)):
            rows.setdefault(key, {})[sample] = i
        data.pb_rows = rows
        cells = obs.assign(_n=pd.to_numeric(obs["n_cells"], errors="coerce").fillna(0))
        for key, n in cells.groupby([obs["population_level"].astype(str),
                                     obs["population"].astype(str)])["_n"].max().items():
            data.index["pop_cells"][key] = max(n, data.index["pop_cells"].get(key, 0))
        names = [str(v) for v in pseudobulk.var_names]
        lookup = {n: n for n in names}
        for col in ("symbol", "gene_symbols", "gene_symbol", "feature_name"):
            if col in pseudobulk.var:
                for name, sym in zip(names, pseudobulk.var[col].astype(str), strict=True):
                    lookup.setdefault(sym, name)
                break
        data.symbol_to_var = lookup
    return data


def _base_row(claim: Mapping, spec: ContrastSpec, method: str) -> dict:
    pop = claim["population"]
    mtype = claim["measure"]["type"]
    return {"claim_id": claim["id"], "kind": claim["kind"],
            "statement": claim["statement"], "contrast": spec.label,
            "contrast_type": spec.type, "arm": spec.arm, "reference": spec.reference,
            "stage": spec.stage, "population": pop["value"], "population_level": pop["level"],
            "measure_type": mtype, "measure": measure_name(claim),
            "method": SHARE_METHOD if mtype == "share" else method,
            "direction": claim["direction"], "n_arm": 0, "n_reference": 0, "paired": False,
            "batch": "", "reason": "", "test": "", "notes": "", "flag": "",
            "n_genes_used": np.nan, "genes_used": "", "marker_overlap": ""}


def _units(samples: pd.DataFrame, spec: ContrastSpec) -> pd.DataFrame:
    """Samples of the contrast's cells grouped into units (animal x cell)."""
    parts = []
    for cell, (arm, stage) in spec.cells.items():
        sel = samples[(samples["arm"] == arm) & ((samples["stage"] == stage) if stage else True)]
        parts.append(sel.assign(cell=cell))
    for arm in spec.extra:
        sel = samples[(samples["arm"] == arm) & ((samples["stage"] == spec.stage)
                                                 if spec.stage else True)]
        parts.append(sel.assign(cell=arm))
    out = pd.concat(parts) if parts else samples.iloc[:0].assign(cell="")
    out["unit"] = out["animal"].astype(str) + "|" + out["cell"].astype(str)
    return out


def _missing_cells(info: pd.DataFrame, spec: ContrastSpec) -> str:
    arms = sorted(info["arm"].unique())
    for arm, stage in dict.fromkeys(spec.cells.values()):
        if arm not in arms:
            return f"arm '{arm}' absent in study (arms: {', '.join(arms)})"
        if stage and not ((info["arm"] == arm) & (info["stage"] == stage)).any():
            stages = sorted(s for s in info.loc[info["arm"] == arm, "stage"].unique() if s)
            return f"no '{arm}' samples at stage '{stage}' (stages: {', '.join(stages) or 'none'})"
    return ""


def _signature_genes(data: StudyData, measure: str) -> tuple[list[str], int, int]:
    cov = data.coverage[data.coverage["signature"] == measure]
    if cov.empty:
        return [], 0, 0
    found = str(cov["genes_found"].iloc[0]) if "genes_found" in cov else ""
    genes = [g for g in found.split(",") if g and g != "nan"]
    return genes, int(cov["n_found"].iloc[0]), int(cov["n_genes"].iloc[0])


def evaluate_contrast(data: StudyData, claim: Mapping, contrast: Mapping, method: str,
                      settings: Mapping, score_cfg: Mapping) -> dict:
    """Test one claim x contrast with one method; returns a claims-table row (no q/verdict yet).

    ``reason`` is set when the contrast cannot be tested (the row is then inconclusive)."""
    spec = contrast_spec(contrast)
    row = _base_row(claim, spec, method)
    info = data.info
    min_n = int(settings["min_samples_per_arm"])
    min_genes, min_cells = int(score_cfg["min_genes"]), int(score_cfg["min_cells"])
    pop = claim["population"]
    mtype = row["measure_type"]
    measure = row["measure"]
    row["reason"] = _missing_cells(info, spec)
    if row["reason"]:
        return row
    if settings["pool_arms"] and spec.type == "simple" and mtype == "signature":
        spec.extra = sorted(set(info["arm"]) - {spec.arm, spec.reference})
    genes: list[str] = []
    extra: list[str] = []
    if mtype == "signature":
        genes, n_found, n_genes = _signature_genes(data, measure)
        if n_found < min_genes:
            row["reason"] = (f"signature coverage too low: {n_found} of {n_genes} genes of "
                             f"'{measure}' found (min_genes {min_genes})")
            return row
        if data.marker_overlap is not None:
            overlap = data.marker_overlap(pop["level"], pop["value"], measure)
            row["marker_overlap"] = ",".join(overlap)
    if data.index["pop_cells"].get((pop["level"], pop["value"]), 0) == 0:
        row["reason"] = f"population {pop['level']} '{pop['value']}' absent in study"
        return row
    use_counts = mtype == "signature" and method == VOOM
    key = (pop["level"], pop["value"], mtype, measure, SHARE_METHOD if mtype == "share" else method)
    sel = data.index["rows"].get(key)
    if use_counts and data.pseudobulk is None:
        row["reason"] = "no pseudobulk counts given: the voom signature test cannot run"
        return row
    if not use_counts and sel is None:
        row["reason"] = (f"no '{row['method']}' values of '{measure}' for {pop['level']} "
                         f"'{pop['value']}' in the score table")
        return row
    samples = info.reset_index()
    units = _units(samples, spec)
    # per-sample measurements
    if mtype == "share":
        vals = sel.drop_duplicates("sample").set_index("sample")
        units["n"] = vals["n_cells"].reindex(units["sample"]).fillna(0).to_numpy(float)
        units["N"] = vals["n_parent_cells"].reindex(units["sample"]).fillna(0).to_numpy(float)
    elif use_counts:
        pb_rows = data.pb_rows.get((pop["level"], pop["value"]), {})
        units["pb"] = [pb_rows.get(s, -1) for s in units["sample"]]
        n_cells = data.pseudobulk.obs["n_cells"].to_numpy(float)
        units["n_cells"] = [n_cells[i] if i >= 0 else 0.0 for i in units["pb"]]
    else:
        vals = sel.drop_duplicates("sample").set_index("sample")
        units["value"] = vals["value"].reindex(units["sample"]).to_numpy(float)
        units["n_cells"] = vals["n_cells"].reindex(units["sample"]).fillna(0).to_numpy(float)
    if mtype != "share" and units["n_cells"].sum() == 0:
        row["reason"] = (f"population {pop['level']} '{pop['value']}' has no cells in the "
                         f"compared samples")
        return row
    agg = units.groupby("unit", sort=True)
    table = pd.DataFrame({"cell": agg["cell"].first(), "animal": agg["animal"].first(),
                          "batch": agg["batch"].first(), "first": agg["sample"].first(),
                          "samples": agg["sample"].agg(list)})
    notes: list[str] = []
    if mtype == "share":
        table["n"], table["N"] = agg["n"].sum(), agg["N"].sum()
        ok = table["N"] >= int(settings["min_parent_cells"])
        share = table.loc[ok, "n"].sum() / max(table.loc[ok, "N"].sum(), 1)
        expected_ok = table["N"] * share >= float(settings["min_expected_count"])
        threshold = (f"{int(settings['min_parent_cells'])} parent cells or an expected "
                     f"{settings['min_expected_count']:g} state cells (pooled share "
                     f"{share:.3g})")
        ok &= expected_ok
    elif use_counts:
        table["n_cells"] = agg["n_cells"].sum()
        ok = table["n_cells"] >= min_cells
        threshold = f"{min_cells} cells"
    else:
        good = units[(units["n_cells"] >= min_cells) & np.isfinite(units["value"])]
        means = good.groupby("unit")["value"].mean()
        table["value"] = means.reindex(table.index)
        table["n_cells"] = agg["n_cells"].sum()
        ok = np.isfinite(table["value"])
        threshold = f"{min_cells} cells"
    n_before = table.groupby("cell").size()
    table = table[ok].copy()
    # pairing: declared only
    pairs = None
    if data.pairs is not None:
        table["pair"] = [str(data.pairs.get(s, "")) for s in table["first"]]
        cells_per_pair = table.groupby("pair")["cell"].nunique()
        complete = cells_per_pair[cells_per_pair >= 2].index
        paired = table[table["pair"].isin(complete)]
        counts = paired.groupby("cell").size().reindex(list(spec.cells), fill_value=0)
        if len(complete) and counts.min() >= min_n:
            dropped = len(table) - len(paired)
            if dropped:
                notes.append(f"{dropped} animal(s) of a declared pair seen in one compared "
                             "arm only left out of the paired test")
            table = paired
            pairs = table["pair"].tolist()
        else:
            notes.append(f"pairing declared but only {len(complete)} complete pair(s) "
                         f"(min {min_n}): tested unpaired")
    else:
        shared = table.groupby("animal")["cell"].nunique()
        if (shared >= 2).any():
            notes.append("animal ids recur across the compared arms but no pairing is declared "
                         "(study field paired_by): tested unpaired")
    n_cell = table.groupby("cell").size().reindex(list(spec.cells), fill_value=0)
    pos = [c for c, w in spec.weights.items() if w > 0]
    neg = [c for c, w in spec.weights.items() if w < 0]
    row["n_arm"], row["n_reference"] = int(n_cell[pos].sum()), int(n_cell[neg].sum())
    row["paired"] = pairs is not None
    if mtype == "share":
        for side, cells in (("mean_arm", pos), ("mean_reference", neg)):
            sub = table[table["cell"].isin(cells)]
            row[side] = float(sub["n"].sum() / sub["N"].sum()) if sub["N"].sum() else np.nan
    elif not use_counts:
        for side, cells in (("mean_arm", pos), ("mean_reference", neg)):
            row[side] = float(table.loc[table["cell"].isin(cells), "value"].mean()) \
                if table["cell"].isin(cells).any() else np.nan
    if n_cell.min() < min_n:
        small = {c: int(n_before.get(c, 0) - n_cell[c]) for c in spec.cells}
        base = ("too few samples per arm: " + " vs ".join(f"{n_cell[c]} {c}" for c in spec.cells)
                + f" animals (min {min_n})")
        if any(small.values()):
            detail = " and ".join(f"{small[c]} of {int(n_before.get(c, 0))} {c}"
                                  for c in spec.cells if small[c])
            row["reason"] = (f"population {pop['value']} too small: fewer than {threshold} in "
                             f"{detail} samples; {base}")
        else:
            row["reason"] = base
        row["notes"] = "; ".join(notes)
        return row
    batch = table["batch"].tolist() if data.batch_recorded and settings["adjust_batch"] else None
    design = stats.build_design(table["cell"].tolist(), spec.weights, spec.reference_cell,
                                batch=batch, pairs=pairs, index=table.index.tolist())
    row["batch"] = design.batch if settings["adjust_batch"] or not data.batch_recorded \
        else "not adjusted (adjust_batch: false)"
    notes += design.notes
    if design.reason:
        row["reason"] = design.reason
        row["notes"] = "; ".join(notes)
        return row
    terms = ["cell", *(["pair"] if design.paired else []),
             *(["batch"] if design.batch == "adjusted" else [])]
    model = f"~ {' + '.join(terms)} on {len(table)} animals"
    if spec.extra:
        model += f" ({len(spec.cells) + len(spec.extra)} arms pooled)"
    group_var = settings["variance"] == "group"
    variance_text = "cell-specific residual variances" if group_var else "pooled residual variance"
    if use_counts:
        fit, extra = _voom_fit(data, table, design, genes, group_var, score_cfg, min_genes, pos,
                               neg, row)
        notes += extra
        row["test"] = f"voom signature test {model}, {variance_text}"
        row["effect_unit"] = "log2 fold change"
        bound = math.log2(float(settings["sesoi_fold_change"]))
    elif mtype == "share":
        fit = stats.quasibinomial_test(table["n"].to_numpy(float), table["N"].to_numpy(float),
                                       design)
        row["test"] = (f"quasi-binomial GLM (Williams) {model}, phi {_fmt(fit.phi, 2)}, "
                       f"df {_fmt(fit.df, 3)}")
        row["effect_unit"] = "log odds ratio"
        bound = math.log(float(settings["sesoi_odds_ratio"]))
    else:
        fit = stats.linear_contrast(table["value"].to_numpy(float), design, group_var)
        row["test"] = f"OLS on {method} scores {model}, {variance_text}"
        row["effect_unit"] = f"{method} score difference"
        bound = float(settings["sesoi_g"]) * fit.sigma if np.isfinite(fit.sigma) else np.nan
    notes += fit.notes
    row["notes"] = "; ".join(dict.fromkeys(notes))
    _fill_effects(row, fit, bound)
    if not np.isfinite(row["p_value"]):
        why = [n for n in (extra if use_counts else fit.notes)
               if "not tested" in n or "no residual" in n or "without counts" in n
               or "undefined" in n or "did not converge" in n]
        kept = [n for n in extra if "kept by the expression filter" in n]
        row["reason"] = ("; ".join([*kept[-1:], why[-1]]) if why else
                         "no variation between animals: the test is undefined")
    return row


def _voom_fit(data: StudyData, table: pd.DataFrame, design: stats.Design, genes: Sequence[str],
              group_var: bool, score_cfg: Mapping, min_genes: int, pos: Sequence[str],
              neg: Sequence[str], row: dict) -> tuple[stats.ContrastFit, list[str]]:
    """Pseudobulk counts of the units (samples of one animal summed) through signature_test."""
    pb = data.pseudobulk
    layer = pb.layers["counts"] if "counts" in pb.layers else pb.X
    pb_rows = data.pb_rows[(row["population_level"], row["population"])]
    cols = {}
    for unit, samples in zip(table.index, table["samples"], strict=True):
        sub = layer[[pb_rows[s] for s in samples if s in pb_rows]]
        sub = sub.toarray() if hasattr(sub, "toarray") else np.asarray(sub)
        cols[unit] = sub.sum(axis=0)
    var_names = [str(v) for v in pb.var_names]
    counts = pd.DataFrame(cols, index=var_names)
    var_genes = list(dict.fromkeys(data.symbol_to_var[g] for g in genes if g in data.symbol_to_var))
    kwargs = {k: float(score_cfg[k]) for k in ("min_count", "min_total_count")}
    res = signature_test(counts, design.X, list(design.contrast), var_genes,
                         group=design.cells, min_genes=min_genes,
                         variance="group" if group_var else "pooled", **kwargs)
    row["n_genes_used"] = int(res.n_genes_used)
    back = {v: s for s, v in data.symbol_to_var.items() if s in set(genes)}
    row["genes_used"] = ",".join(back.get(g, g) for g in res.genes_used)
    scores = res.sample_scores
    cells = pd.Series(design.cells, index=design.X.index)
    for side, which in (("mean_arm", pos), ("mean_reference", neg)):
        sel = scores[cells.isin(which).reindex(scores.index).fillna(False).to_numpy()]
        row[side] = float(sel.mean()) if len(sel) else np.nan
    fit = stats.ContrastFit(res.estimate, res.se, res.df, res.t, res.p_value, res.sigma,
                            res.se / res.sigma if res.sigma and np.isfinite(res.sigma) else np.nan)
    return fit, list(res.notes)


def _fill_effects(row: dict, fit: stats.ContrastFit, bound: float) -> None:
    """Effect, its t interval, g with its noncentral-t interval, TOST p (all from one fit)."""
    row["effect"], row["se"], row["df"], row["p_value"] = fit.estimate, fit.se, fit.df, fit.p_value
    row["effect_ci_low"], row["effect_ci_high"] = stats.t_ci(fit.estimate, fit.se, fit.df)
    row["log2fc"] = fit.estimate if row.get("effect_unit") == "log2 fold change" else np.nan
    row["odds_ratio"] = (math.exp(fit.estimate) if row["measure_type"] == "share"
                         and np.isfinite(fit.estimate) else np.nan)
    j = stats.hedges_j(fit.df) if np.isfinite(fit.df) else np.nan
    row["_factor"], row["_sigma"], row["_j"] = fit.factor, fit.sigma, j
    if np.isfinite(fit.sigma) and fit.sigma > 0:
        row["hedges_g"] = fit.estimate / fit.sigma * j
        row["ci_low"], row["ci_high"] = stats.g_interval(fit.t, fit.df, fit.factor, j)
        row["g_var"] = stats.g_variance(row["hedges_g"], fit.factor * j, fit.df)
    row["sesoi"] = bound
    row["p_equivalence"] = stats.tost(fit.estimate, fit.se, fit.df, bound)


def _verdict(row: Mapping, alpha: float) -> tuple[str, str]:
    if row.get("reason"):
        return "inconclusive", row["reason"]
    q, effect = row["q_value"], row["effect"]
    predicted = 1 if row["direction"] == "up" else -1
    observed = "up" if effect > 0 else "down"
    unit = row.get("effect_unit", "")
    if np.isfinite(q) and q < alpha and np.sign(effect) == predicted:
        return "supported", f"q = {_fmt(q, 2)} < {alpha}; {observed} as predicted"
    if np.isfinite(q) and q < alpha and effect != 0:
        return "contradicted", f"q = {_fmt(q, 2)} < {alpha}; {observed}, opposite to the prediction"
    qe = row.get("q_equivalence", np.nan)
    if np.isfinite(qe) and qe < alpha:
        return "no_effect", (f"not significant (q = {_fmt(q, 2)}); equivalence test: the {unit} "
                             f"lies within +/-{_fmt(row['sesoi'], 2)} (TOST q = {_fmt(qe, 2)})")
    n = f"{row['n_arm']} pairs" if row["paired"] else f"{row['n_arm']} vs {row['n_reference']} animals"
    return "inconclusive", (
        f"not significant (p = {_fmt(row['p_value'], 2)}, q = {_fmt(q, 2)} >= {alpha}; "
        f"{unit} {_fmt(effect, 2)}, g = {_fmt(row['hedges_g'], 2)}); minimum detectable effect at "
        f"{n} and the BH per-test alpha {_fmt(row['alpha_test'], 2)} is +/-{_fmt(row['mde'], 2)} "
        f"({unit}; g = +/-{_fmt(row['mde_g'], 2)})")


def add_verdicts(table: pd.DataFrame, alpha: float, power: float,
                 families: Sequence[str] = ("kind",)) -> pd.DataFrame:
    """BH q-values (effect and equivalence) within each family, the per-test alpha and MDE at
    it, and the verdict of every row."""
    table = table.copy()
    for col in ("q_value", "q_equivalence", "alpha_test", "mde", "mde_g"):
        table[col] = np.nan
    if table.empty:
        table["verdict"] = []
        return table
    tested = (table["reason"].fillna("") == "") & np.isfinite(table["p_value"].astype(float))
    for _, idx in table[tested].groupby(list(families), observed=True).groups.items():
        p = table.loc[idx, "p_value"].to_numpy(float)
        table.loc[idx, "q_value"] = stats.bh(p)
        table.loc[idx, "alpha_test"] = stats.bh_alpha(p, alpha)
        table.loc[idx, "q_equivalence"] = stats.bh(table.loc[idx, "p_equivalence"].to_numpy(float))
    for i in table.index[tested]:
        r = table.loc[i]
        table.loc[i, "mde"] = stats.mde_effect(r["se"], r["df"], r["alpha_test"], power)
        if np.isfinite(r.get("_sigma", np.nan)):
            table.loc[i, "mde_g"] = table.loc[i, "mde"] / r["_sigma"] * r["_j"]
    out = [_verdict(r, alpha) for r in table.to_dict("records")]
    table["verdict"] = [v for v, _ in out]
    table["reason"] = [r for _, r in out]
    return table


# --- controls gate claims -------------------------------------------------------------------------

def gate_by_controls(table: pd.DataFrame) -> pd.DataFrame:
    """Flag claim rows whose population x measure failed its positive control in this study.

    A control fails when it was tested and is not ``supported``. A claim row is flagged by a
    failed control of the same population and measure, and by a population (or a signature)
    whose tested controls all failed. The flag leads the row's reason; the verdict stays."""
    table = table.copy()
    table["flag"] = table["flag"].fillna("").astype(str) if "flag" in table else ""
    ctl = table[(table["kind"] == "control")]
    tested = ctl[np.isfinite(ctl["p_value"].astype(float))]
    if tested.empty:
        return table
    failed_exact: dict[tuple, list[str]] = {}
    pop_all: dict[tuple, list[bool]] = {}
    pop_ids: dict[tuple, list[str]] = {}
    sig_all: dict[str, list[bool]] = {}
    sig_ids: dict[str, list[str]] = {}
    for c in tested.to_dict("records"):
        pop = (c["population_level"], c["population"])
        failed = c["verdict"] != "supported"
        if failed:
            failed_exact.setdefault((*pop, c["measure"]), []).append(
                f"control {c['claim_id']} ({c['contrast']}) {c['verdict']}")
        pop_all.setdefault(pop, []).append(failed)
        pop_ids.setdefault(pop, []).append(c["claim_id"])
        if c["measure_type"] == "signature":
            sig_all.setdefault(c["measure"], []).append(failed)
            sig_ids.setdefault(c["measure"], []).append(c["claim_id"])
    flags, reasons = table["flag"].tolist(), table["reason"].tolist()
    for i, r in enumerate(table.to_dict("records")):
        if r["kind"] != "claim":
            continue
        pop = (r["population_level"], r["population"])
        why = list(failed_exact.get((*pop, r["measure"]), []))
        if not why and pop in pop_all and all(pop_all[pop]):
            why.append(f"every control of {r['population']} failed "
                       f"({', '.join(dict.fromkeys(pop_ids[pop]))})")
        if not why and r["measure_type"] == "signature" and all(sig_all.get(r["measure"], [False])):
            why.append(f"every control of signature {r['measure']} failed "
                       f"({', '.join(dict.fromkeys(sig_ids[r['measure']]))})")
        if why:
            flags[i] = "failed control: " + "; ".join(why)
            reasons[i] = f"FLAGGED ({flags[i]}): {r['reason']}"
    table["flag"], table["reason"] = flags, reasons
    return table


# --- the study ------------------------------------------------------------------------------------

def evaluate_study(scores: pd.DataFrame, coverage: pd.DataFrame, catalogue: Mapping, study: str,
                   settings: Mapping | None = None, score_cfg: Mapping | None = None,
                   pseudobulk: Any = None, pairs: Mapping[str, str] | None = None,
                   marker_overlap: Callable[[str, str, str], Sequence[str]] | None = None,
                   ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """All claims x contrasts of a study: (verdict table with the primary method, all methods).

    ``scores``/``coverage``: the score stage's ``sample_scores.tsv`` and
    ``signature_coverage.tsv``; ``pseudobulk``: its ``pseudobulk.h5ad`` (AnnData; needed by the
    primary method ``voom``); ``pairs``: sample -> pair id from the study's declared
    ``paired_by`` column (None: unpaired); ``marker_overlap(level, population, signature)``: the
    signature's genes that are also markers defining the population (column ``marker_overlap``;
    :func:`marker_overlap_from_panel` builds it from the cell-type panel).
    """
    settings = claims_settings(settings)
    score_cfg = score_settings(score_cfg)
    catalogue = validate(catalogue, "claims", "claims catalogue")
    method = settings["method"]
    if method != VOOM and method not in score_cfg["methods"]:
        raise ConfigError(f"config: field 'claims.method': '{method}' is not computed by the "
                          f"score stage (score.methods: {score_cfg['methods']})")
    present = set(scores["method"]) if "method" in scores else set()
    others = [m for m in score_cfg["methods"] if m in present and m != method]
    data = _study_data(scores, coverage, pseudobulk, pairs, marker_overlap)
    rows = []
    for claim in catalogue["claims"]:
        for contrast in claim["contrasts"]:
            use = [method] if claim["measure"]["type"] == "share" else [method, *others]
            for m in use:
                row = evaluate_contrast(data, claim, contrast, m, settings, score_cfg)
                row["primary"] = m == method
                rows.append(row)
    table = pd.DataFrame(rows)
    table["study"] = study
    for col in [*CLAIM_COLUMNS, "_factor", "_sigma", "_j"]:
        if col not in table:
            table[col] = np.nan
    alpha, power = float(settings["alpha"]), float(settings["power"])
    # every method's family: its signature rows plus the share rows (tested once, as counts),
    # so that the primary method's rows of claims_methods.tsv equal claims.tsv
    share = table["measure_type"] == "share"
    parts = []
    for m in dict.fromkeys(table.loc[~share, "method"]):
        fam = table[(table["method"] == m) | share]
        done = gate_by_controls(add_verdicts(fam, alpha, power, families=("kind",)))
        parts.append(done[done["method"] == m] if m != method else done)
    if not parts:
        parts = [gate_by_controls(add_verdicts(table, alpha, power, families=("kind",)))]
    all_methods = pd.concat(parts).sort_index()
    primary = gate_by_controls(add_verdicts(table[table["primary"]], alpha, power,
                                            families=("kind",)))
    primary = primary[CLAIM_COLUMNS]
    all_methods = all_methods[CLAIM_COLUMNS]
    return primary.reset_index(drop=True), all_methods.reset_index(drop=True)


# --- summary --------------------------------------------------------------------------------------

def _md_table(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for rec in df.astype(str).itertuples(index=False):
        lines.append("| " + " | ".join(v.replace("|", "/") for v in rec) + " |")
    return "\n".join(lines)


def _effect_text(r: Mapping) -> str:
    if not np.isfinite(r.get("effect", np.nan)):
        return "NA"
    if r["measure_type"] == "share":
        return (f"OR {_fmt(r['odds_ratio'], 2)} [{_fmt(math.exp(r['effect_ci_low']), 2)}, "
                f"{_fmt(math.exp(r['effect_ci_high']), 2)}]")
    unit = "log2FC" if r.get("effect_unit") == "log2 fold change" else "diff"
    return (f"{unit} {_fmt(r['effect'], 2)} [{_fmt(r['effect_ci_low'], 2)}, "
            f"{_fmt(r['effect_ci_high'], 2)}]")


def summary_markdown(table: pd.DataFrame, methods: pd.DataFrame, study: str,
                     settings: Mapping) -> str:
    """A readable summary of a study's verdicts, leading with the verdict table."""
    settings = claims_settings(settings)
    recs = table.to_dict("records")
    show = pd.DataFrame({
        "claim": table["claim_id"], "kind": table["kind"], "contrast": table["contrast"],
        "population": table["population"], "measure": table["measure"],
        "predicted": table["direction"],
        "effect [95% CI]": [_effect_text(r) for r in recs],
        "g [95% CI]": [f"{_fmt(g, 2)} [{_fmt(lo, 2)}, {_fmt(hi, 2)}]" for g, lo, hi in
                       zip(table["hedges_g"], table["ci_low"], table["ci_high"], strict=True)],
        "n": [f"{a}+{b}" + (" paired" if p else "") for a, b, p in
              zip(table["n_arm"], table["n_reference"], table["paired"], strict=True)],
        "q": [_fmt(q, 2) for q in table["q_value"]],
        "verdict": [v + (" (flagged)" if isinstance(f, str) and f else "")
                    for v, f in zip(table["verdict"], table["flag"], strict=True)],
        "reason": table["reason"]})
    counts = table.groupby(["kind", "verdict"]).size().rename("n").reset_index()
    pool = ("the animals of the compared arms only" if not settings["pool_arms"] else
            "the animals of every arm (arm-specific variances)")
    parts = [f"# Claims tested in study `{study}`", "", _md_table(show), "",
             "## Verdict counts", "", _md_table(counts), "",
             "## How these verdicts were reached", "",
             f"- Unit of replication: the animal/donor (samples of one animal summed or "
             f"averaged). Signatures: method `{settings['method']}` "
             f"(voom: TMM, expression filter, precision weights; effect = log2 fold change of "
             f"the signature). Shares: quasi-binomial GLM of state cells out of parent cells "
             f"(effect = odds ratio; a sample counts with >= {settings['min_parent_cells']} "
             f"parent cells and an expected {settings['min_expected_count']} state cells).",
             f"- One model per row on {pool}, "
             f"{'each arm with its own residual variance' if settings['variance'] == 'group' else 'one pooled residual variance'}; "
             "batch adjusted where recorded and not confounded with arm (the `batch` column); "
             "pairing only where the study declares it (`paired_by`). Interaction and synergy "
             "rows are single contrasts of one model.",
             f"- Benjamini-Hochberg q-values within the study, claims and controls separately; "
             f"alpha {settings['alpha']}; the minimum detectable effect is at the per-test alpha "
             f"BH needs for the row (`alpha_test`) and power {settings['power']}; at least "
             f"{settings['min_samples_per_arm']} animals per arm.",
             "- `supported`/`contradicted`: q < alpha with the effect in / against the predicted "
             "direction; `no_effect`: an equivalence test (TOST, BH-adjusted) excludes effects "
             f"beyond {settings['sesoi_fold_change']}-fold (signatures) or an odds ratio of "
             f"{settings['sesoi_odds_ratio']} (shares); `inconclusive` otherwise, with the "
             "reason. `(flagged)`: a positive control of the same population or measure failed "
             "in this study.", ""]
    if not methods.empty:
        agree = methods.pivot_table(index=["claim_id", "contrast"], columns="method",
                                    values="verdict", aggfunc="first").reset_index()
        parts += ["## Sensitivity: verdict by scoring method", "", _md_table(agree.fillna("")), ""]
    return "\n".join(parts)


# --- across studies -------------------------------------------------------------------------------

def meta_analysis(tables: Sequence[pd.DataFrame], alpha: float = 0.05) -> pd.DataFrame:
    """Random-effects pooling of Hedges' g per claim x contrast across studies.

    g is the one unit: every study standardises by the residual SD of its own model of the
    same contrast. REML tau^2 with Hartung-Knapp intervals (and a prediction interval from 3
    studies). One study: its own verdict stands. Two studies: descriptive pooling only
    (estimate and interval, verdict inconclusive). BH runs over the rows with >= 2 studies;
    verdicts need >= 3."""
    if not tables:
        return pd.DataFrame(columns=META_COLUMNS)
    allrows = pd.concat(tables, ignore_index=True)
    allrows["stage"] = allrows["stage"].fillna("")
    if "g_var" not in allrows:
        se = (allrows["ci_high"] - allrows["ci_low"]) / (2 * stats.Z95)
        allrows["g_var"] = se ** 2
    rows, single = [], {}
    for key, grp in allrows.groupby(KEY_COLUMNS, sort=False, dropna=False):
        g, v = grp["hedges_g"].astype(float), grp["g_var"].astype(float)
        ok = np.isfinite(g) & np.isfinite(v) & (v > 0) & np.isfinite(grp["p_value"].astype(float))
        res = stats.meta_reml_hk(g[ok], v[ok])
        row = dict(zip(KEY_COLUMNS, key, strict=True))
        row.update({"k": res.k, "studies": ",".join(grp.loc[ok, "study"].astype(str)),
                    "effect_unit": "hedges_g", "hedges_g": res.estimate, "se": res.se,
                    "ci_low": res.ci_low, "ci_high": res.ci_high, "pi_low": res.pi_low,
                    "pi_high": res.pi_high, "p_value": res.p_value if res.k >= 2 else np.nan,
                    "tau2": res.tau2, "i2": res.i2, "q_stat": res.q, "q_p": res.q_p,
                    "method_meta": res.method, "q_value": np.nan, "verdict": "inconclusive",
                    "reason": "" if res.k else "no study could test this contrast"})
        if res.k == 1:
            single[len(rows)] = grp.loc[ok].iloc[0]
        rows.append(row)
    meta = pd.DataFrame(rows)
    multi = meta["k"] >= 2
    meta.loc[multi, "q_value"] = stats.bh(meta.loc[multi, "p_value"].to_numpy(float))
    for i in meta.index[multi]:
        r = meta.loc[i]
        text = (f"pooled g = {_fmt(r['hedges_g'], 2)} [{_fmt(r['ci_low'], 2)}, "
                f"{_fmt(r['ci_high'], 2)}] from {r['k']} studies")
        if r["k"] == 2:
            meta.loc[i, "reason"] = f"two studies: descriptive pooling only ({text})"
            continue
        q, predicted = r["q_value"], 1 if r["direction"] == "up" else -1
        if np.isfinite(q) and q < alpha:
            good = np.sign(r["hedges_g"]) == predicted
            meta.loc[i, "verdict"] = "supported" if good else "contradicted"
            meta.loc[i, "reason"] = f"q = {_fmt(q, 2)} < {alpha}; {text}"
        else:
            meta.loc[i, "reason"] = (f"not significant (p = {_fmt(r['p_value'], 2)}, q = "
                                     f"{_fmt(q, 2)}); {text}; prediction interval "
                                     f"[{_fmt(r['pi_low'], 2)}, {_fmt(r['pi_high'], 2)}]")
    for i, study_row in single.items():
        meta.loc[i, "p_value"] = study_row["p_value"]
        meta.loc[i, "q_value"] = study_row["q_value"]
        meta.loc[i, "verdict"] = study_row["verdict"]
        meta.loc[i, "reason"] = f"one study ({study_row['study']}): {study_row['reason']}"
    return meta[META_COLUMNS]


# --- rule entry points ----------------------------------------------------------------------------

def marker_overlap_from_panel(panel_path: str | Path, signatures: Mapping[str, Sequence[str]],
                              species: str) -> Callable[[str, str, str], list[str]]:
    """``marker_overlap`` for :func:`evaluate_study`: signature genes that are also markers
    selecting the population in the cell-type panel (``annotate.signature_marker_overlap``)."""
    panel = load_panel(panel_path, species)
    cache: dict[tuple[str, str, str], list[str]] = {}

    def overlap(level: str, population: str, signature: str) -> list[str]:
        key = (level, population, signature)
        if key not in cache:
            cache[key] = annotate.signature_marker_overlap(panel, signatures, level, population,
                                                           signature, species)
        return cache[key]

    return overlap


def rule_claims(smk: Any) -> None:
    """Rule ``claims``: verdicts of one study."""
    settings = claims_settings(smk.params.cfg)
    signatures = load_signatures(smk.input.signatures, smk.params.species)
    catalogue = load_catalogue(smk.input.catalogue, signatures)
    scores = pd.read_csv(smk.input.scores, sep="\t", keep_default_na=True,
                         dtype={"sample": str, "animal": str, "arm": str, "batch": str,
                                "stage": str, "population": str})
    coverage = pd.read_csv(smk.input.coverage, sep="\t", dtype={"genes_found": str})
    pb_path = smk.input.get("pseudobulk") if hasattr(smk.input, "get") else None
    pseudobulk = ad.read_h5ad(pb_path) if pb_path else None
    pairs = getattr(smk.params, "pairs", None) or None
    panel = smk.input.get("celltypes") if hasattr(smk.input, "get") else None
    overlap = marker_overlap_from_panel(panel, signatures, smk.params.species) if panel else None
    table, methods = evaluate_study(scores, coverage, catalogue, smk.wildcards.study, settings,
                                    smk.params.score_cfg, pseudobulk=pseudobulk, pairs=pairs,
                                    marker_overlap=overlap)
    table.to_csv(smk.output.claims, sep="\t", index=False, na_rep="NA")
    methods.to_csv(smk.output.methods, sep="\t", index=False, na_rep="NA")
    Path(smk.output.summary).write_text(summary_markdown(table, methods, smk.wildcards.study,
                                                         settings))
    log.info("%s: %s", smk.wildcards.study, table["verdict"].value_counts().to_dict())


def rule_claims_meta(smk: Any) -> None:
    """Rule ``claims_meta``: pool every study's claims (the report stage draws the forest plot)."""
    settings = claims_settings(smk.params.cfg)
    tables = [pd.read_csv(p, sep="\t", dtype={"stage": str}, keep_default_na=True)
              for p in smk.input.claims]
    meta = meta_analysis(tables, float(settings["alpha"]))
    meta.to_csv(smk.output.meta, sep="\t", index=False, na_rep="NA")

"""Verdicts on claims: one row per claim x contrast per study, and the claims pooled across studies.

For every claim of the catalogue (``claims.catalogue``, schema ``claims.schema.yaml``) and each
of its contrasts, the sample-level values of ``sample_scores.tsv`` (score stage) are compared
between the two arms with animals as units (:mod:`livermsc.stats`). The verdict is

* ``supported``: q < alpha and the effect goes the predicted way;
* ``contradicted``: q < alpha and the effect goes the other way;
* ``inconclusive``, with the reason: an arm absent from the study (or from the contrast's stage),
  the population absent, the signature's genes mostly missing (``score.min_genes``), too few
  animals per arm (``min_samples_per_arm``; samples whose population has fewer than
  ``score.min_cells`` cells, or whose share parent fewer than ``min_parent_cells``, do not
  count), or not significant (the reason gives p, q and the minimum detectable effect).

The test (see :func:`livermsc.stats.compare_arms`): a paired t-test when animals/donors appear
in both arms; otherwise, by default, one OLS model ``value ~ arm + batch`` over the animals of
every arm of the study (``pool_arms``; residual SD pooled over arms, batch dropped where it is
confounded with the arms), or Welch's t-test on the two arms (``pool_arms: false``, no
covariates). On simulated studies with 3 animals per arm this keeps the false-positive rate near
0.02 and gives power about 0.9 for programme effects of 1.5 between-animal SDs
(``livermsc calibrate``).

q-values are Benjamini-Hochberg within a study, separately for claims and for controls. The
verdict uses the score method ``claims.method`` (default ``pseudobulk_z``); every other computed
method is reported in ``claims_methods.tsv`` as a sensitivity analysis. Shares are compared on
the logit scale with a pseudo-count (``share_pseudocount`` cells).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from livermsc import stats
from livermsc.config import ConfigError, load_yaml, validate
from livermsc.score import ALL, share_measure

log = logging.getLogger("livermsc.claims")

#: method of share rows, as in sample_scores.tsv (the test runs on the logit of the proportion)
SHARE_METHOD = "proportion"
CLAIM_COLUMNS = ["study", "claim_id", "kind", "statement", "contrast", "arm", "reference",
                 "stage", "population", "measure_type", "measure", "method", "direction", "n_arm",
                 "n_reference", "mean_arm", "mean_reference", "effect", "hedges_g", "ci_low",
                 "ci_high", "p_value", "q_value", "mde", "paired", "verdict", "reason", "test",
                 "population_level"]
KEY_COLUMNS = ["claim_id", "kind", "contrast", "arm", "reference", "stage", "population",
               "measure_type", "measure", "method", "direction"]
META_COLUMNS = [*KEY_COLUMNS, "k", "studies", "hedges_g", "se", "ci_low", "ci_high", "p_value",
                "q_value", "tau2", "i2", "q_stat", "q_p", "verdict", "reason"]

DEFAULTS: dict[str, Any] = {
    "catalogue": "seeds/claims.yaml", "method": "pseudobulk_z", "alpha": 0.05, "power": 0.8,
    "min_samples_per_arm": 3, "min_parent_cells": 20, "covariates": ["batch"],
    "pool_arms": True,
    "share_pseudocount": 0.5,
}


def claims_settings(cfg: Mapping | None) -> dict[str, Any]:
    """Claims settings with defaults filled."""
    return {**DEFAULTS, **dict(cfg or {})}


# --- catalogue ------------------------------------------------------------------------------------

def load_catalogue(path: str | Path, signatures: Iterable[str] | None = None) -> dict:
    """Read and validate a claims catalogue; with ``signatures`` check every named signature exists."""
    doc = validate(load_yaml(path), "claims", path)
    ids = [c["id"] for c in doc["claims"]]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ConfigError(f"{path}: field 'claims[].id': duplicated claim ids {dup} (expected: unique)")
    known = set(signatures) if signatures is not None else None
    for i, claim in enumerate(doc["claims"]):
        measure = claim["measure"]
        if measure["type"] == "signature":
            sig = measure.get("signature")
            if not sig:
                raise ConfigError(f"{path}: field 'claims[{i}].measure.signature': missing for "
                                  f"claim '{claim['id']}' (expected: a signature id)")
            if known is not None and sig not in known:
                raise ConfigError(f"{path}: field 'claims[{i}].measure.signature': '{sig}' of claim "
                                  f"'{claim['id']}' is not in the signatures file "
                                  f"(expected one of {sorted(known)})")
    return doc


def check_config(config: Mapping) -> None:
    """Check, before any job runs, the claims catalogue and signatures file a run will use:
    both parse, every signature a claim names exists, and the verdict method is computed."""
    from livermsc.score import load_signatures, score_settings

    score_cfg = score_settings(config.get("score"))
    settings = claims_settings(config.get("claims"))
    if settings["method"] not in score_cfg["methods"]:
        raise ConfigError(f"config: field 'claims.method': '{settings['method']}' is not among "
                          f"score.methods {score_cfg['methods']} (expected one of them)")
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


# --- evaluation -----------------------------------------------------------------------------------

def _fmt(x: float, digits: int = 3) -> str:
    return "NA" if x is None or not np.isfinite(x) else f"{x:.{digits}g}"


def _arm_samples(info: pd.DataFrame, arm: str, stage: str) -> pd.DataFrame:
    sel = info[info["arm"] == arm]
    return sel[sel["stage"] == stage] if stage else sel


def score_index(scores: pd.DataFrame) -> dict:
    """Rows of the score table by (level, population, measure type, measure, method), and the
    largest cell count of each population."""
    keys = ["population_level", "population", "measure_type", "measure", "method"]
    return {"rows": dict(iter(scores.groupby(keys, sort=False, observed=True))),
            "pop_cells": scores.groupby(["population_level", "population"], observed=True)
            ["n_cells"].max().fillna(0).to_dict()}


def evaluate_contrast(scores: pd.DataFrame, info: pd.DataFrame, coverage: pd.DataFrame,
                      claim: Mapping, contrast: Mapping, method: str, settings: Mapping,
                      min_genes: int, min_cells: int, index: dict | None = None) -> dict:
    """Test one claim x contrast with one method; returns a claims-table row (no q/verdict yet).

    ``reason`` is set when the contrast cannot be tested (the row is then inconclusive)."""
    arm, ref, stage = contrast["arm"], contrast["reference"], contrast.get("stage", "") or ""
    pop = claim["population"]
    mtype = claim["measure"]["type"]
    measure = measure_name(claim)
    row = {"claim_id": claim["id"], "kind": claim.get("kind", "claim"),
           "statement": claim["statement"], "contrast": f"{arm} vs {ref}" + (f" ({stage})" if stage else ""),
           "arm": arm, "reference": ref, "stage": stage, "population": pop["value"],
           "population_level": pop["level"], "measure_type": mtype, "measure": measure,
           "method": SHARE_METHOD if mtype == "share" else method,
           "direction": claim["direction"], "n_arm": 0, "n_reference": 0, "paired": False,
           "reason": "", "test": ""}
    min_n = int(settings["min_samples_per_arm"])
    arms = sorted(info["arm"].unique())
    for a in (arm, ref):
        if a not in arms:
            row["reason"] = f"arm '{a}' absent in study (arms: {', '.join(arms)})"
            return row
        if stage and _arm_samples(info, a, stage).empty:
            stages = sorted(s for s in info.loc[info["arm"] == a, "stage"].unique() if s)
            row["reason"] = f"no '{a}' samples at stage '{stage}' (stages: {', '.join(stages) or 'none'})"
            return row
    if mtype == "signature":
        cov = coverage[coverage["signature"] == measure]
        if cov.empty or int(cov["n_found"].iloc[0]) < min_genes:
            n_found = int(cov["n_found"].iloc[0]) if not cov.empty else 0
            n_genes = int(cov["n_genes"].iloc[0]) if not cov.empty else 0
            row["reason"] = (f"signature coverage too low: {n_found} of {n_genes} genes of "
                             f"'{measure}' found (min_genes {min_genes})")
            return row
    index = index if index is not None else score_index(scores)
    key = (pop["level"], pop["value"], mtype, measure,
           SHARE_METHOD if mtype == "share" else method)
    sel = index["rows"].get(key, scores.iloc[:0])
    # every arm's samples (of the stage) stay: with pool_arms the model pools all arms
    sel = sel[sel["sample"].isin(info.loc[info["stage"] == stage, "sample"] if stage
                                 else info["sample"])]
    if index["pop_cells"].get((pop["level"], pop["value"]), 0) == 0:
        row["reason"] = f"population {pop['level']} '{pop['value']}' absent in study"
        return row
    if sel.empty:
        row["reason"] = (f"no '{row['method']}' values of '{measure}' for {pop['level']} "
                         f"'{pop['value']}' in the score table")
        return row
    if sel.loc[sel["arm"].isin([arm, ref]), "n_cells"].fillna(0).sum() == 0:
        row["reason"] = (f"population {pop['level']} '{pop['value']}' has no cells in the "
                         f"{arm} and {ref} samples")
        return row
    sel = sel.copy()
    if mtype == "share":
        small = ~(sel["n_parent_cells"] >= int(settings["min_parent_cells"]))
        sel["value"] = stats.logit_share(sel["n_cells"], sel["n_parent_cells"],
                                         float(settings["share_pseudocount"]))
        threshold = f"{int(settings['min_parent_cells'])} parent cells"
    else:
        small = ~(sel["n_cells"] >= min_cells)
        threshold = f"{min_cells} cells"
    sel.loc[small, "value"] = np.nan
    res = stats.compare_arms(sel, arm, ref, covariates=settings.get("covariates", []),
                             alpha=float(settings["alpha"]), power=float(settings["power"]),
                             min_n=min_n, pool_arms=bool(settings["pool_arms"]))
    row.update({k: v for k, v in res.as_dict().items() if k not in ("g_var", "notes")})
    row["test"] = res.test + (f" on logit share (pseudo-count {settings['share_pseudocount']})"
                              if mtype == "share" else "")
    if res.notes:
        row["test"] += f" [{'; '.join(res.notes)}]"
    if min(res.n_arm, res.n_reference) < min_n or not np.isfinite(res.p_value):
        usable = set(sel.loc[np.isfinite(sel["value"].astype(float)), "sample"])
        n_all = {a: _arm_samples(info, a, stage)["sample"] for a in (arm, ref)}
        n_small = {a: int((~s.isin(usable)).sum()) for a, s in n_all.items()}
        if res.paired:
            base = f"too few animals with samples in both arms: {res.n_arm} (min {min_n})"
        else:
            base = (f"too few samples per arm: {res.n_arm} {arm} vs {res.n_reference} {ref} "
                    f"animals (min {min_n})")
        if min(res.n_arm, res.n_reference) >= min_n:
            row["reason"] = "no variation between animals: the test is undefined"
        elif any(n_small.values()):
            detail = " and ".join(f"{n_small[a]} of {len(n_all[a])} {a}" for a in (arm, ref)
                                  if n_small[a])
            row["reason"] = (f"population {pop['value']} too small: fewer than {threshold} in "
                             f"{detail} samples; {base}")
        else:
            row["reason"] = base
    return row


def _verdict(row: Mapping, alpha: float) -> tuple[str, str]:
    if row.get("reason"):
        return "inconclusive", row["reason"]
    q, effect = row["q_value"], row["effect"]
    predicted = 1 if row["direction"] == "up" else -1
    observed = "up" if effect > 0 else "down"
    if np.isfinite(q) and q < alpha and np.sign(effect) == predicted:
        return "supported", f"q = {_fmt(q, 2)} < {alpha}; {observed} as predicted"
    if np.isfinite(q) and q < alpha and effect != 0:
        return "contradicted", f"q = {_fmt(q, 2)} < {alpha}; {observed}, opposite to the prediction"
    n = f"{row['n_arm']} pairs" if row["paired"] else f"{row['n_arm']} vs {row['n_reference']} animals"
    return "inconclusive", (f"not significant (p = {_fmt(row['p_value'], 2)}, q = {_fmt(q, 2)} >= "
                            f"{alpha}; g = {_fmt(row['hedges_g'], 2)}); minimum detectable effect at "
                            f"{n} is g = +/-{_fmt(row['mde'], 2)}")


def add_verdicts(table: pd.DataFrame, alpha: float, families: Sequence[str] = ("kind",)
                 ) -> pd.DataFrame:
    """Benjamini-Hochberg q-values within each family and the verdict of every row."""
    table = table.copy()
    table["q_value"] = np.nan
    if table.empty:
        table["verdict"] = []
        return table
    tested = table["reason"].fillna("") == ""
    for _, idx in table[tested].groupby(list(families), observed=True).groups.items():
        table.loc[idx, "q_value"] = stats.bh(table.loc[idx, "p_value"].to_numpy(float))
    out = [_verdict(r, alpha) for r in table.to_dict("records")]
    table["verdict"] = [v for v, _ in out]
    table["reason"] = [r for _, r in out]
    return table


def evaluate_study(scores: pd.DataFrame, coverage: pd.DataFrame, catalogue: Mapping, study: str,
                   settings: Mapping | None = None, score_cfg: Mapping | None = None
                   ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """All claims x contrasts of a study: (verdict table with the primary method, all methods)."""
    from livermsc.score import score_settings

    settings = claims_settings(settings)
    score_cfg = score_settings(score_cfg)
    method = settings["method"]
    methods = [m for m in score_cfg["methods"] if m in set(scores["method"])] or [method]
    if method not in score_cfg["methods"]:
        raise ConfigError(f"config: field 'claims.method': '{method}' is not computed by the "
                          f"score stage (score.methods: {score_cfg['methods']})")
    scores = scores.copy()
    scores["stage"] = scores["stage"].fillna("").astype(str) if "stage" in scores else ""
    info = scores[["sample", "animal", "arm", "stage"]].drop_duplicates("sample")
    index = score_index(scores)
    rows = []
    for claim in catalogue["claims"]:
        for contrast in claim["contrasts"]:
            use = [method] if claim["measure"]["type"] == "share" else [
                method, *[m for m in methods if m != method]]
            for m in use:
                row = evaluate_contrast(scores, info, coverage, claim, contrast, m, settings,
                                        int(score_cfg["min_genes"]), int(score_cfg["min_cells"]),
                                        index)
                row["primary"] = m == method
                rows.append(row)
    table = pd.DataFrame(rows)
    table["study"] = study
    for col in CLAIM_COLUMNS:
        if col not in table:
            table[col] = np.nan
    alpha = float(settings["alpha"])
    all_methods = add_verdicts(table, alpha, families=("kind", "method"))
    primary = add_verdicts(table[table["primary"]], alpha, families=("kind",))
    return (primary[CLAIM_COLUMNS].reset_index(drop=True),
            all_methods[CLAIM_COLUMNS].reset_index(drop=True))


# --- summary --------------------------------------------------------------------------------------

def _md_table(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for rec in df.astype(str).itertuples(index=False):
        lines.append("| " + " | ".join(v.replace("|", "/") for v in rec) + " |")
    return "\n".join(lines)


def summary_markdown(table: pd.DataFrame, methods: pd.DataFrame, study: str,
                     settings: Mapping) -> str:
    """A readable summary of a study's verdicts, leading with the verdict table."""
    settings = claims_settings(settings)
    show = pd.DataFrame({
        "claim": table["claim_id"], "kind": table["kind"], "contrast": table["contrast"],
        "population": table["population"], "measure": table["measure"],
        "predicted": table["direction"],
        "g [95% CI]": [f"{_fmt(g, 2)} [{_fmt(lo, 2)}, {_fmt(hi, 2)}]" for g, lo, hi in
                       zip(table["hedges_g"], table["ci_low"], table["ci_high"], strict=True)],
        "n": [f"{a}+{b}" + (" paired" if p else "") for a, b, p in
              zip(table["n_arm"], table["n_reference"], table["paired"], strict=True)],
        "q": [_fmt(q, 2) for q in table["q_value"]],
        "verdict": table["verdict"], "reason": table["reason"]})
    counts = table.groupby(["kind", "verdict"]).size().rename("n").reset_index()
    parts = [f"# Claims tested in study `{study}`", "", _md_table(show), "",
             "## Verdict counts", "", _md_table(counts), "",
             "## How these verdicts were reached", "",
             f"- Unit of replication: the animal/donor (samples of one animal averaged); "
             f"verdict method `{settings['method']}`; shares as logit proportions with a "
             f"pseudo-count of {settings['share_pseudocount']} cells.",
             f"- Paired t-test where animals appear in both arms; otherwise "
             f"{'OLS over the animals of all arms (arm as a factor)' if settings['pool_arms'] else 'Welch t-test or OLS on the two arms'}"
             f"{', adjusted for ' + ', '.join(settings['covariates']) + ' where not confounded' if settings['covariates'] else ''} "
             f"(the `test` column names the test of each row); "
             f"Benjamini-Hochberg q-values within the study, claims and controls separately; "
             f"alpha {settings['alpha']}; at least {settings['min_samples_per_arm']} animals per arm.",
             "- `supported`/`contradicted`: q < alpha with the effect in / against the predicted "
             "direction; `inconclusive` otherwise, with the reason.", ""]
    if not methods.empty:
        agree = methods.pivot_table(index=["claim_id", "contrast"], columns="method",
                                    values="verdict", aggfunc="first").reset_index()
        parts += ["## Sensitivity: verdict by scoring method", "", _md_table(agree.fillna("")), ""]
    return "\n".join(parts)


# --- across studies -------------------------------------------------------------------------------

def meta_analysis(tables: Sequence[pd.DataFrame], alpha: float = 0.05) -> pd.DataFrame:
    """DerSimonian-Laird pooling of Hedges' g per claim x contrast across studies."""
    if not tables:
        return pd.DataFrame(columns=META_COLUMNS)
    allrows = pd.concat(tables, ignore_index=True)
    allrows["stage"] = allrows["stage"].fillna("")
    rows, single = [], {}
    for key, grp in allrows.groupby(KEY_COLUMNS, sort=False, dropna=False):
        se = (grp["ci_high"] - grp["ci_low"]) / (2 * stats.Z95)
        ok = np.isfinite(grp["hedges_g"]) & np.isfinite(se) & (se > 0)
        res = stats.dersimonian_laird(grp.loc[ok, "hedges_g"], se[ok] ** 2)
        if res.k == 1:  # nothing to pool: the study's own sample-level test stands
            single[len(rows)] = grp.loc[ok].iloc[0]
        row = dict(zip(KEY_COLUMNS, key, strict=True))
        row.update({"k": res.k, "studies": ",".join(grp.loc[ok, "study"].astype(str)),
                    "hedges_g": res.estimate, "se": res.se, "ci_low": res.ci_low,
                    "ci_high": res.ci_high, "p_value": res.p_value, "tau2": res.tau2,
                    "i2": res.i2, "q_stat": res.q, "q_p": res.q_p,
                    "reason": "" if res.k else "no study could test this contrast"})
        rows.append(row)
    meta = pd.DataFrame(rows)
    meta["effect"] = meta["hedges_g"]
    meta["n_arm"] = meta["k"]
    meta["n_reference"] = meta["k"]
    meta["paired"] = False
    meta["mde"] = np.nan
    out = add_verdicts(meta, alpha, families=("kind",))
    tested = (out["verdict"] == "inconclusive") & (out["k"] > 0)
    out.loc[tested, "reason"] = [
        f"not significant (p = {_fmt(p, 2)}, q = {_fmt(q, 2)} >= {alpha}; pooled g = "
        f"{_fmt(g, 2)} from {k} stud{'y' if k == 1 else 'ies'})"
        for p, q, g, k in zip(out.loc[tested, "p_value"], out.loc[tested, "q_value"],
                              out.loc[tested, "hedges_g"], out.loc[tested, "k"], strict=True)]
    for i, study_row in single.items():
        for col in ("p_value", "q_value", "verdict"):
            out.loc[i, col] = study_row[col]
        out.loc[i, "reason"] = f"one study ({study_row['study']}): {study_row['reason']}"
    return out[META_COLUMNS]


# --- rule entry points ----------------------------------------------------------------------------

def snakemake_entry(smk: Any) -> None:
    """Rule ``claims``: verdicts of one study."""
    from livermsc.score import load_signatures

    settings = claims_settings(smk.params.cfg)
    signatures = load_signatures(smk.input.signatures, smk.params.species)
    catalogue = load_catalogue(smk.input.catalogue, signatures)
    scores = pd.read_csv(smk.input.scores, sep="\t", keep_default_na=True,
                         dtype={"sample": str, "animal": str, "arm": str, "batch": str,
                                "stage": str, "population": str})
    coverage = pd.read_csv(smk.input.coverage, sep="\t")
    table, methods = evaluate_study(scores, coverage, catalogue, smk.wildcards.study, settings,
                                    smk.params.score_cfg)
    table.to_csv(smk.output.claims, sep="\t", index=False, na_rep="NA")
    methods.to_csv(smk.output.methods, sep="\t", index=False, na_rep="NA")
    Path(smk.output.summary).write_text(summary_markdown(table, methods, smk.wildcards.study,
                                                         settings))
    log.info("%s: %s", smk.wildcards.study, table["verdict"].value_counts().to_dict())


def snakemake_meta_entry(smk: Any) -> None:
    """Rule ``claims_meta``: pool every study's claims (the report stage draws the forest plot)."""
    settings = claims_settings(smk.params.cfg)
    tables = [pd.read_csv(p, sep="\t", dtype={"stage": str}, keep_default_na=True)
              for p in smk.input.claims]
    meta = meta_analysis(tables, float(settings["alpha"]))
    meta.to_csv(smk.output.meta, sep="\t", index=False, na_rep="NA")

"""Calibration: false-positive rate under realistic traps and power, on simulated studies.

Every simulated study has the arms of the claims catalogue (``healthy``, ``injury``,
``injury_msc``, ``injury_ev``) and is judged against the real catalogue (``claims.catalogue``,
default ``seeds/claims.yaml``), so that the Benjamini-Hochberg family is the one real studies
get. The positive controls (injury vs healthy) are planted in every scenario (4 SD), so that a
claim is gated only where its control fails by chance; everything else is a planted null unless a
scenario plants it.

Scenarios (one simulator setting each, :data:`SCENARIOS`):

* ``a_population_size``: stellate cells about 15 per sample in ``injury_msc`` vs 200 in ``injury``,
  signature genes at 0.05-0.1 UMI per cell;
* ``b_heteroscedastic``: between-animal SD x1 in ``injury``/``injury_msc``, x0.3/x0.5 in the other arms;
* ``c_composition``: a non-signature programme takes 10 % of stellate-cell UMIs in ``injury``;
* ``d_share_parent_size``: CD4 T cells about 25 per sample in ``injury_msc`` vs 300 in
  ``injury``, Tregs 8 % of them (share nulls with small and large parents);
* ``d_share_rare``: Tregs at 2 % of about 200 CD4 T cells and monocyte-derived macrophages at
  1.5 % of about 100 macrophages per sample;
* ``e_batch_is_arm``: one technical batch per arm;
* ``f_programme_correlation``: programme-level animal effects at correlation 0.8 (0.5 is on in
  every scenario);
* ``g_low_expression``: every expressed signature at 0.05-0.2 UMI per cell;
* ``power_<s>sd_<n>v<n>``: programme effects of ``s`` score-level SDs (the between-animal SD of the
  signature score) planted in ``injury_msc`` vs ``injury`` at ``n`` animals per arm;
* ``demo``: the built-in demo study (``config/studies/demo.yaml``) as it is, so that the verdict
  rates of every demo row (planted and unplanted) are known.

The fast path uses the simulator's truth labels as annotation and drops its flagged doublets and
low-quality cells; the ``pipeline_*`` scenarios run real QC (:mod:`livermsc.qc`), normalisation,
HVGs and PCA (:mod:`livermsc.integrate`), Leiden clustering (:mod:`livermsc.cluster`) and
marker-panel annotation (:mod:`livermsc.annotate`) instead (PCA in place of scVI, to keep runs
short). Scoring (:mod:`livermsc.score`) and verdicts (:mod:`livermsc.claims`) run as in the
workflow, with the primary verdict method only (no sensitivity methods).

Rates: a row is *tested* when it entered the Benjamini-Hochberg family (it has a q-value); the
false-positive rate is the share of tested planted-null rows called ``supported`` or
``contradicted`` (flagged or not), with a 95 % Clopper-Pearson interval (rows of one study share
its animals, so the interval is somewhat optimistic); power is the share of tested planted rows
``supported`` without a failed-control flag. Rows whose signature shares genes with a planted
programme in a related population are neither nulls nor planted effects and are left out.
"""

from __future__ import annotations

import inspect
import logging
import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy import stats as sps

from livermsc import annotate, cluster, integrate, qc, simulate
from livermsc.catalogue import load_catalogue, load_panel, load_signatures
from livermsc.claims import evaluate_study
from livermsc.config import claims_settings, score_settings
from livermsc.schema import REPO_ROOT, ConfigError, load_yaml, validate
from livermsc.score import catalogue_share_pairs, score_study
from livermsc.vocabulary import SIGNATURE_METHODS

log = logging.getLogger("livermsc.calibrate")

ARMS = {"healthy": None, "injury": "healthy", "injury_msc": "injury", "injury_ev": "injury"}
#: catalogue signatures the simulator expresses beyond its built-in homes (log-weight lift)
EXTRA_HOMES: dict[str, dict[str, float]] = {
    "inflammatory_cytokines": {"macrophage": 1.0, "neutrophil": 1.0},
    "ecm_collagen": {"hsc": 2.0}, "tgfb_smad": {"hsc": 1.0}, "timp": {"hsc": 1.5},
    "mmp_fibrolytic": {"macrophage": 0.5}, "anti_inflammatory": {"macrophage": 0.5},
    "samac": {"macrophage": 1.0}, "t_cell_activation": {"cd4_tconv": 1.0, "cd8_t": 1.0},
    "b_cell_activation": {"b_cell": 1.0}, "hepatic_lipogenesis": {"hepatocyte": 1.5},
    "cell_cycle": {"hsc": 0.0, "cd4_tconv": 0.0, "cd8_t": 0.0, "b_cell": 0.0},
}
#: positive controls planted in every scenario: (effect id, kind, population, program, size)
CONTROLS = [("ctl_hsc_activation", "program", "hsc", "hsc_activation", 4.0),
            ("ctl_hsc_quiescence", "program", "hsc", "hsc_quiescence", -4.0),
            ("ctl_m1", "program", "macrophage", "m1_macrophage", 4.0),
            ("ctl_samac", "program", "macrophage", "samac", 4.0),
            ("ctl_momac_share", "share", "momac", None, 4.0)]
#: programme effects planted by the power scenarios in injury_msc vs injury (signed as claimed)
POWER_EFFECTS = [("hsc", "hsc_activation", -1), ("macrophage", "m1_macrophage", -1),
                 ("macrophage", "m2_macrophage", 1), ("hepatocyte", "hepatocyte_proliferation", 1),
                 ("lsec", "angiogenesis", 1), ("dendritic_cell", "dc_maturation", -1)]
LOW_UMI = [0.05, 0.2]


@dataclass(frozen=True)
class Scenario:
    """One simulation setting: parameter overrides, planted effects and the trap's target rows."""

    name: str
    label: str
    overrides: dict = field(default_factory=dict)
    effects: tuple = ()  # extra planted effects (simulator effect specs)
    drop_controls: tuple = ()  # control effect ids left unplanted (their rows become nulls)
    target: dict = field(default_factory=dict)  # populations / measure types / contrasts / signatures
    animals_per_arm: int = 3
    effect_size: float = 0.0
    pipeline: bool = False
    studies: float = 1.0  # factor on the number of studies (share traps have few rows per study)
    study_file: str = ""  # simulate exactly this study file's design instead (e.g. the demo)


def _power(size: float, n: int, pipeline: bool = False) -> Scenario:
    effects = tuple({"id": f"msc_{sig}", "kind": "program", "population": pop, "program": sig,
                     "contrast": ["injury_msc", "injury"], "size": sign * size}
                    for pop, sig, sign in POWER_EFFECTS)
    name = f"{'pipeline_' if pipeline else ''}power_{size:g}sd_{n}v{n}"
    return Scenario(name, f"power, {size:g} score-level SD, {n} vs {n}"
                    + (" (QC -> PCA -> Leiden -> annotation)" if pipeline else ""),
                    effects=effects, animals_per_arm=n, effect_size=size, pipeline=pipeline,
                    studies=1.0 if pipeline else 0.5)


SCENARIOS: dict[str, Scenario] = {s.name: s for s in [
    Scenario("a_population_size", "(a) HSCs 15 vs 200 cells per sample, genes 0.05-0.1 UMI/cell",
             {"population_scale": {"injury_msc": {"hsc": 0.3}, "injury": {"hsc": 8.0}},
              "signature_umi": {s: [0.05, 0.1] for s in ("hsc_activation", "hsc_quiescence",
                                                         "ecm_collagen", "tgfb_smad", "timp",
                                                         "cell_cycle")}},
             target={"populations": ["hsc"]}),
    Scenario("b_heteroscedastic", "(b) animal SD x1 in injury/injury_msc, x0.3/x0.5 elsewhere",
             {"arm_sd": {"healthy": 0.3, "injury_ev": 0.5}},
             target={"contrasts": ["injury_msc vs injury"]}),
    Scenario("c_composition", "(c) a non-signature programme takes 10% of HSC UMIs in injury",
             {"background_programme": [{"arm": "injury", "population": "hsc", "share": 0.10}]},
             drop_controls=("ctl_hsc_quiescence",), target={"populations": ["hsc"]}),
    Scenario("d_share_parent_size", "(d) share nulls, parents 25 vs 300 cells per sample",
             {"population_scale": {"injury_msc": {"cd4_t": 0.6}, "injury": {"cd4_t": 13.0}},
              "state_baseline": {"treg": 0.08}},
             target={"measure_types": ["share"]}, studies=2.0),
    Scenario("d_share_rare", "(d) share nulls, rare states (1.5-2% of a parent of ~100-200 cells)",
             {"state_baseline": {"treg": 0.02, "momac": 0.015},
              "population_scale": {arm: {"cd4_t": 6.0, "macrophage": 3.0} for arm in ARMS}},
             drop_controls=("ctl_momac_share",), target={"measure_types": ["share"]},
             studies=2.0),
    Scenario("e_batch_is_arm", "(e) batch = arm", {"batch_by_arm": True}, target={}),
    Scenario("f_programme_correlation", "(f) programme-level animal effects, correlation 0.8",
             {"programme_correlation": 0.8}, target={"measure_types": ["signature"]}),
    Scenario("g_low_expression", "(g) signature genes at 0.05-0.2 UMI/cell",
             {"signature_umi": {s: LOW_UMI for s in (*simulate.SIGNATURE_HOMES, *EXTRA_HOMES)}},
             target={"measure_types": ["signature"]}),
    *[_power(s, n) for n in (3, 6) for s in (1.0, 2.0, 3.0)],
    Scenario("pipeline_null", "null (QC -> PCA -> Leiden -> annotation)", pipeline=True,
             target={}),
    Scenario("demo", "the demo study (config/studies/demo.yaml)",
             study_file="config/studies/demo.yaml"),
    _power(2.0, 3, pipeline=True),
]}


def simulate_adata(params: Mapping, signatures: Mapping[str, Sequence[str]], seed: int = 0,
                   species: str = "mouse") -> ad.AnnData:
    """Simulate a study in memory: one AnnData with counts in ``X`` and ``layers["counts"]`` and
    the truth (cell_type, cell_state, is_doublet, is_low_quality) in ``obs``.

    Uses :func:`livermsc.simulate.iter_samples`, like ``simulate_study``, so the counts equal
    those written to disk for the same parameters, signatures and seed.
    """
    sets = {k: list(v) for k, v in signatures.items()}
    genes, _, _, samples = simulate.iter_samples(dict(params), sets, seed, species)
    blocks, obs_parts = [], []
    for s in samples:
        obs = s.obs
        obs.index = [f"{s.row.sample}:{bc}" for bc in s.barcodes]
        for col in ("sample", "arm", "animal", "batch"):
            obs[col] = getattr(s.row, col)
        blocks.append(s.X)
        obs_parts.append(obs)
    obs = pd.concat(obs_parts)
    for col in ("sample", "arm", "animal", "batch", "cell_type", "cell_state"):
        obs[col] = pd.Categorical(obs[col].astype(str))
    X = sp.vstack(blocks).tocsr().astype(np.float32)
    adata = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=genes))
    adata.layers["counts"] = adata.X.copy()
    return adata


def truth_qc(adata: ad.AnnData) -> ad.AnnData:
    """The fast path's QC: drop the cells the simulator flagged as doublets or low quality."""
    keep = ~(adata.obs["is_doublet"].astype(bool) | adata.obs["is_low_quality"].astype(bool))
    return adata[keep.to_numpy()].copy()


def scenario_params(scenario: Scenario, cells_per_sample: int = 600,
                    n_background_genes: int = 300) -> dict:
    """Validated simulation parameters of a scenario."""
    if scenario.study_file:
        path = Path(scenario.study_file)
        path = path if path.is_file() else REPO_ROOT / path
        spec = validate(load_yaml(path), "study", str(path))
        return validate(dict(spec["simulate"]), "simulate", scenario.study_file)
    effects = [{"id": cid, "kind": kind, "population": pop, "contrast": ["injury", "healthy"],
                "size": size, **({"program": prog} if prog else {})}
               for cid, kind, pop, prog, size in CONTROLS if cid not in scenario.drop_controls]
    effects += [dict(e) for e in scenario.effects]
    n = int(scenario.animals_per_arm)
    params = {"n_cells": int(cells_per_sample) * n * len(ARMS), "arms": dict(ARMS),
              "animals_per_arm": n, "n_background_genes": int(n_background_genes),
              "signature_homes": EXTRA_HOMES, "effects": effects, **scenario.overrides}
    return validate(params, "simulate", f"calibration scenario {scenario.name}")


def _related(a: str, b: str) -> bool:
    """Same population, or a cell state and its parent cell type."""
    if a == b:
        return True
    parent = {s: p for s, (p, _, _) in simulate.CELL_STATES.items()}
    return parent.get(a) == b or parent.get(b) == a


def row_truth(catalogue: Mapping, params: Mapping, signatures: Mapping[str, Sequence[str]]
              ) -> pd.DataFrame:
    """What was planted for every claim x contrast of the catalogue.

    Columns: claim_id, contrast, planted (score-level or logit-share SDs, signed; 0 for a null),
    truth (``effect``, ``no_effect`` or ``overlap``: a signature sharing genes with a planted
    programme in a related population, or a share whose sibling carries an effect).
    """
    effects = simulate.parse_effects(dict(params))
    levels = simulate.arm_levels(params["arms"], effects)
    siblings = {s: p for s, (p, _, _) in simulate.CELL_STATES.items()}
    rows = []
    for claim in catalogue["claims"]:
        pop = claim["population"]["value"]
        mtype = claim["measure"]["type"]
        genes = set(signatures.get(claim["measure"].get("signature", ""), ()))
        for c in claim["contrasts"]:
            arm, ref, stage = c["arm"], c["reference"], c.get("stage") or ""
            label = f"{arm} vs {ref}" + (f" ({stage})" if stage else "")
            planted, overlap = 0.0, False
            if arm in levels and ref in levels:
                for e in effects:
                    diff = levels[arm][e.id] - levels[ref][e.id]
                    if diff == 0:
                        continue
                    if mtype == "signature" and e.kind == "program" and _related(e.population, pop):
                        shared = genes & set(signatures.get(e.program, ()))
                        if e.program == claim["measure"]["signature"] and e.population == pop:
                            planted += diff
                        elif shared:
                            overlap = True
                    elif mtype == "share" and e.kind == "share":
                        if e.population == pop:
                            planted += diff
                        elif siblings.get(e.population) == siblings.get(pop):
                            planted -= diff  # the sibling state's effect, seen from this state
            truth = "overlap" if overlap else ("effect" if planted else "no_effect")
            rows.append({"claim_id": claim["id"], "contrast": label, "planted": planted,
                         "truth": truth})
    return pd.DataFrame(rows)


def _annotate_pipeline(adata: ad.AnnData, cfg: Mapping, seed: int) -> ad.AnnData:
    """Real QC per sample, then normalisation, HVGs, PCA, Leiden and marker-panel annotation."""
    settings = qc.QCSettings.from_config(cfg["qc"], seed=seed)
    kept = []
    for sample in adata.obs["sample"].cat.categories:
        one = adata[(adata.obs["sample"] == sample).to_numpy()].copy()
        _, k, _ = qc.run_qc(one, settings, "mouse")
        kept.append(k)
    merged = ad.concat(kept, join="inner", merge="same")
    merged.obs = merged.obs[["sample", "arm", "animal", "batch"]].astype("category")
    icfg = cfg["integrate"]
    integrate.normalise(merged, icfg["target_sum"])
    integrate.select_hvgs(merged, int(icfg["n_top_genes"]), None)
    integrate.pca_baseline(merged, int(icfg["n_pcs"]), seed)
    ccfg = {**cfg["cluster"], "use_rep": "X_pca",
            "resolutions": [cfg["cluster"]["annotation"]["resolution"]]}
    cluster.cluster(merged, ccfg, seed)
    panel = load_panel(cfg["cluster"]["celltypes"], species="mouse")
    annotate.annotate(merged, panel, ccfg, seed)
    merged.X = merged.layers["counts"].copy()
    return merged


def run_study(scenario: str, seed: int, catalogue: Mapping,
              signatures: Mapping[str, Sequence[str]], cfg: Mapping, cells_per_sample: int,
              n_background_genes: int) -> pd.DataFrame:
    """Simulate, (annotate,) score and test one study; its primary verdict rows, tagged."""
    sc_ = SCENARIOS[scenario]
    params = scenario_params(sc_, cells_per_sample, n_background_genes)
    adata = simulate_adata(params, signatures, seed=seed)
    adata = _annotate_pipeline(adata, cfg, seed) if sc_.pipeline else truth_qc(adata)
    adata.obs["study"] = pd.Categorical([f"{scenario}_{seed}"] * adata.n_obs)
    sig_claims = [c for c in catalogue["claims"] if c["measure"]["type"] == "signature"]
    used = {c["measure"]["signature"] for c in sig_claims}
    pops = {(c["population"]["level"], c["population"]["value"]) for c in sig_claims}
    score_cfg, claims_cfg = cfg["score"], cfg["claims"]
    res = score_study(adata, {k: v for k, v in signatures.items() if k in used},
                      f"{scenario}_{seed}", score_cfg,
                      share_pairs=catalogue_share_pairs(catalogue), seed=seed, populations=pops)
    accepted = inspect.signature(evaluate_study).parameters
    kwargs: dict[str, Any] = {}
    if "pseudobulk" in accepted:
        kwargs["pseudobulk"] = res.pseudobulk
    table, _ = evaluate_study(res.sample_scores, res.coverage, catalogue, f"{scenario}_{seed}",
                              claims_cfg, score_cfg, **kwargs)
    table = table.copy()
    table["scenario"] = scenario
    table["seed"] = seed
    return table


def _ci(k: int, n: int) -> tuple[float, float]:
    if n == 0:
        return float("nan"), float("nan")
    ci = sps.binomtest(int(k), int(n)).proportion_ci(confidence_level=0.95, method="exact")
    return float(ci.low), float(ci.high)


def _target(df: pd.DataFrame, target: Mapping) -> pd.Series:
    keep = pd.Series(True, index=df.index)
    if target.get("populations"):
        keep &= df["population"].isin(target["populations"])
    if target.get("measure_types"):
        keep &= df["measure_type"].isin(target["measure_types"])
    if target.get("contrasts"):
        keep &= df["contrast"].isin(target["contrasts"])
    return keep


def summarise(runs: pd.DataFrame, truths: Mapping[str, pd.DataFrame],
              animals: Mapping[str, int] | None = None) -> pd.DataFrame:
    """One row per scenario x measure: false-positive rate on the trap's rows and on all null
    rows, or power on the planted rows, with counts and 95 % intervals. ``animals``: animals
    per arm of each scenario (default: the scenario's own)."""
    out = []
    order = [n for n in SCENARIOS if n in set(runs["scenario"])]
    for name in order:
        grp = runs[runs["scenario"] == name]
        sc_ = SCENARIOS[name]
        df = grp.merge(truths[name], on=["claim_id", "contrast"], how="left")
        df["tested"] = np.isfinite(pd.to_numeric(df["q_value"], errors="coerce"))
        df["called"] = df["verdict"].isin(["supported", "contradicted"])
        flag = df["flag"].fillna("").astype(str) if "flag" in df else pd.Series("", df.index)
        df["plain_supported"] = (df["verdict"] == "supported") & (flag == "")
        base = {"scenario": name, "label": sc_.label, "path": "pipeline" if sc_.pipeline
                else "truth labels",
                "animals_per_arm": (animals or {}).get(name, sc_.animals_per_arm),
                "n_studies": int(df["seed"].nunique())}
        nulls = df[df["truth"] == "no_effect"]
        sets = [("false_positive_rate", "all null rows", nulls)]
        if sc_.target:
            sets.insert(0, ("false_positive_rate", "trap rows", nulls[_target(nulls, sc_.target)]))
        for measure, rows_label, sel in sets:
            tested = sel[sel["tested"]]
            k, n = int(tested["called"].sum()), len(tested)
            lo, hi = _ci(k, n)
            p = pd.to_numeric(tested["p_value"], errors="coerce")
            out.append({**base, "measure": measure, "rows": rows_label, "n_rows": len(sel),
                        "n_tested": n, "n_hits": k, "rate": k / n if n else np.nan,
                        "ci_low": lo, "ci_high": hi,
                        "p_below_005": float((p < 0.05).mean()) if n else np.nan,
                        "median_abs_g": float(tested["hedges_g"].abs().median()) if n else np.nan})
        planted = df[(df["truth"] == "effect")]
        if sc_.effect_size:  # the scenario's own effects, not the planted controls
            planted = planted[np.isclose(planted["planted"].abs(), sc_.effect_size)
                              & (planted["kind"] != "control")]
        if len(planted):
            agree = np.sign(planted["planted"]) == np.where(planted["direction"] == "up", 1, -1)
            sel = planted[agree]
            tested = sel[sel["tested"]]
            k, n = int(tested["plain_supported"].sum()), len(tested)
            lo, hi = _ci(k, n)
            what = (f"planted {sc_.effect_size:g} SD" if sc_.effect_size else
                    "planted effects" if sc_.study_file else "planted controls")
            p = pd.to_numeric(tested["p_value"], errors="coerce")
            out.append({**base, "measure": "power", "rows": what, "n_rows": len(sel),
                        "n_tested": n, "n_hits": k, "rate": k / n if n else np.nan,
                        "ci_low": lo, "ci_high": hi,
                        "p_below_005": float((p < 0.05).mean()) if n else np.nan,
                        "median_abs_g": float(tested["hedges_g"].abs().median()) if n else np.nan})
    return pd.DataFrame(out)


def row_rates(runs: pd.DataFrame, truth: pd.DataFrame) -> pd.DataFrame:
    """Per claim x contrast of one scenario: what was planted and how often each verdict came."""
    df = runs.merge(truth, on=["claim_id", "contrast"], how="left")
    df["tested"] = np.isfinite(pd.to_numeric(df["q_value"], errors="coerce"))
    if "flag" not in df:
        df["flag"] = ""
    df["flagged"] = df["flag"].fillna("").astype(str) != ""
    out = df.groupby(["claim_id", "contrast", "kind", "direction", "truth", "planted"],
                     sort=False, dropna=False).agg(
        n_studies=("seed", "nunique"), n_tested=("tested", "sum"),
        supported=("verdict", lambda v: float((v == "supported").mean())),
        contradicted=("verdict", lambda v: float((v == "contradicted").mean())),
        no_effect=("verdict", lambda v: float((v == "no_effect").mean())),
        inconclusive=("verdict", lambda v: float((v == "inconclusive").mean())),
        flagged=("flagged", "mean"),
        median_g=("hedges_g", "median")).reset_index()
    return out


def _init_worker() -> None:
    logging.getLogger("livermsc").setLevel(logging.WARNING)
    logging.getLogger("scanpy").setLevel(logging.WARNING)


#: studies per scenario: (fast path, pipeline path) for the full and the quick sizes; share
#: scenarios run twice and power scenarios half the fast-path number
SIZES = {"full": (10, 2), "quick": (6, 1)}


def calibrate(out: str | Path, cfg: Mapping, scenarios: Sequence[str] | None = None,
              n_studies: int | None = None, n_pipeline: int | None = None, seed: int = 0,
              workers: int = 1, quick: bool = False, cells_per_sample: int | None = None,
              n_background_genes: int = 300) -> dict[str, Any]:
    """Run the calibration and write ``calibration_runs.tsv`` (every verdict row),
    ``calibration.tsv`` (the table), ``calibration_rows.tsv`` (verdict rates per claim x
    contrast and scenario) and ``calibration.md`` to ``out``.

    ``cfg`` is the validated workflow config (its qc, integrate, cluster, score and claims
    sections are used); study i of a scenario uses seed ``seed + i``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = list(scenarios or SCENARIOS)
    unknown = [s for s in names if s not in SCENARIOS]
    if unknown:
        raise ConfigError(f"--scenarios: unknown {unknown} (expected any of {list(SCENARIOS)})")
    fast_n, pipe_n = SIZES["quick" if quick else "full"]
    fast_n = int(n_studies or fast_n)
    pipe_n = int(n_pipeline if n_pipeline is not None else pipe_n)
    cells = int(cells_per_sample or (400 if quick else 600))
    claims_cfg = claims_settings(cfg.get("claims"))
    # the score stage computes only what the verdicts need (voom works on the pseudobulk)
    method = claims_cfg["method"]
    score_cfg = score_settings({**dict(cfg.get("score") or {}),
                                "methods": [method if method in SIGNATURE_METHODS
                                            else "pseudobulk_mean"]})
    run_cfg = {**dict(cfg), "score": score_cfg, "claims": claims_cfg}
    signatures = load_signatures(score_cfg["signatures"], "mouse")
    catalogue = load_catalogue(claims_cfg["catalogue"], signatures)
    truths = {name: row_truth(catalogue, scenario_params(SCENARIOS[name], cells,
                                                         n_background_genes), signatures)
              for name in names}
    counts = {name: pipe_n if SCENARIOS[name].pipeline
              else max(1, round(fast_n * SCENARIOS[name].studies)) for name in names}
    # the slowest (pipeline, 6 vs 6) first, so that parallel workers finish together
    order = sorted(names, key=lambda n: -(40 * SCENARIOS[n].pipeline
                                          + SCENARIOS[n].animals_per_arm))
    tasks = [(name, seed + i, catalogue, signatures, run_cfg, cells, n_background_genes)
             for name in order for i in range(counts[name])]
    start = time.perf_counter()
    if workers > 1:
        # child processes: one BLAS thread each
        saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                 "MKL_NUM_THREADS")}
        os.environ.update({"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                           "MKL_NUM_THREADS": "1"})
        try:
            with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"),
                                     initializer=_init_worker) as pool:
                parts = list(pool.map(run_study, *zip(*tasks, strict=True)))
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    else:
        parts = [run_study(*t) for t in tasks]
    elapsed = time.perf_counter() - start
    runs = pd.concat(parts, ignore_index=True)
    table = summarise(runs, truths, {n: int(scenario_params(SCENARIOS[n], cells,
                                                              n_background_genes)
                                            ["animals_per_arm"]) for n in names})
    rows = pd.concat([row_rates(runs[runs["scenario"] == n], truths[n]).assign(scenario=n)
                      for n in names if (runs["scenario"] == n).any()], ignore_index=True)
    runs.to_csv(out / "calibration_runs.tsv", sep="\t", index=False, na_rep="NA")
    table.to_csv(out / "calibration.tsv", sep="\t", index=False, na_rep="NA")
    rows.to_csv(out / "calibration_rows.tsv", sep="\t", index=False, na_rep="NA")
    design = {"n_studies": fast_n, "n_pipeline": pipe_n, "seed": seed,
              "cells_per_sample": cells, "n_background_genes": n_background_genes,
              "workers": workers, "seconds": round(elapsed, 1), "method": claims_cfg["method"],
              "alpha": claims_cfg["alpha"], "catalogue": claims_cfg["catalogue"]}
    (out / "calibration.md").write_text(calibration_markdown(table, design))
    return {"table": table, "runs": runs, "rows": rows, "design": design}


def format_table(table: pd.DataFrame) -> str:
    """The calibration table as Markdown (one line per scenario x measure)."""
    lines = ["| scenario | path | animals | studies | measure | rows | tested | hits | rate "
             "| 95% CI | p < 0.05 |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in table.itertuples(index=False):
        rate = "NA" if not np.isfinite(r.rate) else f"{r.rate:.3f}"
        ci = ("NA" if not np.isfinite(r.ci_low) else f"{r.ci_low:.3f}-{r.ci_high:.3f}")
        measure = "FPR" if r.measure == "false_positive_rate" else "power"
        raw = "NA" if not np.isfinite(r.p_below_005) else f"{r.p_below_005:.3f}"
        lines.append(f"| {r.label} | {r.path} | {r.animals_per_arm} | {r.n_studies} | "
                     f"{measure} | {r.rows} | {r.n_tested} | {r.n_hits} | {rate} | {ci} | "
                     f"{raw} |")
    return "\n".join(lines)


def calibration_markdown(table: pd.DataFrame, design: Mapping) -> str:
    """A short report of the calibration."""
    return "\n".join([
        "# Calibration of the claim verdicts on simulated studies", "",
        f"{design['n_studies']} studies per scenario on truth labels, {design['n_pipeline']} "
        f"through QC -> PCA -> Leiden -> annotation (seeds from {design['seed']}), about "
        f"{design['cells_per_sample']} cells per sample, arms {', '.join(ARMS)}; catalogue "
        f"`{design['catalogue']}`, verdict method `{design['method']}`, alpha "
        f"{design['alpha']}. Wall time {design['seconds']} s with {design['workers']} "
        "worker(s).", "",
        "FPR = share of tested planted-null rows called supported or contradicted; power = share "
        "of tested planted rows supported (no failed-control flag); 95% Clopper-Pearson "
        "intervals; p < 0.05: share of those rows with an unadjusted p below 0.05 (the test's "
        "own calibration, before Benjamini-Hochberg over the catalogue). Effects in "
        "score-level SDs (between-animal SD of the signature score).", "",
        format_table(table), ""])


def calibrate_cli(args: Any) -> int:
    """``livermsc calibrate``: run :func:`calibrate` with the settings of a config file."""
    cfg = validate(load_yaml(args.configfile) or {}, "config", args.configfile)
    for flag, value in (("--n-studies", args.n_studies), ("--workers", args.workers)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag}: {value} (expected: at least 1)")
    if args.pipeline_studies is not None and args.pipeline_studies < 0:
        raise ConfigError(f"--pipeline-studies: {args.pipeline_studies} (expected: 0 or more)")
    scenarios = args.scenarios.split(",") if args.scenarios else None
    res = calibrate(args.out, cfg, scenarios=scenarios, n_studies=args.n_studies,
                    n_pipeline=args.pipeline_studies, seed=args.seed, workers=args.workers,
                    quick=args.quick, cells_per_sample=args.cells_per_sample)
    print(format_table(res["table"]))
    print(f"{len(res['runs']['scenario'].unique())} scenarios in {res['design']['seconds']} s; "
          f"tables and calibration.md in {args.out}")
    return 0

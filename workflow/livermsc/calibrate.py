"""Calibration: power and false-positive rate of the verdict machinery on simulated studies.

Many small studies are simulated in memory with the demo simulator (:mod:`livermsc.simulate`),
each with three arms of ``animals_per_arm`` animals: ``control``, ``treated`` (planted programme
effects of ``effect_size`` between-animal SDs and a cell-state share effect) and ``sham`` (no
effect at all). The fast path uses the simulator's truth labels as the cell annotation and
drops its doublets and low-quality cells in place of QC (no scVI, no clustering); scoring
(:mod:`livermsc.score`) and verdicts (:mod:`livermsc.claims`) run exactly as in the workflow.

Every claim is tested twice: ``treated vs control`` (planted effect, or a planted null for the
programmes left alone) and ``sham vs control`` (always a planted null). Power is the share of
studies whose planted effect is ``supported`` (right direction, q < alpha); the false-positive
rate is the share of planted nulls called ``supported`` or ``contradicted``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from livermsc import simulate
from livermsc.config import ConfigError, validate

log = logging.getLogger("livermsc.calibrate")

#: planted programme effects in the treated arm: (signature, population, sign)
PROGRAMME_EFFECTS = [("hsc_activation", "hsc", 1), ("m1_macrophage", "macrophage", -1),
                     ("m2_macrophage", "macrophage", 1), ("angiogenesis", "lsec", 1),
                     ("hepatocyte_proliferation", "hepatocyte", -1)]
#: programmes with a baseline in their population that no arm changes
PROGRAMME_NULLS = [("hsc_quiescence", "hsc"), ("dc_maturation", "dendritic_cell")]
#: cell-state share effect (state, parent cell type) and a share null
SHARE_EFFECT = ("momac", "macrophage")
SHARE_NULL = ("treg", "cd4_t")


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


def calibration_design(effect_size: float = 1.5, share_size: float = 3.0, n_cells: int = 3600,
                       animals_per_arm: int = 3, n_background_genes: int = 300
                       ) -> tuple[dict, dict, pd.DataFrame]:
    """Simulation parameters, the claims catalogue that tests them, and the planted truth.

    Truth has one row per claim x contrast: claim_id, contrast, planted (size in SDs; 0 for a
    null), kind (programme or share).
    """
    effects, claims, truth = [], [], []
    contrasts = [{"arm": "treated", "reference": "control"}, {"arm": "sham", "reference": "control"}]
    for sig, pop, sign in PROGRAMME_EFFECTS:
        cid = f"{sig}_in_{pop}"
        effects.append({"id": cid, "kind": "program", "population": pop, "program": sig,
                        "contrast": ["treated", "control"], "size": sign * effect_size})
        claims.append(_claim(cid, {"level": "cell_type", "value": pop},
                             {"type": "signature", "signature": sig}, contrasts,
                             "up" if sign > 0 else "down"))
        truth += [(cid, "treated vs control", sign * effect_size, "programme"),
                  (cid, "sham vs control", 0.0, "programme")]
    for sig, pop in PROGRAMME_NULLS:
        cid = f"{sig}_in_{pop}"
        claims.append(_claim(cid, {"level": "cell_type", "value": pop},
                             {"type": "signature", "signature": sig}, contrasts, "up"))
        truth += [(cid, "treated vs control", 0.0, "programme"),
                  (cid, "sham vs control", 0.0, "programme")]
    for (state, parent), size in ((SHARE_EFFECT, share_size), (SHARE_NULL, 0.0)):
        cid = f"{state}_share_of_{parent}"
        if size:
            effects.append({"id": cid, "kind": "share", "population": state,
                            "contrast": ["treated", "control"], "size": size})
        claims.append(_claim(cid, {"level": "cell_state", "value": state},
                             {"type": "share", "parent": {"level": "cell_type", "value": parent}},
                             contrasts, "up" if size >= 0 else "down"))
        truth += [(cid, "treated vs control", size, "share"), (cid, "sham vs control", 0.0, "share")]
    params = validate({"n_cells": int(n_cells), "animals_per_arm": int(animals_per_arm),
                       "n_background_genes": int(n_background_genes),
                       "arms": {"control": None, "treated": "control", "sham": "control"},
                       "effects": effects}, "simulate", "calibration design")
    catalogue = validate({"claims": claims}, "claims", "calibration catalogue")
    return params, catalogue, pd.DataFrame(truth, columns=["claim_id", "contrast", "planted",
                                                           "effect_kind"])


def _claim(cid: str, population: dict, measure: dict, contrasts: list, direction: str) -> dict:
    return {"id": cid, "kind": "claim", "statement": f"calibration: {cid}",
            "population": population, "measure": measure, "contrasts": contrasts,
            "direction": direction}


def run_study(index: int, seed: int, params: Mapping, catalogue: Mapping,
              signatures: Mapping[str, Sequence[str]], score_cfg: Mapping,
              claims_cfg: Mapping) -> pd.DataFrame:
    """Simulate, score and test one study; every method's verdict rows, tagged with the study."""
    from livermsc.claims import evaluate_study
    from livermsc.score import catalogue_share_pairs, score_study

    adata = truth_qc(simulate_adata(params, signatures, seed=seed))
    sig_claims = [c for c in catalogue["claims"] if c["measure"]["type"] == "signature"]
    used = {c["measure"]["signature"] for c in sig_claims}
    pops = {(c["population"]["level"], c["population"]["value"]) for c in sig_claims}
    res = score_study(adata, {k: v for k, v in signatures.items() if k in used}, f"sim{index}",
                      score_cfg, share_pairs=catalogue_share_pairs(catalogue), seed=seed,
                      populations=pops)
    _, methods = evaluate_study(res.sample_scores, res.coverage, catalogue, f"sim{index}",
                                claims_cfg, score_cfg)
    methods["seed"] = seed
    return methods


def summarise(runs: pd.DataFrame, truth: pd.DataFrame, primary: str, alpha: float = 0.05
              ) -> pd.DataFrame:
    """Power (planted effects) and false-positive rate (planted nulls) per claim x contrast x method."""
    df = runs.merge(truth, on=["claim_id", "contrast"], how="left")
    df["called"] = df["verdict"].isin(["supported", "contradicted"])
    df["correct"] = df["verdict"] == "supported"
    df["tested"] = np.isfinite(df["p_value"].astype(float))
    df["p_below"] = df["p_value"].astype(float) < alpha
    out = df.groupby(["claim_id", "contrast", "method", "planted", "effect_kind"], sort=False).agg(
        n_studies=("verdict", "size"), n_tested=("tested", "sum"),
        supported=("correct", "mean"), called=("called", "mean"),
        contradicted=("verdict", lambda v: float((v == "contradicted").mean())),
        p_below_alpha=("p_below", "mean"), median_g=("hedges_g", "median")).reset_index()
    out["truth"] = np.where(out["planted"] != 0, "effect", "null")
    out["rate"] = np.where(out["truth"] == "effect", out["supported"], out["called"])
    out["measure"] = np.where(out["truth"] == "effect", "power", "false_positive_rate")
    out["primary"] = (out["method"] == primary) | (out["effect_kind"] == "share")
    return out


def overall(summary: pd.DataFrame) -> pd.DataFrame:
    """Per method: mean power over planted programme effects, share power, FPR over all nulls."""
    rows = []
    for method, grp in summary[summary["effect_kind"] == "programme"].groupby("method", sort=False):
        eff = grp[(grp["truth"] == "effect") & (grp["effect_kind"] == "programme")]
        nul = grp[grp["truth"] == "null"]
        rows.append({"method": method, "programme_power_mean": eff["rate"].mean(),
                     "programme_power_min": eff["rate"].min(),
                     "null_fpr": (nul["rate"] * nul["n_studies"]).sum() / nul["n_studies"].sum()
                     if len(nul) else np.nan,
                     "null_fpr_max": nul["rate"].max(), "n_null_tests": int(nul["n_studies"].sum())})
    share = summary[(summary["effect_kind"] == "share")]
    if len(share):
        eff, nul = share[share["truth"] == "effect"], share[share["truth"] == "null"]
        rows.append({"method": "proportion (shares, logit test)",
                     "programme_power_mean": np.nan, "programme_power_min": np.nan,
                     "share_power": eff["rate"].mean() if len(eff) else np.nan,
                     "null_fpr": (nul["rate"] * nul["n_studies"]).sum() / nul["n_studies"].sum()
                     if len(nul) else np.nan,
                     "null_fpr_max": nul["rate"].max(), "n_null_tests": int(nul["n_studies"].sum())})
    return pd.DataFrame(rows)


def _init_worker() -> None:
    logging.getLogger("livermsc").setLevel(logging.WARNING)


def calibrate(n_studies: int, out: str | Path, seed: int = 0, workers: int = 1,
              effect_size: float = 1.5, share_size: float = 3.0, n_cells: int = 3600,
              animals_per_arm: int = 3, n_background_genes: int = 300,
              signatures_path: str | Path = "config/signatures.yaml",
              score_cfg: Mapping | None = None, claims_cfg: Mapping | None = None
              ) -> dict[str, Any]:
    """Run ``n_studies`` simulated studies and write the calibration tables and summary to ``out``.

    Writes ``calibration_runs.tsv`` (every verdict), ``calibration.tsv`` (rates per claim x
    contrast x method), ``calibration_overall.tsv`` and ``calibration.md``; returns the overall
    table and timings. Study i uses seed ``seed + i``.
    """
    from livermsc.claims import claims_settings
    from livermsc.score import load_signatures, score_settings

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    score_cfg = score_settings(score_cfg)
    claims_cfg = claims_settings(claims_cfg)
    signatures = load_signatures(signatures_path, "mouse")
    params, catalogue, truth = calibration_design(effect_size, share_size, n_cells,
                                                  animals_per_arm, n_background_genes)
    args = [(i, seed + i, params, catalogue, signatures, score_cfg, claims_cfg)
            for i in range(n_studies)]
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
                parts = list(pool.map(run_study, *zip(*args, strict=True)))
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    else:
        parts = [run_study(*a) for a in args]
    elapsed = time.perf_counter() - start
    runs = pd.concat(parts, ignore_index=True)
    summary = summarise(runs, truth, claims_cfg["method"], float(claims_cfg["alpha"]))
    totals = overall(summary)
    runs.to_csv(out / "calibration_runs.tsv", sep="\t", index=False, na_rep="NA")
    summary.to_csv(out / "calibration.tsv", sep="\t", index=False, na_rep="NA")
    totals.to_csv(out / "calibration_overall.tsv", sep="\t", index=False, na_rep="NA")
    design = {"n_studies": n_studies, "seed": seed, "effect_size": effect_size,
              "share_size": share_size, "n_cells": n_cells, "animals_per_arm": animals_per_arm,
              "n_background_genes": n_background_genes, "workers": workers,
              "seconds": round(elapsed, 1)}
    (out / "calibration.md").write_text(calibration_markdown(summary, totals, design, claims_cfg))
    return {"overall": totals, "summary": summary, "design": design}


def calibration_markdown(summary: pd.DataFrame, totals: pd.DataFrame, design: Mapping,
                         claims_cfg: Mapping) -> str:
    """A short report of the calibration."""
    def fmt(df: pd.DataFrame) -> str:
        cols = list(df.columns)
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for rec in df.itertuples(index=False):
            lines.append("| " + " | ".join(
                ("NA" if np.isnan(v) else f"{v:.3f}") if isinstance(v, float) else str(v)
                for v in rec) + " |")
        return "\n".join(lines)

    primary = summary[summary["primary"]][["claim_id", "contrast", "method", "planted",
                                           "measure", "rate", "n_tested", "n_studies",
                                           "median_g"]]
    return "\n".join([
        "# Calibration of the claim verdicts on simulated studies", "",
        f"{design['n_studies']} simulated studies (seeds {design['seed']}..."
        f"{design['seed'] + design['n_studies'] - 1}), {design['animals_per_arm']} animals per "
        f"arm (arms control, treated, sham), about {design['n_cells']} cells per study, "
        f"{design['n_background_genes']} background genes; truth labels as annotation, "
        f"flagged doublets and low-quality cells removed. Planted programme effects "
        f"{design['effect_size']} between-animal SDs, share effect {design['share_size']} SDs "
        f"of the logit share. Verdict method `{claims_cfg['method']}`, alpha "
        f"{claims_cfg['alpha']} (Benjamini-Hochberg within each study), min "
        f"{claims_cfg['min_samples_per_arm']} animals per arm. Wall time {design['seconds']} s "
        f"with {design['workers']} worker(s).", "",
        "Power = share of studies with the planted effect `supported`; false-positive rate = "
        "share of planted nulls called `supported` or `contradicted`.", "",
        "## Overall, per scoring method", "", fmt(totals), "",
        "## Per claim x contrast (verdict method)", "", fmt(primary), ""])


def calibrate_cli(args: Any) -> int:
    """``livermsc calibrate``: run :func:`calibrate` with the score/claims settings of a config."""
    from livermsc.config import load_yaml

    cfg = validate(load_yaml(args.configfile) or {}, "config", args.configfile)
    if args.n_studies < 1:
        raise ConfigError(f"--n-studies: {args.n_studies} (expected: at least 1)")
    res = calibrate(args.n_studies, args.out, seed=args.seed, workers=args.workers,
                    effect_size=args.effect_size, share_size=args.share_size,
                    n_cells=args.n_cells, animals_per_arm=args.animals_per_arm,
                    n_background_genes=args.background_genes,
                    signatures_path=cfg["score"]["signatures"], score_cfg=cfg["score"],
                    claims_cfg=cfg["claims"])
    print(res["overall"].to_string(index=False))
    print(f"{args.n_studies} studies in {res['design']['seconds']} s; tables and "
          f"calibration.md in {args.out}")
    return 0

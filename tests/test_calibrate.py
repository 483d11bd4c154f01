"""Calibration: the in-memory simulation, the planted truth, the rate bookkeeping, verdict rates
of the demo over many simulated copies, and a small run from the command line."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scanpy as sc
from livermsc.calibrate import (
    SCENARIOS,
    calibrate,
    row_rates,
    row_truth,
    scenario_params,
    summarise,
)


def test_in_memory_simulation_equals_written_study(sim_study, repo_root):
    """Same parameters, signatures and seed: the counts simulate_study wrote to disk."""
    from conftest import SIM_STUDY, demo_params
    from livermsc.calibrate import simulate_adata
    from livermsc.catalogue import load_signatures
    from livermsc.config import validate

    folder, truth = sim_study
    params = validate(demo_params(**SIM_STUDY), "simulate", "demo.yaml")
    signatures = load_signatures(repo_root / "config" / "signatures.yaml", "mouse")
    adata = simulate_adata(params, signatures, seed=1)
    assert adata.n_obs == truth["n_cells"]
    assert int(adata.obs["is_doublet"].sum()) == truth["n_doublets"]
    disk = sc.read_10x_mtx(folder / "injury_msc_2")
    mine = adata[(adata.obs["sample"] == "injury_msc_2").to_numpy()]
    assert list(mine.var_names) == list(disk.var_names)
    assert [n.split(":", 1)[1] for n in mine.obs_names] == list(disk.obs_names)
    assert (mine.X != disk.X).nnz == 0
    cells = pd.read_csv(folder / "cells.tsv.gz", sep="\t")
    cells = cells[cells["sample"] == "injury_msc_2"]
    assert mine.obs["cell_state"].astype(str).tolist() == cells["cell_state"].tolist()


@pytest.fixture(scope="module")
def catalogue_and_signatures(repo_root):
    from livermsc.catalogue import load_catalogue, load_signatures

    signatures = load_signatures(repo_root / "config" / "signatures.yaml", "mouse")
    return load_catalogue(repo_root / "seeds" / "claims.yaml", signatures), signatures


def test_power_scenario_plants_claimed_rows_and_marks_overlaps(catalogue_and_signatures):
    catalogue, signatures = catalogue_and_signatures
    truth = row_truth(catalogue, scenario_params(SCENARIOS["power_2sd_3v3"]), signatures)
    t = truth.set_index(["claim_id", "contrast"])
    assert t.loc[("hsc_activation_down", "injury_msc vs injury"), "planted"] == -2.0
    assert t.loc[("macrophage_m2_up", "injury_msc vs injury"), "planted"] == 2.0
    # EVs inherit nothing from MSCs: the EV rows are nulls, EV vs MSC carries the difference
    assert t.loc[("hsc_activation_down", "injury_ev vs injury"), "truth"] == "no_effect"
    assert t.loc[("ev_vs_msc_hsc_activation_down", "injury_ev vs injury_msc"), "planted"] == 2.0
    # the positive controls are planted in every scenario
    assert t.loc[("ctl_injury_hsc_activation_up", "injury vs healthy"), "planted"] == 4.0
    # a signature sharing genes with a planted one (collagens) is neither null nor planted
    assert t.loc[("hsc_collagen_down", "injury_msc vs injury"), "truth"] == "overlap"
    assert t.loc[("hsc_collagen_down", "injury_ev vs injury"), "truth"] == "no_effect"
    rare = row_truth(catalogue, scenario_params(SCENARIOS["d_share_rare"]), signatures)
    assert set(rare.loc[rare["claim_id"].str.contains("share"), "truth"]) == {"no_effect"}


def test_every_scenario_validates():
    for name, scenario in SCENARIOS.items():
        params = scenario_params(scenario)
        assert set(params["arms"]) == {"healthy", "injury", "injury_msc", "injury_ev"}, name
        if not scenario.study_file:
            assert params["animals_per_arm"] == scenario.animals_per_arm, name


def _runs(verdicts: list[str], q: list[float], claim: str, seeds: list[int]) -> pd.DataFrame:
    return pd.DataFrame({"claim_id": claim, "contrast": "injury_msc vs injury",
                         "kind": "claim", "direction": "down", "population": "hsc",
                         "measure_type": "signature", "verdict": verdicts, "q_value": q,
                         "p_value": q, "hedges_g": -1.0, "flag": "", "seed": seeds,
                         "scenario": "a_population_size"})


def test_summarise_counts_tested_rows_only():
    """FPR over rows with a q-value; power over planted rows; Clopper-Pearson intervals."""
    from scipy.stats import binomtest

    truth = pd.DataFrame({"claim_id": ["hsc_activation_down", "hsc_quiescence_up"],
                          "contrast": "injury_msc vs injury", "planted": [-2.0, 0.0],
                          "truth": ["effect", "no_effect"]})
    runs = pd.concat([
        _runs(["supported", "supported", "inconclusive", "no_effect"], [0.01, 0.02, 0.3, 0.6],
              "hsc_activation_down", [0, 1, 2, 3]),
        _runs(["contradicted", "inconclusive", "inconclusive", "no_effect"],
              [0.01, np.nan, 0.5, 0.9], "hsc_quiescence_up", [0, 1, 2, 3])], ignore_index=True)
    runs.loc[1, "flag"] = "failed control: ctl"  # a flagged 'supported' is not power
    table = summarise(runs, {"a_population_size": truth}).set_index("rows")
    trap = table.loc["trap rows"]
    assert trap["n_tested"] == 3 and trap["n_hits"] == 1
    ci = binomtest(1, 3).proportion_ci(method="exact")
    assert trap["ci_low"] == pytest.approx(ci.low) and trap["ci_high"] == pytest.approx(ci.high)
    power = table.loc["planted controls"]
    assert power["measure"] == "power" and power["n_tested"] == 4 and power["n_hits"] == 1
    rates = row_rates(runs, truth).set_index("claim_id")
    assert rates.loc["hsc_quiescence_up", "n_tested"] == 3
    assert rates.loc["hsc_activation_down", "no_effect"] == 0.25


@pytest.fixture(scope="module")
def demo_calibration(repo_root, tmp_path_factory):
    """The demo design (config/studies/demo.yaml) simulated 16 times, scored and judged against
    the real catalogue on truth labels (about a minute on 2 cores)."""
    import os

    from livermsc.config import load_yaml, validate

    cwd = os.getcwd()
    os.chdir(repo_root)
    try:
        cfg = validate(load_yaml("config/config.yaml"), "config", "config/config.yaml")
        res = calibrate(tmp_path_factory.mktemp("cal_demo"), cfg, scenarios=["demo"],
                        n_studies=16, seed=500, workers=2)
    finally:
        os.chdir(cwd)
    return res


def test_demo_verdict_rates(demo_calibration):
    """Verdict rates over 16 simulated copies of the demo (not one seed), planted and unplanted
    rows alike."""
    table = demo_calibration["table"].set_index(["measure", "rows"])
    rows = demo_calibration["rows"].set_index(["claim_id", "contrast"])
    fpr = table.loc[("false_positive_rate", "all null rows")]
    assert fpr["n_tested"] >= 16 * 10
    assert fpr["rate"] <= 0.05
    # the planted nulls are (almost) never called
    for claim in ("dc_maturation_down", "lsec_angiogenesis_up"):
        r = rows.loc[(claim, "injury_msc vs injury")]
        assert r["truth"] == "no_effect" and r["supported"] + r["contradicted"] <= 1 / 16
    # planted opposite to the claim: never supported
    r = rows.loc[("hepatocyte_proliferation_up", "injury_msc vs injury")]
    assert r["planted"] < 0 and r["supported"] == 0
    # planted effects go the planted way when they are called
    planted = demo_calibration["rows"]
    planted = planted[planted["truth"] == "effect"]
    wrong = np.where(np.sign(planted["planted"]) == np.where(planted["direction"] == "up", 1, -1),
                     planted["contradicted"], planted["supported"])
    assert wrong.max() <= 1 / 16
    power = table.loc[("power", "planted effects")]
    assert power["rate"] >= 0.3
    # positive controls (3 SD; momac 1.5x): most are supported in every copy of the demo
    runs = demo_calibration["runs"]
    controls = runs[runs["kind"] == "control"].groupby("seed")["verdict"]
    assert controls.apply(lambda v: (v == "supported").sum()).min() >= 2
    assert (runs.loc[runs["kind"] == "control", "verdict"] == "supported").mean() >= 0.6


def test_quick_calibration_from_the_command_line(tmp_path, repo_root, monkeypatch):
    """Two scenarios, one of them through real QC -> PCA -> Leiden -> annotation."""
    from livermsc.cli import main

    monkeypatch.chdir(repo_root)
    out = tmp_path / "cal"
    assert main(["calibrate", "--quick", "--scenarios", "e_batch_is_arm,pipeline_null",
                 "--n-studies", "1", "--pipeline-studies", "1", "--workers", "2", "--seed", "7",
                 "--out", str(out)]) == 0
    for name in ("calibration.tsv", "calibration_rows.tsv", "calibration_runs.tsv",
                 "calibration.md"):
        assert (out / name).is_file()
    table = pd.read_csv(out / "calibration.tsv", sep="\t")
    assert set(table["scenario"]) == {"e_batch_is_arm", "pipeline_null"}
    pipe = table[(table["scenario"] == "pipeline_null") & (table["rows"] == "all null rows")]
    assert pipe["path"].iloc[0] == "pipeline"
    # annotation found the populations: most catalogue rows of the simulated arms were tested
    assert pipe["n_rows"].iloc[0] >= 30
    assert (out / "calibration.md").read_text().startswith("# Calibration of the claim verdicts")


def test_calibrate_rejects_bad_arguments(tmp_path, capsys, repo_root, monkeypatch):
    from livermsc.cli import main

    monkeypatch.chdir(repo_root)
    assert main(["calibrate", "--n-studies", "0", "--out", str(tmp_path)]) == 2
    assert "--n-studies" in capsys.readouterr().err
    assert main(["calibrate", "--scenarios", "nope", "--out", str(tmp_path)]) == 2
    assert "--scenarios" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["calibrate", "--n-studies", "3"])  # --out is required

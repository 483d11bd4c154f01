"""Calibration: the in-memory simulation, the rate bookkeeping and a small end-to-end run."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scanpy as sc
from livermsc.calibrate import calibration_design, overall, simulate_adata, summarise


def test_in_memory_simulation_equals_written_study(sim_study, repo_root):
    """Same parameters, signatures and seed: the counts simulate_study wrote to disk."""
    from conftest import demo_params
    from livermsc.config import validate
    from livermsc.score import load_signatures

    folder, truth = sim_study
    params = validate(demo_params(n_cells=4000), "simulate", "demo.yaml")
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


def test_design_plants_effects_and_nulls():
    params, catalogue, truth = calibration_design(effect_size=1.5, share_size=3.0)
    assert set(params["arms"]) == {"control", "treated", "sham"}
    sizes = {e["id"]: e["size"] for e in params["effects"]}
    assert sizes["hsc_activation_in_hsc"] == 1.5 and sizes["m1_macrophage_in_macrophage"] == -1.5
    assert len(catalogue["claims"]) == 9
    assert (truth.loc[truth["contrast"] == "sham vs control", "planted"] == 0).all()
    assert (truth["planted"] != 0).sum() == 6


def test_summarise_counts_power_and_false_positives():
    truth = pd.DataFrame({"claim_id": ["a", "b"], "contrast": ["t vs c", "t vs c"],
                          "planted": [1.5, 0.0], "effect_kind": ["programme", "programme"]})
    verdicts = ["supported", "supported", "inconclusive", "contradicted",
                "inconclusive", "inconclusive", "supported", "inconclusive"]
    runs = pd.DataFrame({"claim_id": ["a"] * 4 + ["b"] * 4, "contrast": "t vs c",
                         "method": "m", "verdict": verdicts,
                         "p_value": [0.001, 0.01, 0.2, 0.01, 0.3, np.nan, 0.01, 0.5],
                         "hedges_g": [3.0, 2.0, 1.0, -2.0, 0.1, np.nan, 2.0, -0.1]})
    s = summarise(runs, truth, "m").set_index("claim_id")
    assert s.loc["a", "measure"] == "power" and s.loc["a", "rate"] == 0.5
    assert s.loc["a", "contradicted"] == 0.25
    assert s.loc["b", "measure"] == "false_positive_rate" and s.loc["b", "rate"] == 0.25
    assert s.loc["b", "n_tested"] == 3 and s.loc["b", "p_below_alpha"] == 0.25
    tot = overall(s.reset_index()).iloc[0]
    assert tot["programme_power_mean"] == 0.5 and tot["null_fpr"] == 0.25


def test_small_calibration_run_from_the_command_line(tmp_path, repo_root, monkeypatch):
    from livermsc.cli import main

    monkeypatch.chdir(repo_root)
    out = tmp_path / "cal"
    assert main(["calibrate", "--n-studies", "12", "--workers", "1", "--seed", "100",
                 "--out", str(out)]) == 0
    for name in ("calibration.tsv", "calibration_overall.tsv", "calibration_runs.tsv",
                 "calibration.md"):
        assert (out / name).is_file()
    runs = pd.read_csv(out / "calibration_runs.tsv", sep="\t")
    assert runs["seed"].nunique() == 12
    tot = pd.read_csv(out / "calibration_overall.tsv", sep="\t").set_index("method")
    # 1.5 SD programme effects at 3 vs 3 animals are found most of the time, nulls rarely
    assert tot.loc["pseudobulk_z", "programme_power_mean"] >= 0.6
    assert tot.loc["pseudobulk_z", "null_fpr"] <= 0.1
    assert tot.loc["pseudobulk_z", "n_null_tests"] == 12 * 9
    text = (out / "calibration.md").read_text()
    assert text.startswith("# Calibration of the claim verdicts")


def test_calibrate_rejects_bad_arguments(tmp_path, capsys, repo_root, monkeypatch):
    from livermsc.cli import main

    monkeypatch.chdir(repo_root)
    assert main(["calibrate", "--n-studies", "0", "--out", str(tmp_path)]) == 2
    assert "--n-studies" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["calibrate", "--n-studies", "3"])  # --out is required

"""The simulator is deterministic and plants what its truth file says."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from livermsc.simulate import arm_levels, design, parse_effects


def test_arm_levels_inherit_parent_effects():
    params = {"arms": {"healthy": None, "injury": "healthy", "injury_msc": "injury"},
              "effects": [
                  {"id": "a", "kind": "program", "population": "hsc", "program": "x",
                   "contrast": ["injury", "healthy"], "size": 4.0},
                  {"id": "b", "kind": "program", "population": "hsc", "program": "x",
                   "contrast": ["injury_msc", "injury"], "size": -3.0}]}
    levels = arm_levels(params["arms"], parse_effects(params))
    assert levels["healthy"] == {"a": 0.0, "b": 0.0}
    assert levels["injury"] == {"a": 4.0, "b": 0.0}
    assert levels["injury_msc"] == {"a": 4.0, "b": -3.0}


def test_effect_contrast_must_follow_arm_tree():
    params = {"arms": {"healthy": None, "injury": "healthy", "injury_msc": "injury"},
              "effects": [{"id": "a", "kind": "program", "population": "hsc", "program": "x",
                           "contrast": ["injury_msc", "healthy"], "size": 1.0}]}
    with pytest.raises(ValueError, match="parent arm"):
        parse_effects(params)


def test_design_alternates_batches():
    sheet = design({"arms": {"a": None, "b": "a"}, "animals_per_arm": 3, "n_batches": 2})
    assert sheet["sample"].tolist() == ["a_1", "a_2", "a_3", "b_1", "b_2", "b_3"]
    assert sheet["batch"].tolist() == ["batch1", "batch2", "batch1"] * 2


def test_planted_programme_effect_is_visible(sim_adata, sim_study):
    """Mean log-CPM of HSC-activation genes in HSCs: injury well above healthy, MSC below injury."""
    _, truth = sim_study
    genes = truth["signature_genes"]["hsc_activation"]
    a = sim_adata[(sim_adata.obs["cell_state"] == "hsc") & ~sim_adata.obs["is_doublet"]
                  & ~sim_adata.obs["is_low_quality"]]
    X = a[:, genes].X.toarray().sum(axis=1) / np.asarray(a.X.sum(axis=1)).ravel()
    per_sample = pd.Series(np.log(X), index=a.obs_names).groupby(a.obs["sample"].to_numpy()).mean()
    arm = per_sample.index.str.rsplit("_", n=1).str[0]
    by_arm = per_sample.groupby(arm).mean()
    assert by_arm["injury"] - by_arm["healthy"] > 0.5
    assert by_arm["injury_msc"] < by_arm["injury"] - 0.3


def test_truth_flags_and_determinism(sim_study, tmp_path):
    from conftest import REPO, demo_params
    from livermsc.config import validate
    from livermsc.simulate import simulate_study

    folder, truth = sim_study
    cells = pd.read_csv(folder / "cells.tsv.gz", sep="\t")
    assert 0.03 < cells["is_doublet"].mean() < 0.09
    assert 0.03 < cells["is_low_quality"].mean() < 0.08
    params = validate(demo_params(n_cells=4000), "simulate", "demo.yaml")
    again = simulate_study(params, "mouse", REPO / "config" / "signatures.yaml", tmp_path, seed=1)
    assert again["n_cells"] == truth["n_cells"]
    a = (folder / "healthy_1" / "matrix.mtx.gz").read_bytes()
    b = (tmp_path / "healthy_1" / "matrix.mtx.gz").read_bytes()
    import gzip
    assert gzip.decompress(a) == gzip.decompress(b)

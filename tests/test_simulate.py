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
    """Mean log expression of HSC-activation genes in HSCs: injury above healthy, MSC below injury,
    by about the planted score-level SDs (3 and 2.5 x the signature's score SD)."""
    _, truth = sim_study
    genes = truth["signature_genes"]["hsc_activation"]
    unit = truth["score_sd"]["hsc_activation"]
    a = sim_adata[(sim_adata.obs["cell_state"] == "hsc") & ~sim_adata.obs["is_doublet"]
                  & ~sim_adata.obs["is_low_quality"]]
    X = a[:, genes].X.toarray().sum(axis=1) / np.asarray(a.X.sum(axis=1)).ravel()
    per_sample = pd.Series(np.log(X), index=a.obs_names).groupby(a.obs["sample"].to_numpy()).mean()
    arm = per_sample.index.str.rsplit("_", n=1).str[0]
    by_arm = per_sample.groupby(arm).mean()
    assert by_arm["injury"] - by_arm["healthy"] > 1.5 * unit
    assert by_arm["injury_msc"] < by_arm["injury"] - 1.0 * unit


def _genome(**params):
    from conftest import PLANTED_SIGNATURES
    from livermsc.simulate import _Genome

    return _Genome(PLANTED_SIGNATURES, 300, np.random.default_rng(0), params)


def test_programme_correlation_sets_the_score_level_sd():
    """Animal effects: every gene at animal_sd, a signature's mean at the score-level SD."""
    genome = _genome(programme_correlation=0.5)
    rng = np.random.default_rng(1)
    draws = np.stack([genome.animal_effect(0.2, rng) for _ in range(3000)])
    idx = genome.signatures["hsc_quiescence"]  # genes in no other signature
    assert np.allclose(draws[:, idx].std(axis=0), 0.2, rtol=0.1)
    score = draws[:, idx].mean(axis=1)
    assert score.std() == pytest.approx(genome.score_sd("hsc_quiescence", 0.2), rel=0.08)
    assert genome.score_sd("hsc_quiescence", 0.2) == pytest.approx(0.2 * np.sqrt(0.5 + 0.5 / 9))
    r = np.corrcoef(draws[:, idx[0]], draws[:, idx[1]])[0, 1]
    assert r == pytest.approx(0.5, abs=0.06)
    independent = _genome(programme_correlation=0.0)
    draws = np.stack([independent.animal_effect(0.2, rng) for _ in range(3000)])
    assert draws[:, idx].mean(axis=1).std() == pytest.approx(0.2 / 3, rel=0.08)


def test_signature_genes_at_fixed_umis_per_cell():
    genome = _genome(signature_umi={"hsc_activation": [0.05, 0.2]})
    w = genome.profile("hsc", None)
    p = np.exp(w - w.max())
    p /= p.sum()
    umi = p[genome.signatures["hsc_activation"]] * np.exp(7.9)  # hsc log library size
    assert umi.min() == pytest.approx(0.05, rel=0.01) and umi.max() == pytest.approx(0.2, rel=0.01)
    # other populations keep their own (silent) level of these genes
    assert genome.profile("lsec", None)[genome.signatures["hsc_activation"]].max() < w.max() - 5


def _trap_study(**overrides) -> tuple:
    from conftest import PLANTED_SIGNATURES
    from livermsc.config import validate
    from livermsc.simulate import iter_samples

    params = validate({"n_cells": 3000, "arms": {"a": None, "b": "a"}, "animals_per_arm": 2,
                       "n_background_genes": 200, **overrides}, "simulate", "test")
    genes, _, _, samples = iter_samples(params, PLANTED_SIGNATURES, seed=3)
    return genes, list(samples)


def test_population_scale_and_rare_states():
    _, samples = _trap_study(population_scale={"b": {"hsc": 0.2}}, state_baseline={"treg": 0.015})
    hsc = {s.row.sample: int((s.obs["cell_type"] == "hsc").sum()) for s in samples}
    assert hsc["a_1"] + hsc["a_2"] > 3 * (hsc["b_1"] + hsc["b_2"])  # factor 0.2: about 5x
    cd4 = pd.concat([s.obs for s in samples])
    cd4 = cd4[cd4["cell_type"] == "cd4_t"]
    assert (cd4["cell_state"] == "treg").mean() < 0.05


def test_background_programme_takes_its_share_in_one_arm():
    genes, samples = _trap_study(background_programme=[
        {"arm": "b", "population": "hsc", "share": 0.10, "n_genes": 50}])
    first = [i for i, g in enumerate(genes) if g.startswith("Gm")][:50]
    for s in samples:
        X = s.X[(s.obs["cell_type"] == "hsc").to_numpy() & ~s.obs["is_doublet"].to_numpy()
                & ~s.obs["is_low_quality"].to_numpy()]
        share = X[:, first].sum() / X.sum()
        if s.row.arm == "b":
            assert 0.08 < share < 0.12
        else:
            assert share < 0.03


def test_batch_by_arm_and_trap_checks():
    sheet = design({"arms": {"a": None, "b": "a"}, "animals_per_arm": 3, "batch_by_arm": True})
    assert sheet.groupby("arm")["batch"].nunique().eq(1).all()
    assert sheet["batch"].nunique() == 2
    base = {"arms": {"a": None, "b": "a"}, "effects": []}
    with pytest.raises(ValueError, match="population_scale"):
        parse_effects({**base, "population_scale": {"b": {"treg": 2.0}}})
    with pytest.raises(ValueError, match="arm_sd"):
        parse_effects({**base, "arm_sd": {"c": 2.0}})
    with pytest.raises(ValueError, match="state_baseline"):
        parse_effects({**base, "state_baseline": {"hsc": 0.1}})


def test_truth_flags_and_determinism(sim_study, tmp_path):
    from conftest import REPO, SIM_STUDY, demo_params
    from livermsc.config import validate
    from livermsc.simulate import simulate_study

    folder, truth = sim_study
    cells = pd.read_csv(folder / "cells.tsv.gz", sep="\t")
    assert 0.03 < cells["is_doublet"].mean() < 0.09
    assert 0.03 < cells["is_low_quality"].mean() < 0.08
    params = validate(demo_params(**SIM_STUDY), "simulate", "demo.yaml")
    again = simulate_study(params, "mouse", REPO / "config" / "signatures.yaml", tmp_path, seed=1)
    assert again["n_cells"] == truth["n_cells"]
    a = (folder / "healthy_1" / "matrix.mtx.gz").read_bytes()
    b = (tmp_path / "healthy_1" / "matrix.mtx.gz").read_bytes()
    import gzip
    assert gzip.decompress(a) == gzip.decompress(b)

"""Shared fixtures: repository paths, the real test data and a small simulated study."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

#: the mouse genes the demo simulator plants effects on, frozen here: tests that simulate with
#: them do not change when config/signatures.yaml grows, and those genes must stay in the file
PLANTED_SIGNATURES = {
    "hsc_activation": ["Acta2", "Col1a1", "Col1a2", "Col3a1", "Timp1", "Tagln", "Sparc", "Vim",
                       "Pdgfrb", "Csrp2", "Lum", "Thy1", "Thbs2", "Myl9"],
    "hsc_quiescence": ["Lrat", "Rbp1", "Colec10", "Rspo3", "Lama1", "Bmp10", "Reln", "Ngfr", "Hgf"],
    "m1_macrophage": ["Cd38", "Gpr18", "Fpr2", "Socs3", "Nos2", "Il12b", "Ptgs2", "Il23a", "Ido1",
                      "Il1b", "Tnf", "Cxcl10"],
    "m2_macrophage": ["Egr2", "Myc", "Retnla", "Socs2", "Irf4", "Chil3", "Cxcl13", "Ccl12",
                      "Ccl24", "Klf4", "Mrc1", "Cd163"],
    "treg_identity": ["Foxp3", "Il2ra", "Ctla4", "Ikzf2", "Tnfrsf18", "Nrp1", "Entpd1", "Tigit",
                      "Il10"],
    "hepatocyte_proliferation": ["Mki67", "Top2a", "Pcna", "Mcm2", "Mcm5", "Mcm6", "Ccnb2", "Cdk1",
                                 "Birc5", "Tyms", "Rrm2", "Ube2c", "Cenpf", "Aurkb", "Ccne2"],
    "dc_maturation": ["Cd80", "Cd86", "Cd40", "Ccr7", "Cd83", "Lamp3", "Ccl19", "Ccl22", "Fscn1",
                      "Il12b"],
    "angiogenesis": ["Vegfa", "Kdr", "Flt1", "Esm1", "Apln", "Angpt2", "Dll4", "Pecam1", "Cd34",
                     "Kit"],
}


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root."""
    return REPO


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Folder of real scRNA-seq test data (skips where absent, e.g. a user's fresh clone)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA}")
    return SHARED_DATA


#: the small simulated study of the ``sim_study`` fixture: the demo design, 3 animals per arm
SIM_STUDY = {"n_cells": 4000, "animals_per_arm": 3}


def demo_params(**overrides) -> dict:
    """The demo study's simulation parameters, with overrides."""
    spec = yaml.safe_load((REPO / "config" / "studies" / "demo.yaml").read_text())
    params = dict(spec["simulate"])
    params.update(overrides)
    return params


@pytest.fixture(scope="session")
def sim_study(tmp_path_factory) -> tuple[Path, dict]:
    """A small simulated demo study (about 4000 cells, 3 animals per arm): (folder, truth)."""
    from livermsc.config import validate
    from livermsc.simulate import simulate_study

    out = tmp_path_factory.mktemp("sim_study")
    params = validate(demo_params(**SIM_STUDY), "simulate", "demo.yaml")
    truth = simulate_study(params, "mouse", REPO / "config" / "signatures.yaml", out, seed=1)
    return out, truth


@pytest.fixture(scope="session")
def sim_adata(sim_study):
    """The small simulated study as one AnnData (counts in X and layers['counts']), truth in obs.

    Built with scanpy's reader only, so that stages can be tested independently of ingest.
    """
    import anndata as ad
    import pandas as pd
    import scanpy as sc

    folder, _ = sim_study
    cells = pd.read_csv(folder / "cells.tsv.gz", sep="\t")
    sheet = pd.read_csv(folder / "samples.tsv", sep="\t")
    parts = []
    for row in sheet.itertuples():
        a = sc.read_10x_mtx(folder / row.path)
        a.obs_names = [f"{row.sample}:{bc}" for bc in a.obs_names]
        parts.append(a)
    adata = ad.concat(parts)
    cells.index = cells["sample"] + ":" + cells["barcode"]
    adata.obs = cells.loc[adata.obs_names].drop(columns=["barcode"])
    adata.obs["animal"] = adata.obs["sample"]
    adata.obs["batch"] = adata.obs["sample"].map(sheet.set_index("sample")["batch"])
    adata.obs["study"] = "sim"
    for col in ["sample", "arm", "animal", "batch", "study", "cell_type", "cell_state"]:
        adata.obs[col] = adata.obs[col].astype("category")
    adata.layers["counts"] = adata.X.copy()
    return adata

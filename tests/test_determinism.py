"""Same config and seed: identical tables and cell-type calls; another seed on the same counts
changes only what randomness drives.

Runs of the tiny study (tests/tiny/), shared with the other workflow-level tests
(tests/_tiny.py): the reference run (seed 0); the kill-and-resume run of test_resume.py, a second
seed-0 run whose every stage ran in fresh processes; and a seed-1 run on the reference run's
simulated counts (as a local study, so the data stay the same and only the seed changes), run
up to the cell-type calls.

With the same counts, the seed drives doublet scores (Scrublet), scVI (latent space and model),
Leiden clusters, UMAP, scanpy score_genes control genes and the cell subset of the integration
metrics. It does not touch ingest, the QC metrics and thresholds or the cells removed by them.
(For the demo study the seed also drives the simulation.)
"""

from __future__ import annotations

import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import yaml
from _tiny import (
    STUDY,
    base_run,
    cell_calls,
    differing_tables,
    read_table,
    resumed_run,
    run_workflow,
    shared_run,
)

pytestmark = pytest.mark.slow

#: QC columns that no random step touches (per sample): cells in, removals by each fixed or
#: MAD rule, and the thresholds themselves; doublet columns (Scrublet) may differ
QC_FIXED = ["sample", "n_cells_in", "n_fail_counts", "n_fail_genes", "n_fail_top20",
            "n_fail_mt_mad", "n_fail_mt_cap", "n_fail_min_genes", "counts_low", "counts_high",
            "genes_low", "genes_high", "mt_threshold"]


@pytest.fixture(scope="session")
def seed0(tmp_path_factory) -> Path:
    return base_run(tmp_path_factory)


@pytest.fixture(scope="session")
def seed0_again(tmp_path_factory) -> Path:
    return resumed_run(tmp_path_factory)


@pytest.fixture(scope="session")
def seed1(tmp_path_factory, seed0) -> Path:
    """Seed 1 on the reference run's simulated counts, read as a local study."""
    def build(work: Path) -> None:
        data = work / "resources" / STUDY
        shutil.copytree(seed0 / "resources" / STUDY / "simulated", data)
        studies = work / "config" / "studies"
        spec = yaml.safe_load((studies / f"{STUDY}.yaml").read_text())
        for key in ("simulate", "source"):
            spec.pop(key)
        spec.update(source="local", sample_sheet=f"{STUDY}_samples.tsv")
        (studies / f"{STUDY}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        shutil.copy(data / "samples.tsv", studies / f"{STUDY}_samples.tsv")
        # up to the cell-type calls: what follows (scores, claims) is seed-free given them
        run_workflow(work, f"results/{STUDY}/annotated.h5ad",
                     f"results/{STUDY}/qc/qc_summary.tsv", "--config", "seed=1")

    return shared_run("seed1_same_counts", tmp_path_factory.getbasetemp() / "tiny_runs", build)


def test_same_seed_same_claims_tables_and_cell_types(seed0, seed0_again):
    assert differing_tables(seed0, seed0_again) == []
    assert cell_calls(seed0).equals(cell_calls(seed0_again))
    claims = read_table(seed0, f"results/{STUDY}/claims.tsv")
    assert len(claims) > 10 and (claims["p_value"] != "NA").any()  # something was tested


def _obsm(work: Path, key: str) -> np.ndarray:
    adata = ad.read_h5ad(work / f"results/{STUDY}/annotated.h5ad")
    return adata[sorted(adata.obs_names)].obsm[key]


def test_other_seed_changes_only_what_randomness_drives(seed0, seed1):
    for sample in read_table(seed0, f"results/{STUDY}/qc/qc_summary.tsv")["sample"]:
        a = ad.read_h5ad(seed0 / f"results/{STUDY}/raw/{sample}.h5ad")
        b = ad.read_h5ad(seed1 / f"results/{STUDY}/raw/{sample}.h5ad")
        same = (a.layers["counts"] != b.layers["counts"]).nnz == 0
        assert (a.obs_names == b.obs_names).all() and same, sample
    qc0, qc1 = (read_table(w, f"results/{STUDY}/qc/qc_summary.tsv") for w in (seed0, seed1))
    pd.testing.assert_frame_equal(qc0[QC_FIXED], qc1[QC_FIXED])
    # a random step: the scVI latent space differs
    assert not np.allclose(_obsm(seed0, "X_scVI")[:50], _obsm(seed1, "X_scVI")[:50])
    # the biology does not: most cells keep their cell type
    calls0, calls1 = cell_calls(seed0), cell_calls(seed1)
    common = calls0.index.intersection(calls1.index)
    assert len(common) >= 0.9 * len(calls0)
    agree = (calls0.loc[common, "cell_type"] == calls1.loc[common, "cell_type"]).mean()
    assert agree >= 0.9, f"only {agree:.0%} of cells keep their cell type with another seed"

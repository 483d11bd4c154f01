"""Edge-case studies run to the end through Snakemake, with clear log lines and no traceback.

Three small studies cut from the simulated demo study (conftest ``sim_adata``; 6 samples,
healthy vs injury, 3 vs 3), each a ``source: local`` study file in tests/edge/studies/ with one
h5ad per sample written by the test, and the run settings of tests/edge/config.yaml (scVI 3
epochs): tiny batches (25-40 cells per sample), one cell type (hepatocytes only), and no
mitochondrial genes. One Snakemake process runs all three; each must finish, write its claims
table and say in its logs what it could not do.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
EDGE = REPO / "tests" / "edge"
SAMPLES = [f"{arm}_{i}" for arm in ("healthy", "injury") for i in (1, 2, 3)]


def write_study(adata: ad.AnnData, out: Path) -> None:
    """One h5ad per sample of :data:`SAMPLES` (raw counts in X) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    for sample in SAMPLES:
        part = adata[adata.obs["sample"].astype(str).to_numpy() == sample]
        obs = pd.DataFrame(index=[n.split(":", 1)[-1] for n in part.obs_names])
        ad.AnnData(X=sp.csr_matrix(part.layers["counts"]).astype(np.int32), obs=obs,
                   var=pd.DataFrame(index=part.var_names)).write_h5ad(out / f"{sample}.h5ad")


def run_studies(work: Path, studies: dict[str, ad.AnnData]) -> Path:
    """Write each study in one fresh project folder and run the workflow on all of them."""
    work.mkdir(parents=True)
    for name in ("config", "seeds"):
        shutil.copytree(REPO / name, work / name)
    shutil.copytree(EDGE, work / "edge")
    for study, adata in studies.items():
        write_study(adata, work / "resources" / study)
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
           "--directory", str(work), "--cores", "2", "--configfile",
           str(work / "edge" / "config.yaml"), "--config", f"studies=[{','.join(studies)}]"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, check=False)
    print(f"\nedge studies: workflow ran in {time.perf_counter() - start:.0f} s")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return work


def logs(work: Path, study: str | None = None) -> str:
    """Every rule log of a run (of one study: the logs naming it), concatenated."""
    paths = sorted((work / "logs").rglob("*.log"))
    if study is not None:
        paths = [p for p in paths if study in p.parts or p.stem == study]
    return "\n".join(p.read_text(errors="replace") for p in paths)


def subset(sim_adata: ad.AnnData, mask: np.ndarray, per_sample: int | None, seed: int = 0
           ) -> ad.AnnData:
    """Cells of ``mask`` in :data:`SAMPLES`, at most ``per_sample`` (random, seeded) each."""
    rng = np.random.default_rng(seed)
    obs = sim_adata.obs
    keep = []
    for i, sample in enumerate(SAMPLES):
        rows = np.flatnonzero(mask & (obs["sample"].astype(str) == sample).to_numpy())
        n = rows.size if per_sample is None else min(per_sample + 3 * i, rows.size)
        keep.extend(rng.choice(rows, size=n, replace=False))
    return sim_adata[np.sort(np.asarray(keep))].copy()


def assert_finished(work: Path, study: str) -> pd.DataFrame:
    """The run wrote its verdicts and no log holds a traceback; return the claims table."""
    claims = pd.read_csv(work / f"results/{study}/claims.tsv", sep="\t")
    assert len(claims) > 0
    assert claims["verdict"].notna().all()
    assert "Traceback" not in logs(work)
    assert (work / "results/summary.html").stat().st_size > 0
    return claims


@pytest.fixture(scope="module")
def edge_run(sim_adata, tmp_path_factory) -> Path:
    """The three edge-case studies, run together by one Snakemake process."""
    singlets = ~sim_adata.obs["is_doublet"].to_numpy(dtype=bool)
    hepatocytes = (sim_adata.obs["cell_type"].astype(str) == "hepatocyte").to_numpy()
    no_mt = subset(sim_adata, np.ones(sim_adata.n_obs, dtype=bool), per_sample=60)
    no_mt = no_mt[:, ~no_mt.var_names.str.startswith("mt-")].copy()
    studies = {"edge_tiny": subset(sim_adata, singlets, per_sample=25),
               "edge_onetype": subset(sim_adata, hepatocytes, per_sample=60),
               "edge_nomt": no_mt}
    return run_studies(tmp_path_factory.mktemp("edge") / "run", studies)


def test_tiny_batches(edge_run):
    """25-40 cells per sample: HVGs, Scrublet and the mitochondrial classes fall back, logged."""
    work = edge_run
    assert_finished(work, "edge_tiny")
    text = logs(work, "edge_tiny")
    assert "doublet detection skipped" in text
    assert "left out of the batch-aware ranking" in text or "as one batch" in text
    integrated = ad.read_h5ad(work / "results/edge_tiny/annotated.h5ad", backed="r")
    hvg = dict(integrated.uns["hvg"])
    integrated.file.close()
    assert hvg["method"] in ("seurat_v3", "seurat", "variance", "seurat_v3_batch")
    qc = pd.read_csv(work / "results/edge_tiny/qc/qc_summary.tsv", sep="\t")
    assert (qc["mt_class_by"] == "cell").all()  # too few cells for the per-sample clustering


def test_one_cell_type(edge_run):
    """Hepatocytes only: the integration metrics that compare labels say why they are absent."""
    work = edge_run
    assert_finished(work, "edge_onetype")
    metrics = pd.read_csv(work / "results/edge_onetype/integration_metrics.tsv", sep="\t")
    label = metrics[metrics["metric"] == "silhouette_label"]
    assert label["value"].isna().all() and label["note"].str.contains(">= 2 labels").all()
    assert "integration metric silhouette_label not computed" in logs(work, "edge_onetype")


def test_no_mitochondrial_genes(edge_run):
    """No mt- genes: QC says so and removes nothing for mitochondria; the run goes on."""
    work = edge_run
    assert_finished(work, "edge_nomt")
    qc = pd.read_csv(work / "results/edge_nomt/qc/qc_summary.tsv", sep="\t")
    assert (qc["n_mt_genes"] == 0).all() and (qc["n_fail_mt_mad"] == 0).all()
    assert "no mitochondrial genes" in logs(work, "edge_nomt")

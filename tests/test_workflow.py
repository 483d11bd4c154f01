"""End to end: the default workflow on the demo study reaches the planted truth.

The whole workflow runs once (module fixture) in a temporary working directory holding copies of
`config/` and `seeds/`, exactly as a user runs it in their own project folder.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

pytestmark = pytest.mark.slow


def _snakemake(repo: Path, work: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(repo / "Snakefile"),
           "--directory", str(work), "--cores", "2", *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


@pytest.fixture(scope="module")
def demo_run(repo_root, tmp_path_factory) -> Path:
    """Run the default target on the demo study; return the working directory."""
    work = tmp_path_factory.mktemp("demo_run")
    for folder in ("config", "seeds"):
        shutil.copytree(repo_root / folder, work / folder)
    proc = _snakemake(repo_root, work)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return work


def _expected_verdict(size: float, direction: str) -> str:
    if size == 0:
        return "inconclusive"
    return "supported" if (size > 0) == (direction == "up") else "contradicted"


def test_every_planted_effect_gets_its_verdict(demo_run):
    truth = yaml.safe_load((demo_run / "resources/demo/simulated/truth.yaml").read_text())
    claims = pd.read_csv(demo_run / "results/demo/claims.tsv", sep="\t")
    checked = []
    for effect in truth["effects"]:
        arm, reference = effect["contrast"]
        rows = claims[(claims["population"] == effect["population"])
                      & (claims["arm"] == arm) & (claims["reference"] == reference)
                      & claims["stage"].isna()]  # the demo has no stages
        if effect["kind"] == "program":
            rows = rows[(rows["measure_type"] == "signature") & (rows["measure"] == effect["program"])]
        else:
            rows = rows[rows["measure_type"] == "share"]
        assert len(rows) >= 1, f"no claim row tests planted effect {effect['id']}"
        for row in rows.itertuples():
            expected = _expected_verdict(effect["size"], row.direction)
            assert row.verdict == expected, (
                f"{effect['id']} -> {row.claim_id}: got {row.verdict} ({row.reason}), "
                f"expected {expected}")
            checked.append(row.claim_id)
    assert len(checked) >= len(truth["effects"])


def test_inconclusive_rows_say_why(demo_run):
    claims = pd.read_csv(demo_run / "results/demo/claims.tsv", sep="\t")
    inconclusive = claims[claims["verdict"] == "inconclusive"]
    assert inconclusive["reason"].notna().all()
    assert (inconclusive["reason"].str.len() > 10).all()
    # the demo has no injury_msc_ev arm: synergy claims cannot be tested there
    synergy = claims[claims["arm"] == "injury_msc_ev"]
    assert (synergy["verdict"] == "inconclusive").all()


def test_outputs_follow_the_data_model(demo_run):
    import anndata as ad

    adata = ad.read_h5ad(demo_run / "results/demo/annotated.h5ad", backed="r")
    assert {"X_scVI", "X_pca", "X_umap"} <= set(adata.obsm)
    assert "counts" in adata.layers
    for col in ("study", "sample", "arm", "animal", "cell_type", "cell_state"):
        assert isinstance(adata.obs[col].dtype, pd.CategoricalDtype), col
    assert (demo_run / "results/claims_meta.tsv").is_file()
    assert (demo_run / "results/summary.html").stat().st_size > 0
    for bench in ("simulate", "ingest", "qc", "integrate", "claims"):
        assert any((demo_run / "benchmarks" / bench).iterdir()), bench


def test_report_holds_every_figure(demo_run):
    proc = _snakemake(Path(__file__).resolve().parents[1], demo_run,
                      "--report", "results/report.html")
    assert proc.returncode == 0, proc.stderr[-4000:]
    html = (demo_run / "results/report.html").read_text(errors="replace")
    figures = sorted((demo_run / "results/report").rglob("*.png"))
    assert figures, "the report stage made no figures"
    missing = [f.name for f in figures if f.name not in html]
    assert not missing, f"figures not in the report: {missing}"


def test_single_study_meta_keeps_the_study_verdict(demo_run):
    claims = pd.read_csv(demo_run / "results/demo/claims.tsv", sep="\t")
    meta = pd.read_csv(demo_run / "results/claims_meta.tsv", sep="\t")
    both = claims.merge(meta[meta["k"] == 1], on=["claim_id", "contrast"], suffixes=("", "_meta"))
    assert len(both) > 10
    assert (both["verdict"] == both["verdict_meta"]).all()

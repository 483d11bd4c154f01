"""Workflow runs of the tiny test study (tests/tiny/), shared by several test files.

Each run happens in its own project folder (copies of `config/`, `seeds/` and the tiny study
file) with `--configfile tests/tiny/config.yaml`, and at most once per test session: the runs are
cached in this module, which Python imports once however many test files use it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import anndata as ad
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "tiny"
CONFIGFILE = TINY / "config.yaml"
STUDY = "tiny"

#: final tables compared between runs, relative to the project folder
TABLES = [f"results/{STUDY}/claims.tsv", f"results/{STUDY}/claims_methods.tsv",
          "results/claims_meta.tsv", f"results/{STUDY}/scores/sample_scores.tsv",
          f"results/{STUDY}/scores/signature_coverage.tsv",
          f"results/{STUDY}/annotation/clusters.tsv", f"results/{STUDY}/qc/qc_summary.tsv",
          f"results/{STUDY}/integration_metrics.tsv", "results/report/verdicts.tsv"]

_RUNS: dict[str, Path] = {}


def make_project(folder: Path) -> Path:
    """A project folder holding copies of config/, seeds/ and the tiny study file."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("config", "seeds"):
        shutil.copytree(REPO / name, folder / name, dirs_exist_ok=True)
    shutil.copy(TINY / "tiny.yaml", folder / "config" / "studies" / "tiny.yaml")
    return folder


def snakemake_cmd(work: Path, *args: str, cores: int | None = 2) -> list[str]:
    """The snakemake command line of the tiny study in ``work`` (``args`` may hold targets:
    they come before ``--configfile``, which would take them as more config files); no
    ``--cores`` when ``cores`` is None (an executor profile sets the jobs)."""
    return [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
            "--directory", str(work), *(["--cores", str(cores)] if cores else []), *args,
            "--configfile", str(CONFIGFILE)]


def run_workflow(work: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run the tiny study to its default target in ``work``; fail with the log tail if it fails."""
    proc = subprocess.run(snakemake_cmd(work, *args), capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def shared_run(name: str, root: Path, build: Callable[[Path], None]) -> Path:
    """The project folder of run ``name``, built by ``build(folder)`` once per session."""
    if name not in _RUNS:
        folder = make_project(root / name)
        build(folder)
        _RUNS[name] = folder
    return _RUNS[name]


def base_run(tmp_path_factory) -> Path:
    """The uninterrupted reference run of the tiny study (seed 0)."""
    root = tmp_path_factory.getbasetemp() / "tiny_runs"
    return shared_run("seed0", root, lambda work: run_workflow(work))


def read_table(work: Path, rel: str) -> pd.DataFrame:
    """One final table of a run, every column as text (compared exactly)."""
    return pd.read_csv(work / rel, sep="\t", dtype=str, keep_default_na=False)


def cell_calls(work: Path) -> pd.DataFrame:
    """Cell-type and cell-state call of every cell of the annotated study."""
    adata = ad.read_h5ad(work / f"results/{STUDY}/annotated.h5ad", backed="r")
    calls = adata.obs[["cell_type", "cell_state"]].astype(str)
    adata.file.close()
    return calls


def differing_tables(a: Path, b: Path, tables: list[str] = TABLES) -> list[str]:
    """Tables of ``tables`` whose contents differ between runs ``a`` and ``b``."""
    return [rel for rel in tables if not read_table(a, rel).equals(read_table(b, rel))]


def job_counts(snakemake_output: str) -> dict[str, int]:
    """The "Job stats" table Snakemake prints before running: rule -> number of jobs."""
    counts: dict[str, int] = {}
    lines = snakemake_output.splitlines()
    if "Job stats:" not in lines:
        return counts
    for line in lines[lines.index("Job stats:") + 3:]:
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit() or parts[0] == "total":
            break
        counts[parts[0]] = int(parts[1])
    return counts


def kill_during(work: Path, log: str, marker: str, timeout: float = 600) -> str:
    """Start the tiny workflow in ``work``; SIGKILL its whole process group (Snakemake and its
    jobs, as when a node dies) as soon as ``marker`` appears in the rule log ``log``.

    Returns what Snakemake printed until then.
    """
    out = work / "killed_run.out"
    with out.open("w") as fh:
        proc = subprocess.Popen(snakemake_cmd(work), stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
    path, deadline = work / log, time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if path.is_file() and marker in path.read_text(errors="replace"):
                break
            time.sleep(0.05)
        assert proc.poll() is None, (
            f"the workflow ended (rc {proc.returncode}) before {marker!r} appeared in {log}:\n"
            + out.read_text()[-3000:])
        assert time.monotonic() < deadline, f"{marker!r} did not appear in {log} in {timeout} s"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return out.read_text()


def resumed_run(tmp_path_factory) -> Path:
    """The tiny study (seed 0) killed while scVI trains, then rerun as the README says: unlock
    the folder (a killed Snakemake leaves its lock), then rerun with the default workflow
    profile, which reruns incomplete jobs."""
    def build(work: Path) -> None:
        kill_during(work, f"logs/integrate/{STUDY}.log", "scVI on")
        run_workflow(work, "--unlock")
        done = run_workflow(work, "--workflow-profile", str(REPO / "workflow/profiles/default"))
        (work / "rerun.out").write_text(done.stdout + done.stderr)

    root = tmp_path_factory.getbasetemp() / "tiny_runs"
    return shared_run("seed0_killed_and_rerun", root, build)

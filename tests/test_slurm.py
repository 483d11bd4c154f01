"""The tiny study through a real SLURM: a one-node cluster on localhost, the slurm executor and a
profile derived from workflow/profiles/slurm; final tables equal a local run's.

Opt-in (several minutes: SLURM status polling adds ~10-20 s per sequential job):

    LIVERMSC_SLURM_TEST=1 pytest tests/test_slurm.py

Needs root and Debian's slurm-wlm and munge (`apt-get install -y slurm-wlm munge`); every
config, state and log file of the cluster lives in a temporary folder, and the daemons started
here are stopped by pid at the end (tests/slurm/cluster.py).
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from _tiny import REPO, base_run, cell_calls, differing_tables, make_project, snakemake_cmd
from slurm.cluster import PARTITION, local_cluster, missing_binaries

pytestmark = pytest.mark.slow

#: seconds before Snakemake's first squeue poll; MinJobAge (300 s) stays far above 3x this
INIT_SECONDS = 5
#: hard limit of the whole Snakemake run (it ignores SIGTERM while it waits on jobs)
RUN_LIMIT_S = 1500


def _skip_reason() -> str | None:
    if os.environ.get("LIVERMSC_SLURM_TEST") != "1":
        return "opt-in: set LIVERMSC_SLURM_TEST=1 (runs a local SLURM cluster, minutes)"
    if os.geteuid() != 0:
        return "needs root to start slurmd"
    missing = missing_binaries()
    if missing:
        return f"SLURM/munge not installed ({', '.join(missing)}): apt-get install slurm-wlm munge"
    try:
        import snakemake_executor_plugin_slurm  # noqa: F401 - only its presence is checked
    except ImportError:
        return "snakemake-executor-plugin-slurm not installed (pip install -e '.[slurm]')"
    return None


def test_profile(folder: Path) -> Path:
    """workflow/profiles/slurm with this cluster's partition, no account and squeue polling."""
    profile = yaml.safe_load((REPO / "workflow/profiles/slurm/config.v8+.yaml").read_text())
    profile["default-resources"] = {**profile["default-resources"], "slurm_partition": PARTITION}
    profile["default-resources"].pop("slurm_account", None)
    for rule in profile.get("set-resources", {}).values():
        rule["slurm_partition"] = PARTITION
    profile.update({"slurm-no-account": True, "slurm-status-command": "squeue",
                    "slurm-init-seconds-before-status-checks": INIT_SECONDS,
                    "slurm-keep-successful-logs": True, "latency-wait": 5, "retries": 0,
                    "max-threads": 2, "jobs": 8})
    out = folder / "profile"
    out.mkdir(parents=True)
    (out / "config.v8+.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    return out


test_profile.__test__ = False  # a helper, not a test


@pytest.fixture(scope="module")
def slurm_run(tmp_path_factory) -> tuple[Path, str]:
    """The tiny study run through the local cluster: (project folder, Snakemake's output)."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("slurm")
    work = make_project(root / "work")
    profile = test_profile(root)
    with local_cluster(root / "cluster", cpus=max(4, os.cpu_count() or 2)) as cluster:
        cmd = ["timeout", "-s", "KILL", str(RUN_LIMIT_S),
               *snakemake_cmd(work, "--profile", str(profile), cores=None)]
        proc = subprocess.run(cmd, env=cluster.env, capture_output=True, text=True, check=False)
        out = proc.stdout + proc.stderr
        (root / "snakemake.out").write_text(out)
        assert proc.returncode == 0, out[-6000:] + cluster.log("slurmctld")[-2000:]
        jobs = cluster.run("squeue", "-h", "-o", "%i %T").stdout
        assert jobs.strip() == "", f"jobs left in the queue: {jobs}"
    return work, out


def test_jobs_went_through_sbatch(slurm_run):
    work, out = slurm_run
    ids = re.findall(r"submitted with SLURM jobid (\d+)", out)
    assert len(ids) >= 10, out[-3000:]
    logs = list((work / "logs" / "slurm").rglob("*.log"))
    logged = {m for p in logs for m in re.findall(r"(\d+)\.log$", p.name)}
    assert set(ids) <= logged, f"no SLURM log for jobs {sorted(set(ids) - logged)}"
    assert "rule integrate:" in out and "Finished jobid" in out


def test_slurm_tables_equal_a_local_run(slurm_run, tmp_path_factory):
    work, _ = slurm_run
    local = base_run(tmp_path_factory)
    assert differing_tables(local, work) == []
    assert cell_calls(local).equals(cell_calls(work))

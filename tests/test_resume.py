"""Kill the workflow while scVI trains, rerun it: the rerun finishes and its final tables equal
an uninterrupted run's.

The tiny study (tests/tiny/) runs twice: once uninterrupted, once SIGKILLed (Snakemake and all
its jobs, as when a node dies or a job is cancelled) while the integrate rule trains scVI and
then rerun with the default workflow profile, which reruns incomplete jobs. Both runs are shared
with the other workflow-level tests (tests/_tiny.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from _tiny import base_run, cell_calls, differing_tables, job_counts, resumed_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> Path:
    return base_run(tmp_path_factory)


@pytest.fixture(scope="session")
def resumed(tmp_path_factory) -> Path:
    return resumed_run(tmp_path_factory)


def test_kill_left_scvi_incomplete(resumed):
    killed = (resumed / "killed_run.out").read_text()
    assert "rule integrate:" in killed  # ("localrule" when run without an executor)
    assert killed.count("rule qc:") == 4  # every sample's QC was done before scVI started
    assert "(100%) done" not in killed  # the run never reached its end


def test_rerun_redoes_only_the_interrupted_job_and_what_follows(resumed):
    jobs = job_counts((resumed / "rerun.out").read_text())
    assert jobs.get("integrate") == 1, jobs
    assert {"cluster", "annotate", "score", "claims", "report_summary"} <= set(jobs), jobs
    done_before = {"simulate_study", "ingest", "qc"}
    assert not done_before & set(jobs), f"finished jobs were rerun: {jobs}"


def test_rerun_gives_the_tables_of_an_uninterrupted_run(reference, resumed):
    assert differing_tables(reference, resumed) == []
    assert cell_calls(reference).equals(cell_calls(resumed))

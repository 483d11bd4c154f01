"""The benchmark harness (livermsc bench): tables from benchmark files, the markdown snippet,
argument checks, the process measurement, and one tiny end-to-end run (slow)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from livermsc import bench
from livermsc.cli import main
from livermsc.config import ConfigError, validate
from livermsc.simulate import design

HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time"
EXTENDED = "\tjobid\trule_name\twildcards\tparams\tthreads\tcpu_usage\tresources\tinput_size_mb"


def _write(path: Path, *rows: str, header: str = HEADER) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header, *rows]) + "\n")


def _row(s: float, rss: float | str, cpu: float | str) -> str:
    return f"{s}\t0:00:{int(s):02d}\t{rss}\t900.0\t200.0\t210.0\t0.00\t1.00\t50.0\t{cpu}"


@pytest.fixture()
def bench_dir(tmp_path) -> Path:
    """Fabricated benchmarks/: three qc jobs (one unsampled), one integrate job repeated
    twice, and an extended-format file whose rule name differs from its folder."""
    root = tmp_path / "benchmarks"
    _write(root / "qc/demo/a.tsv", _row(10.0, 400.0, 8.0))
    _write(root / "qc/demo/b.tsv", _row(30.0, 650.5, 25.0))
    _write(root / "qc/demo/c.tsv", "0.4\t0:00:00\tNA\tNA\tNA\tNA\tNA\tNA\tNA\tNA")
    _write(root / "integrate/demo.tsv", _row(100.0, 2000.0, 180.0), _row(120.0, 2100.0, 200.0))
    _write(root / "simulate/demo.tsv",
           _row(5.0, 300.0, 4.0) + "\t1\tsimulate_study\t{}\t{}\t1\t80.0\t{}\t{}",
           header=HEADER + EXTENDED)
    return root


def test_read_benchmark_file_keeps_missing_values_missing(bench_dir):
    table = bench.read_benchmark_file(bench_dir / "qc/demo/c.tsv")
    assert table["s"].iloc[0] == pytest.approx(0.4)
    assert np.isnan(table["max_rss"].iloc[0]) and np.isnan(table["cpu_time"].iloc[0])


@pytest.mark.parametrize("text, message", [
    ("s\th:m:s\tmax_rss\n1.0\t0:00:01\t10.0\n", r"lacks column\(s\) cpu_time"),
    (HEADER + "\n", "no row"),
    ("", "not a Snakemake benchmark table"),
])
def test_bad_benchmark_file_is_named(tmp_path, text, message):
    path = tmp_path / "x.tsv"
    path.write_text(text)
    with pytest.raises(bench.BenchError, match=message) as err:
        bench.read_benchmark_file(path)
    assert str(path) in str(err.value)


def test_jobs_and_rule_table_from_benchmark_files(bench_dir):
    jobs = bench.collect_jobs(bench_dir)
    assert len(jobs) == 5
    assert set(jobs["rule"]) == {"qc", "integrate", "simulate_study"}
    integrate = jobs[jobs["rule"] == "integrate"].iloc[0]
    assert integrate["wall_s"] == pytest.approx(110.0)  # mean of the two repeats
    assert integrate["max_rss_mb"] == pytest.approx(2050.0)

    rules = bench.rule_table(jobs).set_index("rule")
    assert list(rules.index) == ["integrate", "qc", "simulate_study"]  # by summed wall
    qc = rules.loc["qc"]
    assert qc["jobs"] == 3
    assert qc["wall_s_sum"] == pytest.approx(40.4)
    assert qc["wall_s_max"] == pytest.approx(30.0)
    assert qc["cpu_s_sum"] == pytest.approx(33.0)  # the unsampled job adds nothing
    assert qc["cpu_s_max"] == pytest.approx(25.0)
    assert qc["max_rss_mb_max"] == pytest.approx(650.5)
    assert rules.loc["simulate_study", "cpu_s_sum"] == pytest.approx(4.0)


def test_rule_table_of_no_jobs_is_empty():
    empty = bench.rule_table(bench.collect_jobs(Path("/nonexistent/benchmarks")))
    assert empty.empty and "wall_s_sum" in empty.columns


def _end_to_end(loaded: bool) -> pd.DataFrame:
    return pd.DataFrame([{
        "cells": 50123, "samples": 12, "scvi_epochs": 20, "workflow_wall_s": 666.0,
        "workflow_peak_rss_mb": 2150.0, "reference_wall_s": 210.0,
        "reference_peak_rss_mb": 812.0, "wall_ratio": 666.0 / 210.0, "loaded": loaded}])


ENV = {"date": "2026-12-01 09:00 UTC", "machine": "Linux x86_64", "cpu_model": "Xeon X",
       "cores_used": 2, "cores_available": 2, "memory_gib": "23.5", "python": "3.11.7",
       "scanpy": "1.11.5", "torch": "2.13.0"}


def test_markdown_snippet():
    rules = pd.DataFrame([
        {"cells": 50123, "rule": "qc", "jobs": 12, "wall_s_sum": 608.2, "wall_s_max": 55.1,
         "cpu_s_sum": 590.0, "cpu_s_max": 52.0, "max_rss_mb_max": 700.0},
        {"cells": 50123, "rule": "integrate", "jobs": 1, "wall_s_sum": 123.0,
         "wall_s_max": 123.0, "cpu_s_sum": 240.0, "cpu_s_max": 240.0, "max_rss_mb_max": 2150.0}])
    text = bench.markdown(_end_to_end(loaded=False), rules, ENV)
    assert text.startswith("Measured 2026-12-01 09:00 UTC on Linux x86_64, Xeon X, 2 cores")
    assert "loaded the machine" not in text
    assert "scVI epochs: 20." in text and "scanpy 1.11.5" in text and "torch 2.13.0" in text
    assert "| 50,123 | 12 | 11 min 06 s | 2.1 GB | 3 min 30 s | 812 MB | 3.17x |" in text
    assert "| qc | 12 | 608 (55) | 590 (52) | 700 MB |" in text
    assert text.index("| qc |") < text.index("| integrate |")
    # every table row has as many cells as its header
    for block in text.split("\n\n"):
        rows = [r for r in block.splitlines() if r.startswith("|")]
        assert len({r.count("|") for r in rows}) <= 1, block
    loaded = bench.markdown(_end_to_end(loaded=True), rules, ENV)
    assert "(measured while other work loaded the machine)" in loaded
    no_ref = _end_to_end(loaded=False).assign(reference_wall_s=float("nan"),
                                              reference_peak_rss_mb=float("nan"),
                                              wall_ratio=float("nan"))
    assert "| 50,123 | 12 | 11 min 06 s | 2.1 GB | n/a | n/a | not run |" in \
        bench.markdown(no_ref, rules, ENV)  # --no-reference


@pytest.mark.parametrize("seconds, text", [(4.4, "4 s"), (59.6, "1 min 00 s"),
                                           (666, "11 min 06 s"), (float("nan"), "n/a")])
def test_format_seconds(seconds, text):
    assert bench._fmt_s(seconds) == text


def test_is_loaded_uses_load_per_core():
    cores = bench.available_cores()
    assert not bench.is_loaded([0.0, 0.1 * cores], cores)
    assert bench.is_loaded([0.0, 3.0 * cores], cores)


def test_epochs_argument():
    assert bench.epochs_arg("20") == 20
    assert bench.epochs_arg("config") is None
    for bad in ("0", "-3", "many"):
        with pytest.raises(Exception, match="expected"):
            bench.epochs_arg(bad)


def test_check_args(tmp_path):
    assert bench.check_args([2000, 1000, 2000], 2, 3, tmp_path) == [2000, 1000]
    with pytest.raises(ConfigError, match=r"--cells: 100 \(expected at least 600: 50 cells in "
                                          r"each of 12 samples\)"):
        bench.check_args([100], 2, 3, tmp_path)
    with pytest.raises(ConfigError, match="--cores: 0"):
        bench.check_args([1000], 0, 3, tmp_path)
    with pytest.raises(ConfigError, match="--animals-per-arm: 0"):
        bench.check_args([1000], 1, 0, tmp_path)
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        bench.check_args([1000], 1, 3, afile)
    with pytest.raises(ConfigError, match=r"--configfile: .* not found"):
        bench.check_args([1000], 1, 3, tmp_path, tmp_path / "missing.yaml")


def test_cli_rejects_bad_arguments_with_one_line(capsys, tmp_path):
    assert main(["bench", "--cells", "10", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("livermsc: --cells: 10 (expected at least") and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["bench", "--cells", "1000", "--epochs", "0"])
    assert "expected at least 1 epoch" in capsys.readouterr().err


def test_study_spec_and_config():
    spec = bench.study_spec(30000, 3)
    assert spec["id"] == bench.STUDY_ID and spec["source"] == "simulate"
    params = validate(dict(spec["simulate"]), "simulate", "bench.yaml")
    assert params["n_cells"] == 30000
    assert len(design(params, "mouse")) == 12  # 4 arms x 3 animals
    assert bench.bench_config(20, 1) == {
        "studies": ["bench"], "seed": 1,
        "integrate": {"scvi": {"max_epochs": 20, "early_stopping": False}}}
    assert "integrate" not in bench.bench_config(None, 0)


def test_run_measured_times_a_child(tmp_path):
    code = ("import time, sys\n"
            "block = bytearray(300 * 1024 * 1024)\n"
            "for i in range(0, len(block), 4096): block[i] = 1\n"
            "t = time.process_time()\n"
            "while time.process_time() - t < 0.3: pass\n"
            "time.sleep(0.2)\n"
            "print('done'); sys.exit(3)\n")
    m = bench.run_measured([sys.executable, "-c", code], tmp_path, tmp_path / "child.log")
    assert m.returncode == 3
    assert (tmp_path / "child.log").read_text().strip() == "done"
    assert m.wall_s >= 0.5
    assert m.cpu_s >= 0.3
    # ru_maxrss survives fork + exec: from a large parent (this test process) it can only be
    # bounded below; the harness starts its runs from the small command-line process
    assert m.max_rss_mb >= 300


def test_environment_names_machine_and_versions():
    env = bench.environment(2)
    assert env["cores_used"] == 2 and env["cpu_model"]
    assert {"scanpy", "anndata", "scvi-tools", "torch", "snakemake", "numpy"} <= set(env)
    assert env["scanpy"][0].isdigit()


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("LIVERMSC_BENCH_TEST") != "1",
                    reason="opt-in: set LIVERMSC_BENCH_TEST=1 (a whole benchmark run, minutes)")
def test_bench_smoke(tmp_path):
    """The whole harness at a tiny size: workflow and reference run on the same simulated
    study and every table comes out."""
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "livermsc.cli", "bench", "--cells", "800", "--epochs", "2",
           "--animals-per-arm", "2", "--cores", "2", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    e2e = pd.read_csv(out / "end_to_end.tsv", sep="\t")
    assert len(e2e) == 1
    row = e2e.iloc[0]
    assert row["samples"] == 8 and row["cells_requested"] == 800
    assert row["reference_scvi_epochs"] == 2 and row["scvi_epochs"] == 2
    assert row["workflow_wall_s"] > 0 and row["reference_wall_s"] > 0
    assert row["wall_ratio"] == pytest.approx(row["workflow_wall_s"] / row["reference_wall_s"],
                                              rel=1e-3)  # the TSV keeps 3 decimals
    assert 0 < row["workflow_peak_rss_mb"] <= row["workflow_process_max_rss_mb"] * 1.5
    assert 0 < row["reference_cells_after_qc"] <= row["cells"]
    rules = pd.read_csv(out / "rules.tsv", sep="\t")
    assert {"ingest", "qc", "integrate", "cluster", "score", "claims"} <= set(rules["rule"])
    assert rules.loc[rules["rule"] == "qc", "jobs"].iloc[0] == 8
    jobs = pd.read_csv(out / "jobs.tsv", sep="\t")
    assert "simulate_study" not in set(jobs["rule"])  # simulated once, outside the timing
    steps = pd.read_csv(out / "reference_steps.tsv", sep="\t")
    assert {"qc_scrublet", "hvg_pca", "scvi", "neighbors", "leiden", "umap", "score",
            "pseudobulk"} <= set(steps["step"])
    assert steps["wall_s"].sum() <= row["reference_wall_s"]
    md = (out / "performance.md").read_text()
    assert f"| {int(row['cells']):,} | 8 |" in md
    assert not (out / "work").exists()  # scratch removed without --keep


def test_settled_load_waits_for_the_load_to_fall(monkeypatch):
    cores = bench.available_cores()
    loads = iter([3.0 * cores, 2.0 * cores, 0.1 * cores])
    monkeypatch.setattr(bench.os, "getloadavg", lambda: (next(loads), 0.0, 0.0))
    monkeypatch.setattr(bench.time, "sleep", lambda s: None)
    assert bench.settled_load(cores) == 0.1 * cores
    monkeypatch.setattr(bench.os, "getloadavg", lambda: (3.0 * cores, 0.0, 0.0))
    assert bench.settled_load(cores, wait_s=0.0) == 3.0 * cores  # gives up, reports it

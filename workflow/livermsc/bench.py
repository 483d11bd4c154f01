"""``livermsc bench``: time the workflow against an in-memory reference script, side by side.

For each requested size the demo study's generator (:mod:`livermsc.simulate`, the demo study
file with ``n_cells`` overridden, 3 animals in each of its 4 arms = 12 samples by default)
writes a simulated study into a scratch working directory. Then, on that same data:

* the whole workflow runs with Snakemake (``--cores N``, scVI at ``--epochs``); each job's
  ``benchmark:`` file (``benchmarks/<rule>/...``: ``s`` wall seconds, ``cpu_time`` CPU
  seconds, ``max_rss`` peak resident set of the job's process tree in MiB, sampled by
  Snakemake) gives the per-rule table, and the Snakemake process itself is timed end to end;
* an in-memory reference script (:func:`reference`) runs the same core steps in one Python
  process (per-sample MAD QC, Scrublet per sample, seurat_v3 HVGs, scVI with the same settings
  and epochs, neighbours, Leiden, UMAP, signature scores, pseudobulk), with nothing written
  between steps.

Both runs are child processes measured with ``os.wait4``: wall clock, user + system CPU of the
process and its descendants, and the largest peak RSS among them (``ru_maxrss``). Outputs
(``--out``): ``end_to_end.tsv``, ``rules.tsv``, ``jobs.tsv``, ``reference_steps.tsv``,
``environment.tsv`` and ``performance.md`` (the tables for the README's performance section).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
import yaml

from livermsc.config import ConfigError, load_config, load_yaml, validate
from livermsc.simulate import simulate_study

#: repository root (Snakefile, config/, seeds/) of this installed package
REPO = Path(__file__).resolve().parents[2]
#: id of the simulated study in every scratch working directory
STUDY_ID = "bench"
#: packages whose versions go into the environment table
PACKAGES = ("scanpy", "anndata", "scvi-tools", "torch", "snakemake", "numpy")
#: fewest simulated cells per sample a size may ask for (QC and Scrublet need cells)
MIN_CELLS_PER_SAMPLE = 50
#: 1-minute load average per core above which a run is labelled as measured on a loaded machine
LOADED_PER_CORE = 0.5
#: columns of Snakemake's benchmark files used here (``s`` wall s, ``cpu_time`` CPU s,
#: ``max_rss`` MiB); ``NA`` or ``-`` where Snakemake could not sample the job
BENCH_COLUMNS = ("s", "cpu_time", "max_rss")


class BenchError(RuntimeError):
    """A benchmark run failed; the message names the run and its log."""


# --- benchmark files -> tables ---------------------------------------------------------------------


def read_benchmark_file(path: str | Path) -> pd.DataFrame:
    """One Snakemake benchmark TSV: its rows (one per repeat), ``s``/``cpu_time``/``max_rss`` as
    floats (NaN where Snakemake wrote ``NA`` or ``-``)."""
    path = Path(path)
    try:
        table = pd.read_csv(path, sep="\t", na_values=["NA", "-"], keep_default_na=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise BenchError(f"{path}: not a Snakemake benchmark table ({err})") from err
    missing = [c for c in BENCH_COLUMNS if c not in table.columns]
    if missing:
        raise BenchError(f"{path}: benchmark table lacks column(s) {', '.join(missing)} "
                         f"(expected Snakemake's s, h:m:s, max_rss, ..., cpu_time)")
    if table.empty:
        raise BenchError(f"{path}: benchmark table has a header but no row")
    for col in BENCH_COLUMNS:
        table[col] = pd.to_numeric(table[col], errors="coerce")
    return table


def collect_jobs(bench_dir: str | Path) -> pd.DataFrame:
    """One row per job from every benchmark file under ``bench_dir`` (``benchmarks/``).

    The rule is the ``rule_name`` column (``--benchmark-extended``) or else the first folder
    below ``bench_dir``. A file with several rows (``repeat()``) counts as one job with the
    mean of its repeats. Columns: rule, job (path below ``bench_dir``), wall_s, cpu_s,
    max_rss_mb.
    """
    bench_dir = Path(bench_dir)
    rows = []
    for path in sorted(bench_dir.rglob("*")):
        if not path.is_file():
            continue
        rel = path.relative_to(bench_dir)
        table = read_benchmark_file(path)
        rule = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        if "rule_name" in table.columns and table["rule_name"].notna().any():
            rule = str(table["rule_name"].dropna().iloc[0])
        rows.append({"rule": rule, "job": rel.as_posix(), "wall_s": table["s"].mean(),
                     "cpu_s": table["cpu_time"].mean(), "max_rss_mb": table["max_rss"].mean()})
    return pd.DataFrame(rows, columns=["rule", "job", "wall_s", "cpu_s", "max_rss_mb"])


def rule_table(jobs: pd.DataFrame) -> pd.DataFrame:
    """Per rule: jobs, wall and CPU seconds summed over its jobs and of its longest job, and
    the largest peak RSS of a job; rules by summed wall time, longest first."""
    if jobs.empty:
        return pd.DataFrame(columns=["rule", "jobs", "wall_s_sum", "wall_s_max", "cpu_s_sum",
                                     "cpu_s_max", "max_rss_mb_max"])
    grouped = jobs.groupby("rule", sort=False)
    out = pd.DataFrame({
        "jobs": grouped.size(),
        "wall_s_sum": grouped["wall_s"].sum(min_count=1),
        "wall_s_max": grouped["wall_s"].max(),
        "cpu_s_sum": grouped["cpu_s"].sum(min_count=1),
        "cpu_s_max": grouped["cpu_s"].max(),
        "max_rss_mb_max": grouped["max_rss_mb"].max(),
    }).reset_index()
    return out.sort_values(["wall_s_sum", "rule"], ascending=[False, True],
                           na_position="last").reset_index(drop=True)


# --- measuring a child process ---------------------------------------------------------------------


@dataclass(frozen=True)
class Measured:
    """Wall clock, CPU (user + system, with waited-for descendants) and peak RSS of a process."""

    returncode: int
    wall_s: float
    cpu_s: float
    max_rss_mb: float


def run_measured(cmd: Sequence[str], cwd: str | Path, log: str | Path,
                 env: Mapping[str, str] | None = None) -> Measured:
    """Run ``cmd`` in ``cwd`` (stdout + stderr into ``log``) and measure it with ``os.wait4``.

    ``ru_maxrss`` of ``wait4`` is the largest peak RSS of the process and the descendants it
    waited for (KiB on Linux), i.e. that of its largest single process. It survives fork and
    exec, so it is at least the RSS of the calling process: call this from a small process
    (as ``livermsc bench`` does), not from a large one.
    """
    with open(log, "w") as fh:
        start = time.perf_counter()
        proc = subprocess.Popen(list(cmd), cwd=cwd, stdout=fh, stderr=subprocess.STDOUT,
                                env=None if env is None else dict(env))
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    rss_bytes = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)  # KiB on Linux
    return Measured(returncode=proc.returncode, wall_s=wall,
                    cpu_s=usage.ru_utime + usage.ru_stime, max_rss_mb=rss_bytes / 1024 ** 2)


def _tail(path: Path, n: int = 25) -> str:
    lines = path.read_text(errors="replace").splitlines() if path.is_file() else []
    return "\n".join(lines[-n:])


# --- environment -----------------------------------------------------------------------------------


def cpu_model() -> str:
    """CPU model name (``lscpu``, else ``/proc/cpuinfo``, else :func:`platform.processor`)."""
    lscpu = shutil.which("lscpu")
    if lscpu:
        try:
            text = subprocess.run([lscpu], capture_output=True, text=True, check=False,
                                  timeout=10, env={**os.environ, "LC_ALL": "C"}).stdout
        except (OSError, subprocess.SubprocessError):
            text = ""
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model name" and value.strip():
                return value.strip()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    return platform.processor() or "unknown"


def memory_gib() -> float | None:
    """Total memory in GiB (``/proc/meminfo``), None where unknown."""
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024 ** 2
    return None


def package_versions(packages: Iterable[str] = PACKAGES) -> dict[str, str]:
    """Installed version of each package ("not installed" where absent)."""
    out = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def environment(cores: int) -> dict[str, Any]:
    """Date, machine, CPU, cores used / available, memory and package versions."""
    mem = memory_gib()
    env = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.system()} {platform.machine()}",
        "cpu_model": cpu_model(),
        "cores_used": cores,
        "cores_available": available_cores(),
        "memory_gib": "unknown" if mem is None else f"{mem:.1f}",
    }
    env.update(package_versions())
    return env


# --- the study and the workflow run ----------------------------------------------------------------


def study_spec(n_cells: int, animals_per_arm: int, demo: str | Path | None = None) -> dict:
    """The demo study file with ``n_cells`` and ``animals_per_arm`` replaced, id ``bench``."""
    demo = Path(demo) if demo else REPO / "config" / "studies" / "demo.yaml"
    spec = load_yaml(demo)
    spec["id"] = STUDY_ID
    spec["title"] = f"Benchmark: the demo study simulated at {n_cells} cells"
    spec["simulate"] = {**spec["simulate"], "n_cells": int(n_cells),
                        "animals_per_arm": int(animals_per_arm)}
    validate(spec, "study", f"{demo} (n_cells {n_cells}, animals_per_arm {animals_per_arm})")
    return spec


def bench_config(epochs: int | None, seed: int) -> dict:
    """The generated configfile: the ``bench`` study, the seed and (unless ``epochs`` is None,
    which keeps the config's scVI training settings) a fixed number of scVI epochs."""
    cfg: dict[str, Any] = {"studies": [STUDY_ID], "seed": int(seed)}
    if epochs is not None:
        cfg["integrate"] = {"scvi": {"max_epochs": int(epochs), "early_stopping": False}}
    return cfg


def prepare_workdir(work: Path, spec: dict, cfg: dict, configfile: Path | None = None) -> dict:
    """Copy ``config/`` and ``seeds/`` into ``work``, write ``config/studies/bench.yaml`` and
    ``config/bench.yaml`` and simulate the study into ``resources/bench/simulated`` (where the
    workflow's ``simulate_study`` rule would write it, so it is not re-run); return the truth."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    for folder in ("config", "seeds"):
        shutil.copytree(REPO / folder, work / folder)
    if configfile is not None:
        shutil.copyfile(configfile, work / "config" / "config.yaml")
    (work / "config" / "studies" / f"{STUDY_ID}.yaml").write_text(
        yaml.safe_dump(spec, sort_keys=False))
    (work / "config" / "bench.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    merged = _merged_config(work)
    params = validate(dict(spec["simulate"]), "simulate", f"{STUDY_ID}.yaml")
    return simulate_study(params, spec["species"], work / merged["score"]["signatures"],
                          work / "resources" / STUDY_ID / "simulated", seed=int(cfg["seed"]))


def _merged_config(work: Path) -> dict:
    """The validated workflow config of a scratch directory (config.yaml + bench.yaml)."""
    config = load_yaml(work / "config" / "config.yaml") or {}
    _update(config, load_yaml(work / "config" / "bench.yaml") or {})
    cwd = Path.cwd()
    try:
        os.chdir(work)
        cfg, _ = load_config(config, source=f"{work}/config/config.yaml + bench.yaml")
    finally:
        os.chdir(cwd)
    return cfg


def _update(base: dict, extra: Mapping) -> None:
    """Recursive dict update (as Snakemake merges --configfile into the workflow config)."""
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _update(base[key], value)
        else:
            base[key] = value


def snakemake_command(work: Path, cores: int) -> list[str]:
    """The measured Snakemake command line (the default target, extended benchmark files)."""
    return [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
            "--directory", str(work), "--cores", str(cores),
            "--configfile", "config/bench.yaml", "--benchmark-extended"]


def reference_command(work: Path, cores: int, out_json: Path) -> list[str]:
    """The measured command of the in-memory reference script."""
    return [sys.executable, "-m", "livermsc.bench", "reference", "--work", str(work),
            "--cores", str(cores), "--out", str(out_json)]


def _child_env(cores: int) -> dict[str, str]:
    env = dict(os.environ)
    # the package of this checkout first, whatever is installed
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "workflow"), env.get("PYTHONPATH", "")])
    env.setdefault("NUMBA_NUM_THREADS", str(cores))
    return env


def _n_cells_after_qc(work: Path) -> float:
    """Cells the workflow kept (rows of its integrated h5ad's obs), NaN where unreadable."""
    path = work / "results" / STUDY_ID / "integrated.h5ad"
    try:
        with h5py.File(path, "r") as fh:
            obs = fh["obs"]
            return float(obs[obs.attrs["_index"]].shape[0])
    except (OSError, KeyError, ValueError):
        return float("nan")


def bench_size(n_cells: int, *, epochs: int | None, cores: int, animals_per_arm: int,
               seed: int, scratch: Path, runs_dir: Path, configfile: Path | None = None,
               reference: bool = True) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    """Simulate one size, run workflow and (unless ``reference`` is False) the reference on
    it; (end-to-end row, jobs, steps)."""
    work = scratch / f"cells_{n_cells}"
    run_dir = runs_dir / f"cells_{n_cells}"
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = study_spec(n_cells, animals_per_arm)
    t0 = time.perf_counter()
    truth = prepare_workdir(work, spec, bench_config(epochs, seed), configfile)
    simulate_s = time.perf_counter() - t0
    cfg = _merged_config(work)
    env = _child_env(cores)

    load_before = settled_load(cores)
    wf_log = run_dir / "snakemake.log"
    wf = run_measured(snakemake_command(work, cores), work, wf_log, env)
    if wf.returncode != 0:
        raise BenchError(f"the workflow failed on {n_cells} cells (exit {wf.returncode}); "
                         f"log {wf_log}:\n{_tail(wf_log)}")
    if (work / "benchmarks" / "simulate").exists():
        raise BenchError(f"the workflow re-simulated the study on {n_cells} cells; its time "
                         f"would include the simulation (log {wf_log})")
    jobs = collect_jobs(work / "benchmarks")
    if jobs.empty:
        raise BenchError(f"no benchmark file under {work / 'benchmarks'} after the workflow")
    shutil.copytree(work / "benchmarks", run_dir / "benchmarks", dirs_exist_ok=True)
    n_kept_workflow = _n_cells_after_qc(work)

    ref_json = run_dir / "reference.json"
    ref_log = run_dir / "reference.log"
    nan = float("nan")
    if reference:
        ref = run_measured(reference_command(work, cores, ref_json), work, ref_log, env)
        if ref.returncode != 0 or not ref_json.is_file():
            raise BenchError(f"the reference script failed on {n_cells} cells (exit "
                             f"{ref.returncode}); log {ref_log}:\n{_tail(ref_log)}")
        ref_info = json.loads(ref_json.read_text())
    else:
        ref = Measured(returncode=0, wall_s=nan, cpu_s=nan, max_rss_mb=nan)
        ref_info = {"steps": {}, "n_cells_after_qc": nan, "scvi_epochs": nan}
    load_after = os.getloadavg()[0]
    steps = pd.DataFrame([{"step": k, "wall_s": v} for k, v in ref_info["steps"].items()],
                         columns=["step", "wall_s"])

    scvi = cfg["integrate"]["scvi"]
    row = {
        "cells": int(truth["n_cells"]),
        "cells_requested": int(n_cells),
        "samples": len(pd.read_csv(work / "resources" / STUDY_ID / "simulated" / "samples.tsv",
                                   sep="\t")),
        "scvi_epochs": "config" if epochs is None else int(epochs),
        "early_stopping": bool(scvi["early_stopping"]),
        "cores": cores,
        "simulate_s": simulate_s,
        "workflow_wall_s": wf.wall_s,
        "workflow_cpu_s": wf.cpu_s,
        "workflow_jobs": len(jobs),
        "workflow_jobs_wall_s_sum": float(jobs["wall_s"].sum()),
        "workflow_peak_rss_mb": float(jobs["max_rss_mb"].max()),
        "workflow_process_max_rss_mb": wf.max_rss_mb,
        "workflow_cells_after_qc": n_kept_workflow,
        "reference_wall_s": ref.wall_s,
        "reference_cpu_s": ref.cpu_s,
        "reference_peak_rss_mb": ref.max_rss_mb,
        "reference_cells_after_qc": ref_info["n_cells_after_qc"],
        "reference_scvi_epochs": ref_info["scvi_epochs"],
        "wall_ratio": wf.wall_s / ref.wall_s,
        "rss_ratio": float(jobs["max_rss_mb"].max()) / ref.max_rss_mb,
        "load_1min_before": load_before,
        "load_1min_after": load_after,
        "loaded": is_loaded([load_before], cores),
    }
    return row, jobs, steps


def settled_load(cores: int, wait_s: float = 120.0, every_s: float = 5.0) -> float:
    """The 1-minute load average once it has settled under the :func:`is_loaded` threshold
    (it still carries the previous size's runs), waiting at most ``wait_s`` seconds."""
    deadline = time.monotonic() + wait_s
    load = os.getloadavg()[0]
    while is_loaded([load], cores) and time.monotonic() < deadline:
        time.sleep(every_s)
        load = os.getloadavg()[0]
    return load


def is_loaded(loads: Iterable[float], cores: int) -> bool:
    """Whether other work loaded the machine: a 1-minute load average taken before the
    measured runs (:func:`settled_load`; the one after them carries the runs themselves)
    above :data:`LOADED_PER_CORE` per available core."""
    return any(x > LOADED_PER_CORE * max(available_cores(), cores) for x in loads)


# --- markdown ---------------------------------------------------------------------------------------


def _fmt_s(seconds: float) -> str:
    """Seconds as ``12 s`` or ``11 min 06 s``."""
    if not np.isfinite(seconds):
        return "n/a"
    seconds = round(float(seconds))
    if seconds < 60:
        return f"{seconds} s"
    return f"{seconds // 60} min {seconds % 60:02d} s"


def _fmt_mb(mb: float) -> str:
    """MiB as ``850 MB`` or ``2.1 GB`` (powers of 1024, as Snakemake's ``max_rss``)."""
    if not np.isfinite(mb):
        return "n/a"
    return f"{mb / 1024:.1f} GB" if mb >= 1024 else f"{mb:.0f} MB"


def markdown(end_to_end: pd.DataFrame, rules: pd.DataFrame, env: Mapping[str, Any],
             top_rules: int = 8) -> str:
    """The README snippet: what was measured where, the end-to-end table with the ratio, and
    the per-rule table (the ``top_rules`` longest rules of each size)."""
    loaded = bool(end_to_end["loaded"].any()) if "loaded" in end_to_end else False
    epochs = ", ".join(sorted({str(e) for e in end_to_end["scvi_epochs"]}))
    lines = [
        f"Measured {env['date']} on {env['machine']}, {env['cpu_model']}, "
        f"{env['cores_used']} cores used of {env['cores_available']}, "
        f"{env['memory_gib']} GiB memory"
        + (" (measured while other work loaded the machine)." if loaded else "."),
        f"scVI epochs: {epochs}. Versions: "
        + ", ".join(f"{k} {env[k]}" for k in ("python", *PACKAGES) if k in env) + ".",
        "",
        "| cells | samples | workflow wall | workflow peak RSS (largest job) | reference wall "
        "| reference peak RSS | workflow / reference (wall) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in end_to_end.itertuples():
        ratio = f"{r.wall_ratio:.2f}x" if np.isfinite(r.wall_ratio) else "not run"
        lines.append(f"| {r.cells:,} | {r.samples} | {_fmt_s(r.workflow_wall_s)} | "
                     f"{_fmt_mb(r.workflow_peak_rss_mb)} | {_fmt_s(r.reference_wall_s)} | "
                     f"{_fmt_mb(r.reference_peak_rss_mb)} | {ratio} |")
    for r in end_to_end.itertuples():
        sub = rules[rules["cells"] == r.cells].head(top_rules)
        if sub.empty:
            continue
        lines += ["", f"Per rule at {r.cells:,} cells (the {len(sub)} longest; wall and CPU "
                  "summed over the rule's jobs, longest job in brackets):", "",
                  "| rule | jobs | wall s | CPU s | peak RSS |", "|---|---:|---:|---:|---:|"]
        for q in sub.itertuples():
            lines.append(f"| {q.rule} | {q.jobs} | {q.wall_s_sum:.0f} ({q.wall_s_max:.0f}) | "
                         f"{q.cpu_s_sum:.0f} ({q.cpu_s_max:.0f}) | {_fmt_mb(q.max_rss_mb_max)} |")
    return "\n".join(lines) + "\n"


# --- the harness ------------------------------------------------------------------------------------


def write_tables(out: Path, end_to_end: pd.DataFrame, rules: pd.DataFrame, jobs: pd.DataFrame,
                 steps: pd.DataFrame, env: Mapping[str, Any]) -> None:
    """Write the TSV tables, environment.tsv and performance.md into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    end_to_end.to_csv(out / "end_to_end.tsv", sep="\t", index=False, float_format="%.3f")
    rules.to_csv(out / "rules.tsv", sep="\t", index=False, float_format="%.3f")
    jobs.to_csv(out / "jobs.tsv", sep="\t", index=False, float_format="%.3f")
    steps.to_csv(out / "reference_steps.tsv", sep="\t", index=False, float_format="%.3f")
    pd.DataFrame(list(env.items()), columns=["key", "value"]).to_csv(
        out / "environment.tsv", sep="\t", index=False)
    (out / "performance.md").write_text(markdown(end_to_end, rules, env))


def run_bench(cells: Sequence[int], *, epochs: int | None, out: Path, cores: int,
              animals_per_arm: int = 3, seed: int = 0, keep: bool = False,
              scratch: Path | None = None, configfile: Path | None = None,
              reference: bool = True) -> pd.DataFrame:
    """Benchmark every size in ``cells``; write the tables into ``out``; return end to end."""
    out.mkdir(parents=True, exist_ok=True)
    scratch = scratch or out / "work"
    env = environment(cores)
    rows, all_jobs, all_rules, all_steps = [], [], [], []
    for n in cells:
        print(f"bench: {n} cells: simulating, then the workflow"
              + (" and the reference" if reference else "") + f" ({cores} cores)", flush=True)
        row, jobs, steps = bench_size(n, epochs=epochs, cores=cores,
                                      animals_per_arm=animals_per_arm, seed=seed,
                                      scratch=scratch, runs_dir=out / "runs",
                                      configfile=configfile, reference=reference)
        rows.append(row)
        all_jobs.append(jobs.assign(cells=row["cells"]))
        all_rules.append(rule_table(jobs).assign(cells=row["cells"]))
        all_steps.append(steps.assign(cells=row["cells"]))
        print(f"bench: {row['cells']} cells: workflow {_fmt_s(row['workflow_wall_s'])}, "
              f"reference {_fmt_s(row['reference_wall_s'])}, ratio {row['wall_ratio']:.2f}x"
              if reference else
              f"bench: {row['cells']} cells: workflow {_fmt_s(row['workflow_wall_s'])}",
              flush=True)
        if not keep:
            shutil.rmtree(scratch / f"cells_{n}", ignore_errors=True)
        # tables after every size, so that a later failure keeps the sizes done
        end_to_end = pd.DataFrame(rows)
        write_tables(out, end_to_end, _front(pd.concat(all_rules, ignore_index=True)),
                     _front(pd.concat(all_jobs, ignore_index=True)),
                     _front(pd.concat(all_steps, ignore_index=True)), env)
    if not keep and scratch.is_dir() and not any(scratch.iterdir()):
        scratch.rmdir()
    return pd.DataFrame(rows)


def _front(table: pd.DataFrame, column: str = "cells") -> pd.DataFrame:
    return table[[column, *[c for c in table.columns if c != column]]]


# --- the command ------------------------------------------------------------------------------------


def epochs_arg(value: str) -> int | None:
    """``--epochs``: a positive integer, or ``config`` (keep the config's scVI training)."""
    if value == "config":
        return None
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"'{value}' (expected a positive integer or 'config')") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n} (expected at least 1 epoch)")
    return n


def check_args(cells: Sequence[int], cores: int, animals_per_arm: int, out: Path,
               configfile: Path | None = None) -> list[int]:
    """Validate the sizes, cores and paths; return the sizes without repeats (first order)."""
    if cores < 1:
        raise ConfigError(f"--cores: {cores} (expected at least 1)")
    if animals_per_arm < 1:
        raise ConfigError(f"--animals-per-arm: {animals_per_arm} (expected at least 1)")
    n_arms = len(load_yaml(REPO / "config" / "studies" / "demo.yaml")["simulate"]["arms"])
    n_samples = n_arms * animals_per_arm
    smallest = MIN_CELLS_PER_SAMPLE * n_samples
    for n in cells:
        if n < smallest:
            raise ConfigError(f"--cells: {n} (expected at least {smallest}: "
                              f"{MIN_CELLS_PER_SAMPLE} cells in each of {n_samples} samples)")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out: {out} is a file (expected a folder)")
    if configfile is not None and not configfile.is_file():
        raise ConfigError(f"--configfile: {configfile} not found")
    if not (REPO / "Snakefile").is_file():
        raise ConfigError(f"{REPO}: no Snakefile (the bench runs from a checkout of livermsc)")
    return list(dict.fromkeys(int(n) for n in cells))


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``livermsc bench``."""
    p.add_argument("--cells", type=int, nargs="+", required=True, metavar="N",
                   help="study sizes (simulated cells), e.g. 10000 50000 100000")
    p.add_argument("--epochs", type=epochs_arg, default=20, metavar="N|config",
                   help="scVI epochs of workflow and reference, early stopping off (default "
                   "20); 'config' keeps the config's training settings (max_epochs, "
                   "early_stopping)")
    p.add_argument("--out", type=Path, default=Path("results/bench"),
                   help="folder of the tables and run logs (default results/bench)")
    p.add_argument("--cores", type=int, default=available_cores(),
                   help="cores of the workflow (snakemake --cores) and the reference's "
                   "torch threads (default: all available)")
    p.add_argument("--animals-per-arm", type=int, default=3,
                   help="simulated animals per arm of the demo design (default 3: 12 samples)")
    p.add_argument("--seed", type=int, default=0, help="seed of simulation and workflow")
    p.add_argument("--configfile", type=Path, default=None,
                   help="workflow config to benchmark (default the repository's "
                   "config/config.yaml)")
    p.add_argument("--scratch", type=Path, default=None,
                   help="folder of the scratch working directories (default OUT/work)")
    p.add_argument("--keep", action="store_true",
                   help="keep each size's scratch working directory (data, results, logs)")
    p.add_argument("--no-reference", dest="reference", action="store_false",
                   help="time the workflow only (no in-memory reference, no ratio)")


def bench_cli(args: argparse.Namespace) -> int:
    """``livermsc bench``: run the harness; configuration errors propagate as ConfigError."""
    cells = check_args(args.cells, args.cores, args.animals_per_arm, args.out, args.configfile)
    try:
        end_to_end = run_bench(cells, epochs=args.epochs, out=args.out, cores=args.cores,
                               animals_per_arm=args.animals_per_arm, seed=args.seed,
                               keep=args.keep, scratch=args.scratch,
                               configfile=args.configfile, reference=args.reference)
    except BenchError as err:
        print(f"livermsc bench: {err}", file=sys.stderr)
        return 1
    print(f"bench: tables in {args.out} (end_to_end.tsv, rules.tsv, jobs.tsv, "
          f"reference_steps.tsv, environment.tsv, performance.md)")
    print(end_to_end[["cells", "workflow_wall_s", "reference_wall_s", "wall_ratio"]]
          .to_string(index=False))
    return 0


# --- the in-memory reference script -----------------------------------------------------------------


class _Steps:
    """Wall seconds of each named step."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self._t = time.perf_counter()

    def done(self, name: str) -> None:
        now = time.perf_counter()
        self.times[name] = self.times.get(name, 0.0) + now - self._t
        self._t = now


def _mad_outlier(x: np.ndarray, n_mads: float) -> np.ndarray:
    med = np.median(x)
    mad = np.median(np.abs(x - med))
    return (x < med - n_mads * mad) | (x > med + n_mads * mad)


def _mt_limit(pct: np.ndarray, n_mads: float, floor: float, cap: float) -> float:
    if pct.size == 0:
        return cap
    med = np.median(pct)
    return float(min(max(med + n_mads * np.median(np.abs(pct - med)), floor), cap))


def _qc_sample(adata: Any, qc: Mapping[str, Any], species: str, seed: int) -> Any:
    """Per-sample MAD QC (counts, genes, top-20 share; mitochondrial limits per marker class,
    classes by each cell's marker share) and Scrublet on the passing cells."""
    import scanpy as sc  # heavy: only in the reference process

    mt_prefix = "mt-" if species == "mouse" else "MT-"
    adata.var["mt"] = adata.var_names.str.startswith(mt_prefix)
    sc.pp.calculate_qc_metrics(adata, qc_vars=["mt"], percent_top=[min(20, adata.n_vars)],
                               log1p=True, inplace=True)
    obs = adata.obs
    keep = np.ones(adata.n_obs, dtype=bool)
    for metric, column in (("counts", "log1p_total_counts"), ("genes", "log1p_n_genes_by_counts"),
                           ("top20", obs.columns[obs.columns.str.startswith("pct_counts_in_top_")][0])):
        if metric in qc["outlier_metrics"]:
            keep &= ~_mad_outlier(obs[column].to_numpy(float), qc["n_mads"])
    pct = obs["pct_counts_mt"].to_numpy(float)
    limit = np.full(adata.n_obs, np.nan)
    counts = adata.X.tocsr()
    non_mt = np.asarray(counts[:, ~adata.var["mt"].to_numpy()].sum(axis=1)).ravel()
    classed = np.zeros(adata.n_obs, dtype=bool)
    for cls in qc["mt_classes"]:
        genes = adata.var_names.isin(cls["markers"].get(species, []))
        share = 100 * np.asarray(counts[:, genes].sum(axis=1)).ravel() / np.maximum(non_mt, 1)
        member = (share >= cls["min_marker_pct"]) & ~classed
        limit[member] = _mt_limit(pct[member], cls["n_mads_mt"], cls["min_pct_mt"],
                                  cls["max_pct_mt"])
        classed |= member
    limit[~classed] = _mt_limit(pct[~classed], qc["n_mads_mt"], qc["min_pct_mt"],
                                qc["max_pct_mt"])
    keep &= pct <= limit
    min_genes = min(int(qc["min_genes"]), int(qc["min_genes_max_fraction"] * adata.n_vars))
    keep &= obs["n_genes_by_counts"].to_numpy() >= min_genes
    adata = adata[keep].copy()
    dbl = qc["doublets"]
    if dbl["detect"] and adata.n_obs >= dbl["min_cells"]:
        sc.pp.scrublet(adata, expected_doublet_rate=dbl["expected_rate"],
                       sim_doublet_ratio=dbl["sim_ratio"],
                       n_prin_comps=int(min(dbl["n_pcs"], adata.n_obs - 1)),
                       log_transform=dbl["log_transform"], threshold=dbl["threshold"],
                       random_state=seed, use_approx_neighbors=False)  # as the QC rule
        called = adata.obs["predicted_doublet"].to_numpy(bool)
        if dbl["threshold"] is None and "threshold" not in adata.uns.get("scrublet", {}):
            called = adata.obs["doublet_score"].to_numpy(float) > dbl["fallback_threshold"]
        if dbl["remove"]:
            adata = adata[~called].copy()
    return adata


def reference(work: Path, cores: int) -> dict[str, Any]:
    """The in-memory reference of the workflow's core steps on ``work``'s simulated study, with
    the scratch directory's config (config/config.yaml + config/bench.yaml); returns the wall
    seconds of each step and what came out."""
    steps = _Steps()
    # heavy imports here only: the harness process itself does not need them
    import anndata as ad
    import scanpy as sc
    import scvi
    import torch

    steps.done("imports")
    os.chdir(work)
    cfg = _merged_config(work)
    seed = int(cfg["seed"])
    qc, integ, clus = cfg["qc"], cfg["integrate"], cfg["cluster"]
    data = work / "resources" / STUDY_ID / "simulated"
    sheet = pd.read_csv(data / "samples.tsv", sep="\t", dtype=str)
    species = str(sheet["species"].iloc[0]) if "species" in sheet else "mouse"
    steps.done("setup")

    parts, n_in = [], 0
    for row in sheet.itertuples():
        a = sc.read_10x_mtx(data / row.path, var_names="gene_symbols", make_unique=True)
        n_in += a.n_obs
        steps.done("read")
        a = _qc_sample(a, qc, species, seed)
        a.obs["sample"] = row.sample
        a.obs["arm"] = row.arm
        a.obs_names = [f"{row.sample}:{b}" for b in a.obs_names]
        parts.append(a)
        steps.done("qc_scrublet")
    adata = ad.concat(parts, join=integ["join"])
    adata.obs["sample"] = adata.obs["sample"].astype("category")
    adata.layers["counts"] = adata.X.copy()
    adata.X = adata.X.astype(np.float32)
    sc.pp.normalize_total(adata, target_sum=integ["target_sum"])
    sc.pp.log1p(adata)
    steps.done("merge_normalise")
    sc.pp.highly_variable_genes(adata, n_top_genes=min(int(integ["n_top_genes"]), adata.n_vars),
                                flavor="seurat_v3", layer="counts",
                                batch_key=integ["batch_key"])
    sc.pp.pca(adata, n_comps=int(min(integ["n_pcs"], adata.n_obs - 1, adata.n_vars - 1)),
              mask_var="highly_variable", random_state=seed)
    steps.done("hvg_pca")

    params = integ["scvi"]
    accelerator = integ["accelerator"]
    if accelerator == "auto":
        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(cores)
    scvi.settings.seed = seed
    scvi.settings.dl_num_workers = 0
    hvg = adata[:, adata.var["highly_variable"].to_numpy()].copy()
    scvi.model.SCVI.setup_anndata(hvg, layer="counts", batch_key=integ["batch_key"])
    model = scvi.model.SCVI(hvg, n_latent=params["n_latent"], n_layers=params["n_layers"],
                            n_hidden=params["n_hidden"], dropout_rate=params["dropout_rate"],
                            dispersion=params["dispersion"],
                            gene_likelihood=params["gene_likelihood"])
    train: dict[str, Any] = {"max_epochs": params["max_epochs"], "accelerator": accelerator,
                             "devices": 1 if accelerator == "gpu" else "auto",
                             "batch_size": params["batch_size"],
                             "train_size": params["train_size"],
                             "early_stopping": params["early_stopping"],
                             "plan_kwargs": {"lr": params["learning_rate"]},
                             "enable_progress_bar": False}
    if params["early_stopping"]:
        train["early_stopping_patience"] = params["early_stopping_patience"]
    model.train(**train)
    epochs_run = len(model.history["elbo_train"])
    adata.obsm["X_scVI"] = model.get_latent_representation()
    steps.done("scvi")

    sc.pp.neighbors(adata, n_neighbors=min(int(clus["n_neighbors"]), adata.n_obs - 1),
                    use_rep=clus["use_rep"], transformer="sklearn", random_state=seed)
    steps.done("neighbors")
    res = float(clus["annotation"]["resolution"])
    kwargs: dict[str, Any] = {"flavor": clus["leiden_flavor"],
                              "n_iterations": int(clus["leiden_n_iterations"])}
    if clus["leiden_flavor"] == "igraph":
        kwargs["directed"] = False
    sc.tl.leiden(adata, resolution=res, random_state=seed, key_added="leiden", **kwargs)
    steps.done("leiden")
    sc.tl.umap(adata, min_dist=float(clus["umap_min_dist"]), random_state=seed)
    steps.done("umap")

    signatures = load_yaml(work / cfg["score"]["signatures"])["signatures"]
    n_scored = 0
    for name, sig in signatures.items():
        genes = [g for g in sig.get(species, []) if g in adata.var_names]
        if len(genes) >= int(cfg["score"]["min_genes"]):
            sc.tl.score_genes(adata, genes, ctrl_size=int(cfg["score"]["ctrl_size"]),
                              score_name=f"score_{name}", random_state=seed)
            n_scored += 1
    steps.done("score")

    groups = adata.obs["sample"].astype(str) + "|" + adata.obs["leiden"].astype(str)
    codes, labels = pd.factorize(groups)
    indicator = sp.csr_matrix((np.ones(len(codes)), (codes, np.arange(len(codes)))),
                              shape=(len(labels), len(codes)))
    pseudobulk = indicator @ sp.csr_matrix(adata.layers["counts"])
    steps.done("pseudobulk")
    return {"steps": steps.times, "n_cells_in": n_in,
            "n_cells_after_qc": int(adata.n_obs), "n_hvg": int(hvg.n_vars),
            "scvi_epochs": epochs_run, "accelerator": accelerator,
            "n_clusters": int(adata.obs["leiden"].nunique()), "n_signatures_scored": n_scored,
            "pseudobulk_shape": list(pseudobulk.shape)}


def _reference_main(argv: list[str] | None = None) -> int:
    """``python -m livermsc.bench reference --work DIR --cores N --out FILE``."""
    parser = argparse.ArgumentParser(prog="python -m livermsc.bench")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("reference", help="the in-memory reference on a scratch directory")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--cores", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    out = args.out.resolve()
    info = reference(args.work.resolve(), args.cores)
    out.write_text(json.dumps(info, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(_reference_main())

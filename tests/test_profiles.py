"""Snakemake profiles and the input-scaled resource helpers of common.smk.

Dry runs use the SLURM profile as it is when snakemake-executor-plugin-slurm is installed
(the executor and its ``slurm-*`` options are then validated too); without the plugin they
use a copy without the executor settings, so that the planned resources are still checked.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO / "workflow" / "profiles" / "default" / "config.v8+.yaml"
SLURM = REPO / "workflow" / "profiles" / "slurm" / "config.v8+.yaml"
COMMON = REPO / "workflow" / "rules" / "common.smk"
HAS_SLURM_PLUGIN = importlib.util.find_spec("snakemake_executor_plugin_slurm") is not None


# --- helpers ------------------------------------------------------------------------------------

def resources_block() -> str:
    """The ``# resources`` block of common.smk (up to the next block marker or the end)."""
    lines = COMMON.read_text().splitlines()
    start = lines.index("# resources")
    end = next((i for i in range(start + 1, len(lines))
                if re.fullmatch(r"# [a-z_]+", lines[i])), len(lines))
    return "\n".join(lines[start:end])


def helpers() -> dict:
    """The resource helpers as plain Python functions."""
    namespace: dict = {"Path": Path}
    exec(compile(resources_block(), str(COMMON), "exec"), namespace)
    return namespace


def slurm_profile(tmp_path: Path) -> Path:
    """The SLURM profile, or a copy without executor settings where the plugin is missing."""
    if HAS_SLURM_PLUGIN:
        return SLURM.parent
    profile = yaml.safe_load(SLURM.read_text())
    profile = {k: v for k, v in profile.items()
               if k != "executor" and not k.startswith("slurm-")}
    folder = tmp_path / "slurm_profile"
    folder.mkdir()
    (folder / "config.v8+.yaml").write_text(yaml.safe_dump(profile))
    return folder


def dry_run(args: list[str], cwd: Path) -> str:
    res = subprocess.run([sys.executable, "-m", "snakemake", "-n", *args], cwd=cwd,
                         capture_output=True, text=True, timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    return out


def planned_resources(output: str) -> dict[str, list[dict[str, str]]]:
    """Rule name -> resources of each job, from the job blocks a dry run prints."""
    jobs: dict[str, list[dict[str, str]]] = {}
    rule = None
    for line in output.splitlines():
        m = re.match(r"^(?:local)?(?:rule|checkpoint) (\w+):$", line.strip())
        if m:
            rule = m.group(1)
            continue
        m = re.match(r"^\s+resources: (.*)$", line)
        if m and rule:
            pairs = [p.split("=", 1) for p in m.group(1).split(", ")]
            jobs.setdefault(rule, []).append({k: v for k, v in pairs})
            rule = None
    return jobs


def commented(path: Path) -> list[str]:
    """Keys of a profile that lack a comment (on their line or the line before)."""
    lines = path.read_text().splitlines()
    bare = []
    for i, line in enumerate(lines):
        m = re.match(r"^\s*([A-Za-z_][\w-]*):", line)
        if not m or line.lstrip().startswith("#"):
            continue
        before = lines[i - 1].strip() if i else ""
        if "#" not in line and not before.startswith("#"):
            bare.append(m.group(1))
    return bare


# --- the profile files --------------------------------------------------------------------------

@pytest.mark.parametrize("path", [DEFAULT, SLURM], ids=["default", "slurm"])
def test_profile_parses_and_every_entry_is_commented(path):
    profile = yaml.safe_load(path.read_text())
    assert isinstance(profile, dict) and profile
    assert commented(path) == [], f"{path}: entries without a comment: {commented(path)}"


def test_profile_keys_are_snakemake_options():
    from snakemake.cli import get_argument_parser

    options = {s for a in get_argument_parser()._actions for s in a.option_strings}
    for path in (DEFAULT, SLURM):
        for key in yaml.safe_load(path.read_text()):
            if key.startswith("slurm-") and not HAS_SLURM_PLUGIN:
                continue  # registered by the plugin
            assert f"--{key}" in options, f"{path}: '{key}' is not a Snakemake option"


def test_default_profile_holds_only_general_settings():
    profile = yaml.safe_load(DEFAULT.read_text())
    assert profile == {"printshellcmds": True, "rerun-incomplete": True,
                       "show-failed-logs": True}
    # machine-specific settings belong elsewhere; default-resources here would also hide
    # those of --profile (a workflow profile's default-resources replace them)
    assert not {"cores", "jobs", "executor", "default-resources", "resources"} & set(profile)


def test_slurm_profile_settings():
    profile = yaml.safe_load(SLURM.read_text())
    assert profile["executor"] == "slurm"
    assert profile["jobs"] >= 1 and profile["retries"] >= 1 and profile["latency-wait"] >= 5
    assert {"slurm_partition", "slurm_account", "mem_mb", "runtime"} <= set(
        profile["default-resources"])
    assert "slurm_partition" in profile["set-resources"]["integrate"]


def test_profiles_are_applied_by_snakemake(monkeypatch):
    from snakemake.cli import parse_args

    monkeypatch.chdir(REPO)
    _, args = parse_args(["-n", "--workflow-profile", str(DEFAULT.parent)])
    assert args.printshellcmds and args.rerun_incomplete and args.show_failed_logs
    if HAS_SLURM_PLUGIN:
        _, args = parse_args(["-n", "--profile", str(SLURM.parent)])
        assert args.executor == "slurm" and args.jobs == 50 and args.retries == 1
        assert args.default_resources["mem_mb"].value == 4000
        assert str(args.slurm_logdir) == "logs/slurm"


def test_workflow_profile_auto_loaded_only_next_to_the_snakefile(tmp_path, monkeypatch):
    """Snakemake auto-loads profiles/default/ from the working directory or the Snakefile's
    folder - with the Snakefile at the repository root, workflow/profiles/default is not."""
    from snakemake.cli import parse_args

    (tmp_path / "Snakefile").write_text("rule a:\n    output: 'a'\n    shell: 'touch {output}'\n")
    nested = tmp_path / "workflow" / "profiles" / "default"
    nested.mkdir(parents=True)
    (nested / "config.v8+.yaml").write_text("printshellcmds: true\n")
    monkeypatch.chdir(tmp_path)
    assert not parse_args(["-n"])[1].printshellcmds
    top = tmp_path / "profiles" / "default"
    top.mkdir(parents=True)
    (top / "config.v8+.yaml").write_text("printshellcmds: true\n")
    assert parse_args(["-n"])[1].printshellcmds


# --- resource helpers ---------------------------------------------------------------------------

def test_resource_helpers_scale_with_input_and_attempt(tmp_path):
    h = helpers()
    big = tmp_path / "big.bin"
    with big.open("wb") as fh:
        fh.truncate(5_000_000)  # 5 MB (sparse)
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "a").write_bytes(b"x" * 1_000_000)
    (folder / "sub" / "b").write_bytes(b"x" * 2_000_000)

    assert h["input_size_mb"]([str(big)]) == pytest.approx(5.0)
    assert h["input_size_mb"]([str(folder)]) == pytest.approx(3.0)
    mem = h["mem_mb_from_input"](factor=300, minimum=500)
    assert mem(None, [str(big)], 1) == 1500
    assert mem(None, [str(big)], 2) == 3000
    assert mem(None, [str(folder)], 1) == 900
    assert h["mem_mb_from_input"](factor=1, minimum=500)(None, [str(big)], 3) == 1500
    assert h["mem_mb_from_input"](factor=300, minimum=500, maximum=2000)(
        None, [str(big)], 3) == 2000
    runtime = h["runtime_from_input"](minutes_per_gb=4000, minimum=5)
    assert runtime(None, [str(big)], 1) == 20
    assert runtime(None, [str(folder)], 2) == 24
    assert h["gpus_for"]("gpu") == 1 and h["gpus_for"]("cpu") == 0
    assert h["gpus_for"]("auto") == 0
    with pytest.raises(FileNotFoundError) as err:
        mem(None, [str(tmp_path / "missing")], 1)
    assert err.value.filename == str(tmp_path / "missing")


def test_slurm_dry_run_plans_scaled_and_gpu_resources(tmp_path):
    """A small workflow with the helpers: sizes known, one input not yet made (<TBD>), and an
    `integrate` rule that picks up the GPU partition of the profile."""
    work = tmp_path / "wf"
    work.mkdir()
    with (work / "in.bin").open("wb") as fh:
        fh.truncate(5_000_000)
    (work / "Snakefile").write_text(
        "from pathlib import Path\n" + resources_block() + "\n\n"
        "rule all:\n"
        "    input: 'scaled.txt', 'gpu.txt', 'cpu.txt', 'later.txt'\n\n"
        "rule scaled:\n"
        "    input: 'in.bin'\n"
        "    output: 'scaled.txt'\n"
        "    resources:\n"
        "        mem_mb=mem_mb_from_input(factor=300, minimum=500),\n"
        "        runtime=runtime_from_input(minutes_per_gb=4000, minimum=5),\n"
        "    shell: 'touch {output}'\n\n"
        "rule integrate:\n"
        "    input: 'in.bin'\n"
        "    output: 'gpu.txt'\n"
        "    resources:\n"
        "        gpu=gpus_for('gpu'),\n"
        "    shell: 'touch {output}'\n\n"
        "rule integrate_cpu:\n"
        "    input: 'in.bin'\n"
        "    output: 'cpu.txt'\n"
        "    resources:\n"
        "        gpu=gpus_for('cpu'),\n"
        "    shell: 'touch {output}'\n\n"
        "rule upstream:\n"
        "    output: 'made_later.bin'\n"
        "    shell: 'touch {output}'\n\n"
        "rule later:\n"
        "    input: 'made_later.bin'\n"
        "    output: 'later.txt'\n"
        "    resources:\n"
        "        mem_mb=mem_mb_from_input(factor=300, minimum=500),\n"
        "    shell: 'touch {output}'\n")
    out = dry_run(["--profile", str(slurm_profile(tmp_path)), "--workflow-profile", "none"],
                  work)
    jobs = planned_resources(out)
    scaled = jobs["scaled"][0]
    assert scaled["mem_mb"] == "1500" and scaled["runtime"] == "20"
    assert scaled["slurm_partition"] == "your_partition"
    assert scaled["slurm_account"] == "your_account"
    gpu = jobs["integrate"][0]
    assert gpu["gpu"] == "1" and gpu["slurm_partition"] == "your_gpu_partition"
    assert gpu["cpus_per_gpu"] == "4"
    assert gpu["mem_mb"] == "4000" and gpu["runtime"] == "60"  # profile fallbacks
    assert jobs["integrate_cpu"][0]["gpu"] == "0"
    assert jobs["later"][0]["mem_mb"] == "<TBD>"


def test_workflow_dry_run_with_slurm_profile(tmp_path):
    """The real workflow, planned with the SLURM profile: every job gets a partition, an
    account, memory and a runtime (numbers, or <TBD> until its input exists)."""
    out = dry_run(["--profile", str(slurm_profile(tmp_path)), "--workflow-profile", "none",
                   "--forceall"], REPO)
    jobs = planned_resources(out)
    assert {"report_claims", "report_summary"} <= set(jobs), sorted(jobs)
    for rule, planned in jobs.items():
        for res in planned:
            expected = "your_gpu_partition" if rule == "integrate" else "your_partition"
            assert res["slurm_partition"] == expected, (rule, res)
            assert res["slurm_account"] == "your_account", (rule, res)
            for key in ("mem_mb", "runtime"):
                assert re.fullmatch(r"\d+|<TBD>", res[key]), (rule, key, res)

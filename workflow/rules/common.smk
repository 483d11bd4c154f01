# Shared helpers: config validation (before any job runs), study/sample lookups, targets.
import sys
from pathlib import Path

sys.path.insert(0, str(Path(workflow.basedir) / "workflow"))

from livermsc.config import ConfigError, load_config

try:
    _validated, STUDIES = load_config(
        config, source="config (config/config.yaml with --config/--configfile overrides)"
    )
except ConfigError as err:
    sys.exit(f"livermsc: invalid input, nothing was run.\n{err}")
config.update(_validated)

ENTRY = "../scripts/run.py"

# Each stage's rule file appends its final outputs here; `rule all` asks for all of them.
ALL_TARGETS = []


wildcard_constraints:
    study=r"[A-Za-z0-9_.-]+",
    sample=r"[A-Za-z0-9_.-]+",


def all_targets(wildcards):
    """Final outputs of every stage, for every configured study."""
    return ALL_TARGETS


def samples_of(study):
    """Sample ids of a study, in sample-sheet order."""
    return STUDIES[study].samples.index.tolist()


def data_dir(study):
    """Folder holding a study's input counts (simulated or fetched/placed files)."""
    return STUDIES[study].data_dir


def sample_input(wildcards):
    """Input of `ingest` for one sample: the simulated folder, or the sample's file in data_dir."""
    study = STUDIES[wildcards.study]
    if study.spec["source"] == "simulate":
        return study.data_dir
    return f"{study.data_dir}/{study.samples.loc[wildcards.sample, 'path']}"

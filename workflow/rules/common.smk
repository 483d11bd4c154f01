# Shared helpers: config validation (before any job runs), study/sample lookups, targets.
import sys
from pathlib import Path

sys.path.insert(0, str(Path(workflow.basedir) / "workflow"))

from livermsc.config import ConfigError, combined_entry, load_config


def checked(check, *args, errors=(ConfigError,)):
    """Run an input check before any job; on failure stop with its message, no traceback."""
    try:
        return check(*args)
    except errors as err:
        sys.exit(f"livermsc: invalid input, nothing was run.\n{err}")


_validated, STUDIES = checked(
    load_config,
    config,
    "config (config/config.yaml with --config/--configfile overrides)",
)
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


def sample_combined(wildcards):
    """A local sample's combined file entry ({} for a sample with its own file), with the
    path of its cell table (split by table) resolved."""
    study = STUDIES[wildcards.study]
    if study.spec["source"] != "local":
        return {}
    entry = combined_entry(study.spec, study.samples.loc[wildcards.sample])
    if entry is None:
        return {}
    entry = dict(entry)
    if entry["split"]["by"] == "table":
        table = next(
            f for f in study.spec["files"] if f["name"] == entry["split"]["table"]
        )
        entry["table"] = f"{study.data_dir}/{table.get('path', table['name'])}"
    return entry


def sample_input(wildcards):
    """Input of `ingest` for one sample: the simulated folder, the sample's file in data_dir,
    or the combined file (and cell table) it is cut from."""
    study = STUDIES[wildcards.study]
    if study.spec["source"] == "simulate":
        return study.data_dir
    entry = sample_combined(wildcards)
    if entry:
        files = [f"{study.data_dir}/{entry.get('path', entry['name'])}"]
        return files + ([entry["table"]] if "table" in entry else [])
    return f"{study.data_dir}/{study.samples.loc[wildcards.sample, 'path']}"


# resources
# Requests that scale with a job's input size on disk and grow with each retry (`attempt`),
# for any rule, e.g.
#     resources:
#         mem_mb=mem_mb_from_input(factor=10, minimum=4000),
#         runtime=runtime_from_input(minutes_per_gb=30, minimum=15),
# While an input does not exist yet (dry run), Snakemake shows the value as <TBD> and
# evaluates it once the input exists, before the job is started or submitted.
import errno


def input_size_mb(input):
    """Total size of a job's input in MB (10^6 bytes); a folder counts every file inside."""
    total = 0
    for f in input:
        path = Path(f)
        if not path.exists():
            raise FileNotFoundError(errno.ENOENT, "input not created yet", str(f))
        if path.is_dir():
            total += sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        else:
            total += path.stat().st_size
    return total / 1e6


def _scaled(per_mb, minimum, maximum, input, attempt):
    value = max(minimum, per_mb * input_size_mb(input)) * attempt
    return int(round(min(value, maximum) if maximum else value))


def mem_mb_from_input(factor, minimum=1000, maximum=None):
    """`mem_mb` callable: `factor` MB per MB of input, at least `minimum`, x attempt."""

    def mem_mb(wildcards, input, attempt):
        return _scaled(factor, minimum, maximum, input, attempt)

    return mem_mb


def runtime_from_input(minutes_per_gb, minimum=10, maximum=None):
    """`runtime` callable (minutes): per GB of input, at least `minimum`, x attempt."""

    def runtime(wildcards, input, attempt):
        return _scaled(minutes_per_gb / 1000, minimum, maximum, input, attempt)

    return runtime


def gpus_for(accelerator):
    """Number of GPUs to request for an accelerator setting: 1 for "gpu", else 0."""
    return 1 if accelerator == "gpu" else 0


# report
# Snakemake report categories, one per stage, numbered so that the report lists them in the
# order of the workflow; use with subcategory="{study}" (or "all studies").
REPORT_CATEGORY = {
    "qc": "1. Quality control",
    "integrate": "2. Integration",
    "cluster": "3. Clusters and cell types",
    "score": "4. Scores",
    "claims": "5. Claims",
    "summary": "6. Summary",
}


# The format shown in the report (and embedded in summary.html): PNG, else SVG, else PDF.
def shown_format(formats):
    """The format of a figure shown in the report: PNG, else SVG, else PDF."""
    return next(f for f in ("png", "svg", "pdf", *formats) if f in formats)


REPORT_FORMAT = shown_format(config["figures"]["formats"])


def report_figure(stem, caption, category, subcategory=None, labels=None, formats=None):
    """Files of one figure in each of `formats` (default: figures.formats); one of them (PNG,
    else SVG, else PDF) is marked for the report."""
    formats = formats or config["figures"]["formats"]
    shown = shown_format(formats)
    files = []
    for fmt in formats:
        path = f"{stem}.{fmt}"
        if fmt == shown:
            path = report(
                path,
                caption=caption,
                category=category,
                subcategory=subcategory,
                labels=labels,
            )
        files.append(path)
    return files


def sample_stages(wildcards):
    """Stage of each sample of a study ({} when its sample sheet has no `stage` column)."""
    samples = STUDIES[wildcards.study].samples
    if "stage" not in samples.columns:
        return {}
    return {s: str(v) for s, v in samples["stage"].dropna().items()}


# fetch ------------------------------------------------------------------------------------------
# Studies with source geo/url: their files and sample -> file mapping are checked here, before any
# job runs (livermsc.fetch.plan_study); fetch.smk turns each plan into rules.
from livermsc.fetch import plan_study
from livermsc.transfer import FetchSettings

FETCH_PLANS = {
    sid: checked(plan_study, study, FetchSettings.from_config(config["fetch"]))
    for sid, study in STUDIES.items()
    if study.spec["source"] in ("geo", "url")
}


def download_output(path):
    """Output of a download: kept, or temporary when fetch.keep_downloads is false."""
    return path if config["fetch"]["keep_downloads"] else temp(path)


def unpack_outputs(plan):
    """Every sample input an unpack rule writes (10x folders flagged as directories)."""
    return [
        directory(path) if is_dir else path for path, is_dir in plan.sample_outputs()
    ]


def fetch_manifests(wildcards):
    """Unpack manifests of every fetched study (what `snakemake fetch_all` asks for)."""
    return [f"{plan.data_dir}/fetch_manifest.tsv" for plan in FETCH_PLANS.values()]


# ingest / qc ------------------------------------------------------------------------------------
# Per-sample lookups of the ingest and qc rules (sample-sheet row, species, QC overrides).
import pandas as pd

QC_OVERRIDE_COLUMNS = ("qc_n_mads", "qc_n_mads_mt", "qc_max_pct_mt")


def sample_row(wildcards):
    """The sample's sample-sheet row as a dict of strings (empty cells left out)."""
    row = STUDIES[wildcards.study].samples.loc[wildcards.sample]
    return {k: str(v) for k, v in row.items() if not pd.isna(v)}


def study_species(wildcards):
    """Species of a study (mouse or human)."""
    return STUDIES[wildcards.study].species


def is_simulated(wildcards):
    """True for a simulated study (its input is the folder holding every sample)."""
    return STUDIES[wildcards.study].spec["source"] == "simulate"


def qc_overrides(wildcards):
    """The sample's per-sample QC overrides from the sample sheet (qc_* columns present)."""
    row = sample_row(wildcards)
    return {k: row[k] for k in QC_OVERRIDE_COLUMNS if k in row}


def qc_tables(wildcards):
    """Per-sample QC tables of a study, in sample-sheet order."""
    return [
        f"results/{wildcards.study}/qc/tables/{s}.tsv"
        for s in samples_of(wildcards.study)
    ]


# integrate --------------------------------------------------------------------------------------
def qc_samples(wildcards):
    """The QC'd h5ad of every sample of a study, in sample-sheet order (input of `integrate`)."""
    return expand(
        "results/{study}/qc/{sample}.h5ad",
        study=wildcards.study,
        sample=samples_of(wildcards.study),
    )


# score / claims ---------------------------------------------------------------------------------
# The claims catalogue and the signatures file are checked before any job runs.
from livermsc.claims import check_config as check_claims_config

checked(check_claims_config, config)

# A claim's signature must share no gene with the markers that select its population.
from livermsc.annotate import check_signature_overlap

checked(
    check_signature_overlap,
    config,
    sorted({study.species for study in STUDIES.values()}),
)

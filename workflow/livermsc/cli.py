"""The ``livermsc`` command: helper verbs around the Snakemake workflow."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import yaml

from livermsc.bench import add_arguments as add_bench_arguments
from livermsc.bench import bench_cli
from livermsc.calibrate import calibrate_cli
from livermsc.config import ConfigError, load_config, load_yaml, unused_arm_notes, validate
from livermsc.draft import draft_cli
from livermsc.fetch import download_study
from livermsc.simulate import simulate_study
from livermsc.transfer import FetchError, FetchSettings
from livermsc.unpack import draft_sample_sheet


def _cmd_simulate(args: argparse.Namespace) -> int:
    spec = validate(load_yaml(args.study), "study", args.study)
    if spec["source"] != "simulate":
        raise ConfigError(f"{args.study}: field 'source': '{spec['source']}' (expected: simulate)")
    params = spec["simulate"]
    if args.n_cells:
        params["n_cells"] = args.n_cells
    truth = simulate_study(params, spec["species"], args.signatures, args.out, seed=args.seed)
    print(f"simulated {truth['n_cells']} cells ({truth['n_doublets']} doublets, "
          f"{truth['n_low_quality']} low-quality) into {args.out}")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    config: dict = {}
    for path in args.configfile:
        config.update(load_yaml(path) or {})
    for item in args.config:
        key, _, value = item.partition("=")
        config[key] = yaml.safe_load(value)
    cfg, studies = load_config(config, source=" + ".join(args.configfile))
    for sid, study in studies.items():
        arms = study.samples["arm"].value_counts().to_dict()
        print(f"{sid}: {study.species}, {len(study.samples)} samples, arms {arms}")
    for note in unused_arm_notes(studies, cfg["claims"]["catalogue"]):
        print(note)
    print("configuration valid")
    return 0


def _cmd_download(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cfg = load_yaml(args.configfile) if args.configfile.is_file() else {}
    settings = FetchSettings.from_config((cfg or {}).get("fetch"), source=args.configfile)
    download_study(args.study, settings, args.dest)
    return 0


def _cmd_draft_sheet(args: argparse.Namespace) -> int:
    draft_sample_sheet(args.archive).to_csv(sys.stdout, sep="\t", index=False)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every verb."""
    parser = argparse.ArgumentParser(prog="livermsc", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("simulate", help="write a simulated study with planted truth")
    p.add_argument("--study", type=Path, default=Path("config/studies/demo.yaml"),
                   help="study file with a 'simulate' section (default: the demo)")
    p.add_argument("--signatures", type=Path, default=Path("config/signatures.yaml"))
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-cells", type=int, default=None, help="override the study's n_cells")
    p.set_defaults(func=_cmd_simulate)

    p = sub.add_parser("validate", help="validate config, study files and sample sheets")
    p.add_argument("--configfile", nargs="+", default=["config/config.yaml"])
    p.add_argument("--config", nargs="*", default=[], metavar="KEY=VALUE",
                   help="overrides, as with snakemake --config")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("calibrate", help="false-positive rate under realistic traps and power "
                       "of the claim verdicts, on simulated studies")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--quick", action="store_true",
                   help="a small run (6 studies per scenario, 1 through the full pipeline)")
    p.add_argument("--n-studies", type=int, default=None,
                   help="studies per truth-label scenario (default 10; share traps x2, power "
                   "x0.5; --quick 6)")
    p.add_argument("--pipeline-studies", type=int, default=None,
                   help="studies per QC -> annotation scenario (default 2; --quick 1)")
    p.add_argument("--scenarios", default=None,
                   help="comma-separated scenario names (default: all; see livermsc.calibrate)")
    p.add_argument("--seed", type=int, default=0, help="study i uses seed + i")
    p.add_argument("--workers", type=int, default=2, help="parallel processes (default 2)")
    p.add_argument("--cells-per-sample", type=int, default=None,
                   help="simulated cells per sample (default 600; --quick 400)")
    p.add_argument("--configfile", type=Path, default=Path("config/config.yaml"),
                   help="its qc, integrate, cluster, score and claims settings are calibrated")
    p.set_defaults(func=calibrate_cli)

    p = sub.add_parser("draft-study", help="draft a study file from a GEO series' metadata "
                       "(SOFT family file or series matrix), arms guessed and marked for review")
    p.add_argument("accession", help="GEO series accession, e.g. GSE171904")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--soft", type=Path, help="a local SOFT family file (GSE..._family.soft.gz)")
    src.add_argument("--series-matrix", type=Path,
                     help="a local series matrix (GSE..._series_matrix.txt.gz)")
    src.add_argument("--use-series-matrix", action="store_true",
                     help="download the series matrix instead of the SOFT family file")
    p.add_argument("--out", type=Path, help="study file to write (default "
                   "config/studies/<id>.yaml)")
    p.add_argument("--id", help="study id (default: the accession)")
    p.add_argument("--force", action="store_true", help="replace an existing study file")
    p.add_argument("--configfile", type=Path, default=Path("config/config.yaml"),
                   help="its fetch section sets the GEO mirror, retries and timeouts")
    p.add_argument("--base-url", help="GEO base URL (overrides fetch.base_url)")
    p.add_argument("--download-dir", type=Path,
                   help="where a downloaded file goes (default resources/<id>/metadata)")
    p.set_defaults(func=draft_cli)

    p = sub.add_parser("download", help="download a study's files outside the workflow (shared "
                       "cache, checksums and offline mode as in the workflow)")
    p.add_argument("study", type=Path, help="study file, e.g. config/studies/GSE136103.yaml")
    p.add_argument("--configfile", type=Path, default=Path("config/config.yaml"),
                   help="config whose fetch: section to use (default: config/config.yaml)")
    p.add_argument("--dest", type=Path, default=None,
                   help="folder for the files (default: resources/<study>/downloads)")
    p.set_defaults(func=_cmd_download)

    p = sub.add_parser("draft-sheet", help="print a draft sample sheet (TSV) for a GEO RAW.tar: "
                       "one row per GSM, arm left empty to fill in")
    p.add_argument("archive", type=Path, help="e.g. resources/<id>/downloads/<GSE>_RAW.tar")
    p.set_defaults(func=_cmd_draft_sheet)

    p = sub.add_parser("bench", help="time the workflow and an in-memory reference script "
                       "side by side on simulated studies of the given sizes")
    add_bench_arguments(p)
    p.set_defaults(func=bench_cli)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run one verb; configuration and download errors print one clear
    message."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, FetchError) as err:
        print(f"livermsc: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The ``livermsc`` command: helper verbs around the Snakemake workflow."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from livermsc.config import ConfigError, load_config, load_yaml, validate


def _cmd_simulate(args: argparse.Namespace) -> int:
    from livermsc.simulate import simulate_study

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
    _, studies = load_config(config, source=" + ".join(args.configfile))
    for sid, study in studies.items():
        arms = study.samples["arm"].value_counts().to_dict()
        print(f"{sid}: {study.species}, {len(study.samples)} samples, arms {arms}")
    print("configuration valid")
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from livermsc.calibrate import calibrate_cli

    return calibrate_cli(args)


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

    p = sub.add_parser("calibrate", help="power and false-positive rate of the claim verdicts "
                       "on simulated studies")
    p.add_argument("--n-studies", type=int, default=200, help="simulated studies (default 200)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0, help="study i uses seed + i")
    p.add_argument("--workers", type=int, default=2, help="parallel processes (default 2)")
    p.add_argument("--effect-size", type=float, default=1.5,
                   help="planted programme effect, in between-animal SDs (default 1.5)")
    p.add_argument("--share-size", type=float, default=3.0,
                   help="planted cell-state share effect, in SDs of the logit share (default 3)")
    p.add_argument("--n-cells", type=int, default=3600, help="cells per study (default 3600)")
    p.add_argument("--animals-per-arm", type=int, default=3)
    p.add_argument("--background-genes", type=int, default=300)
    p.add_argument("--configfile", type=Path, default=Path("config/config.yaml"),
                   help="its score and claims settings are calibrated")
    p.set_defaults(func=_cmd_calibrate)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run one verb; configuration errors print one clear message."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"livermsc: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

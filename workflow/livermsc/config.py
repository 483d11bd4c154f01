"""Load and validate the workflow config, study files and sample sheets against JSON schemas.

Every error is a :class:`ConfigError` whose message names the file, the field and what was
expected, so that the Snakefile can stop with one clear line before any job runs.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pandas as pd
import yaml
from referencing import Registry, Resource

REPO_ROOT = Path(__file__).resolve().parents[2]
SCHEMA_DIR = REPO_ROOT / "workflow" / "schemas"


class ConfigError(ValueError):
    """A config, study file or sample sheet is invalid; the message says where and why."""


def load_yaml(path: str | Path) -> Any:
    """Read a YAML file, turning a missing file or a syntax error into a :class:`ConfigError`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        with path.open() as fh:
            return yaml.safe_load(fh)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from err


@functools.lru_cache(maxsize=1)
def _registry() -> Registry:
    resources = []
    for schema_file in sorted(SCHEMA_DIR.glob("*.schema.yaml")):
        contents = load_yaml(schema_file)
        resources.append((schema_file.name, Resource.from_contents(contents)))
    return Registry().with_resources(resources)


def _resolve(schema: Mapping, registry: Registry) -> Mapping:
    while "$ref" in schema:
        schema = registry.resolver().lookup(schema["$ref"]).contents
    return schema


def _fill_defaults(instance: Any, schema: Mapping, registry: Registry) -> None:
    """Insert ``default`` values of absent properties, recursing into objects and arrays."""
    schema = _resolve(schema, registry)
    if isinstance(instance, dict):
        for key, sub in schema.get("properties", {}).items():
            sub = _resolve(sub, registry)
            if key not in instance and "default" in sub:
                instance[key] = copy.deepcopy(sub["default"])
            if key in instance:
                _fill_defaults(instance[key], sub, registry)
    elif isinstance(instance, list) and isinstance(schema.get("items"), Mapping):
        for item in instance:
            _fill_defaults(item, schema["items"], registry)


def _field(path: Any) -> str:
    parts = [f"[{p}]" if isinstance(p, int) else f".{p}" for p in path]
    return "".join(parts).lstrip(".") or "(top level)"


def validate(instance: Any, schema_name: str, source: str | Path) -> Any:
    """Validate ``instance`` against ``workflow/schemas/<schema_name>.schema.yaml``.

    Returns a copy with schema defaults filled in. ``source`` names the file in errors.
    """
    registry = _registry()
    schema = registry.contents(f"{schema_name}.schema.yaml")
    validator = jsonschema.Draft202012Validator(schema, registry=registry)
    errors = sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path))
    if errors:
        lines = []
        for err in errors[:10]:
            best = jsonschema.exceptions.best_match([err])
            expected = _resolve(best.schema, registry).get("description", "") if isinstance(best.schema, Mapping) else ""
            hint = f" (expected: {expected})" if expected else ""
            lines.append(f"{source}: field '{_field(best.absolute_path)}': {best.message}{hint}")
        raise ConfigError("\n".join(lines))
    filled = copy.deepcopy(instance)
    _fill_defaults(filled, schema, registry)
    return filled


@dataclass(frozen=True)
class Study:
    """A validated study: its spec (the study file) and its sample sheet (one row per sample)."""

    id: str
    spec: dict
    samples: pd.DataFrame
    path: Path

    @property
    def species(self) -> str:
        return self.spec["species"]

    @property
    def data_dir(self) -> str:
        """Folder (relative to the working directory) holding the study's input counts."""
        if self.spec["source"] == "simulate":
            return f"resources/{self.id}/simulated"
        return self.spec.get("data_dir", f"resources/{self.id}")


def read_sample_sheet(path: str | Path) -> pd.DataFrame:
    """Read a TSV/CSV sample sheet as strings (empty cells become missing)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: sample sheet not found")
    sep = "," if path.suffix == ".csv" else "\t"
    try:
        return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, na_values=[""])
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot be parsed as a {'CSV' if sep == ',' else 'TSV'} table ({err})") from err


def validate_sample_sheet(sheet: pd.DataFrame, source: str | Path) -> pd.DataFrame:
    """Validate every row of a sample sheet; return it indexed by ``sample`` with defaults filled."""
    if sheet.empty:
        raise ConfigError(f"{source}: the sample sheet has no rows")
    records = [{k: v for k, v in row.items() if pd.notna(v)} for row in sheet.to_dict("records")]
    rows = []
    for i, record in enumerate(records):
        try:
            rows.append(validate(record, "samples", source))
        except ConfigError as err:
            raise ConfigError(str(err).replace("field '", f"row {i + 1}, field '")) from None
    out = pd.DataFrame(rows)
    dup = out["sample"][out["sample"].duplicated()].unique().tolist()
    if dup:
        raise ConfigError(f"{source}: field 'sample': duplicated sample names {dup} (expected: unique ids)")
    if "animal" not in out:
        out["animal"] = out["sample"]
    out["animal"] = out["animal"].fillna(out["sample"])
    return out.set_index("sample", drop=False).sort_index()


def load_study(study_id: str, studies_dir: str | Path) -> Study:
    """Load ``<studies_dir>/<study_id>.yaml``, validate it and its sample sheet."""
    path = Path(studies_dir) / f"{study_id}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in Path(studies_dir).glob("*.yaml"))
        raise ConfigError(f"{path}: no study file for study '{study_id}' (available: {available})")
    spec = validate(load_yaml(path), "study", path)
    if spec["id"] != study_id:
        raise ConfigError(f"{path}: field 'id': '{spec['id']}' does not match the file name (expected: '{study_id}')")
    if spec.get("status") == "needs_accession":
        raise ConfigError(
            f"{path}: field 'status': this study is registered but its public accession is not yet "
            f"known. Fill in 'accession', 'files' and the sample sheet from the paper, then set "
            f"'status: ready' (see README, 'Adding a study')."
        )
    if spec.get("status") == "needs_sample_sheet":
        raise ConfigError(
            f"{path}: field 'status': this study's files are known but its samples are not yet "
            f"mapped to arms. Download them (python -m livermsc.fetch download {path}), draft a "
            f"sheet from the archive (python -m livermsc.fetch sheet <RAW.tar>), fill in arm and "
            f"animal per sample from the paper, add it as 'samples' or 'sample_sheet', then set "
            f"'status: ready' (see README, 'Adding a study')."
        )
    if spec["source"] == "simulate":
        from livermsc.simulate import design

        sheet = design(spec["simulate"], species=spec["species"])
        source = f"{path} (simulated design)"
    elif "samples" in spec:
        sheet = pd.DataFrame(spec["samples"]).astype("string")
        source = path
    else:
        sheet_path = (path.parent / spec["sample_sheet"]).resolve()
        sheet = read_sample_sheet(sheet_path)
        source = sheet_path
    return Study(id=study_id, spec=spec, samples=validate_sample_sheet(sheet, source), path=path)


def load_config(config: Mapping, source: str = "config") -> tuple[dict, dict[str, Study]]:
    """Validate the workflow config and every study it selects; return (config, studies)."""
    cfg = validate(dict(config), "config", source)
    studies_dir = Path(cfg["studies_dir"])
    if not studies_dir.is_absolute():
        studies_dir = Path.cwd() / studies_dir
    studies = {sid: load_study(sid, studies_dir) for sid in cfg["studies"]}
    return cfg, studies

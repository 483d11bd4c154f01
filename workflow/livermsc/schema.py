"""JSON-schema validation of the workflow config, study files, sample sheets and curated inputs.

Every error is a :class:`ConfigError` whose message names the file, the field and what was
expected. :func:`validate` fills the schema defaults (``workflow/schemas``), the one place where
defaults live: settings objects are built from its result (:func:`section_defaults`,
:func:`section_settings`). Imports no other livermsc module.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema
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


def schema_of(name: str) -> Mapping:
    """The contents of ``workflow/schemas/<name>.schema.yaml``."""
    return _registry().contents(f"{name}.schema.yaml")


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


_TRUE, _FALSE, _NULL = {"true", "yes", "on"}, {"false", "no", "off"}, {"null", "none", "~", ""}


def _types(schema: Mapping) -> set[str]:
    kind = schema.get("type", [])
    return {kind} if isinstance(kind, str) else set(kind)


def _from_string(value: str, types: set[str]) -> Any:
    """``value`` as the number, boolean or null the schema's ``types`` ask for, else unchanged."""
    text = value.strip()
    if "null" in types and text.lower() in _NULL:
        return None
    if "boolean" in types and text.lower() in _TRUE | _FALSE:
        return text.lower() in _TRUE
    if types & {"integer", "number"}:
        try:
            return int(text)
        except ValueError:
            pass
        try:
            return float(text)  # for an integer field, 2.5 then fails as "not of type 'integer'"
        except ValueError:
            pass
    return value


def coerce_strings(instance: Any, schema: Mapping, registry: Registry | None = None) -> Any:
    """Convert strings to the number, boolean or null the schema asks for, recursively.

    ``snakemake --config qc='{"n_mads": -1}'`` reads nested values as strings ('-1'); where the
    schema wants a number, integer, boolean or null (and not a string) the string is converted,
    so that the range checks that follow report the value itself. Strings that do not parse are
    left as they are and fail validation with the usual message.
    """
    registry = registry or _registry()
    schema = _resolve(schema, registry)
    if isinstance(instance, str):
        types = _types(schema)
        return instance if "string" in types or not types else _from_string(instance, types)
    if isinstance(instance, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        out = {}
        for key, value in instance.items():
            sub = props.get(key, extra if isinstance(extra, Mapping) else None)
            out[key] = coerce_strings(value, sub, registry) if sub is not None else value
        return out
    if isinstance(instance, list) and isinstance(schema.get("items"), Mapping):
        return [coerce_strings(item, schema["items"], registry) for item in instance]
    return instance


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
            where = list(best.absolute_path)
            schema_at = _resolve(best.schema, registry) if isinstance(best.schema, Mapping) else {}
            if best.validator == "required" and isinstance(best.instance, Mapping):
                # name the missing field itself, and what it should hold
                missing = [k for k in best.validator_value if k not in best.instance][:1]
                where += missing
                sub = schema_at.get("properties", {}).get(missing[0], {}) if missing else {}
                schema_at = _resolve(sub, registry) if isinstance(sub, Mapping) else {}
            if schema_at.get("movedTo"):  # a setting that lives elsewhere now (see its schema)
                lines.append(f"{source}: field '{_field(where)}' has moved to "
                             f"'{schema_at['movedTo']}' (set it there instead)")
                continue
            expected = schema_at.get("description", "")
            hint = f" (expected: {expected})" if expected else ""
            lines.append(f"{source}: field '{_field(where)}': {best.message}{hint}")
        raise ConfigError("\n".join(lines))
    filled = copy.deepcopy(instance)
    _fill_defaults(filled, schema, registry)
    return filled


@functools.cache
def _defaults(schema_name: str) -> Any:
    return validate({}, schema_name, f"{schema_name}.schema.yaml defaults")


def section_defaults(schema_name: str) -> dict[str, Any]:
    """The defaults of ``workflow/schemas/<schema_name>.schema.yaml``: ``validate({})`` (a copy)."""
    return copy.deepcopy(_defaults(schema_name))


def section_settings(cfg: Mapping | None, schema_name: str, section: str) -> dict[str, Any]:
    """A config section validated against its schema, with the schema defaults filled in.

    ``cfg`` may be partial (None: every default); errors name the field as ``<section>.<field>``
    of the workflow config.
    """
    try:
        return validate(dict(cfg or {}), schema_name, "config")
    except ConfigError as err:
        text = str(err).replace("field '(top level)'", f"field '{section}'")
        raise ConfigError(text.replace("field '", f"field '{section}.").replace(
            f"field '{section}.{section}'", f"field '{section}'")) from None

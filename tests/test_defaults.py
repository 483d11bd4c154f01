"""Defaults live once, in the JSON schemas (workflow/schemas): Python never repeats them.

* no ``*Settings`` dataclass of livermsc holds a literal default (found with ``ast``), and the
  defaults it does have equal the settings built from the validated config;
* the score and claims settings are the validated sections;
* a keyword default of a stage function named like a field of its stage's config section
  equals the schema default;
* config/config.yaml, the commented copy of the defaults, states the schema defaults;
* the names of :mod:`livermsc.vocabulary` are the enums of the schemas.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from livermsc import vocabulary
from livermsc.config import claims_settings, score_settings
from livermsc.schema import schema_of, section_defaults, validate

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "workflow" / "livermsc"
CONFIG = validate({"studies": ["demo"]}, "config", "config defaults")


def _settings_classes() -> list[tuple[str, ast.ClassDef]]:
    """(module, class) of every dataclass named ``*Settings`` in the package."""
    out = []
    for path in sorted(PACKAGE.glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef) and node.name.endswith("Settings") and any(
                    "dataclass" in ast.unparse(d) for d in node.decorator_list):
                out.append((path.stem, node))
    return out


def _is_literal(node: ast.expr) -> bool:
    """A constant, a container of constants, or ``field(default=<constant>)``."""
    if isinstance(node, ast.Constant):
        return True
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        return all(_is_literal(e) for e in node.elts)
    if isinstance(node, ast.UnaryOp):
        return _is_literal(node.operand)
    if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("field"):
        return any(k.arg == "default" and _is_literal(k.value) for k in node.keywords)
    return False


SETTINGS = _settings_classes()


def test_settings_classes_are_found():
    assert "QCSettings" in {c.name for _, c in SETTINGS}


@pytest.mark.parametrize(("module", "node"), SETTINGS, ids=[c.name for _, c in SETTINGS])
def test_settings_dataclass_holds_no_literal_default(module, node):
    bad = [f"{ast.unparse(s.target)} = {ast.unparse(s.value)}" for s in node.body
           if isinstance(s, ast.AnnAssign) and s.value is not None and _is_literal(s.value)]
    assert not bad, (f"{module}.{node.name}: defaults written in Python (they belong in the "
                     f"schema): {bad}")


@pytest.mark.parametrize(("module", "node"), SETTINGS, ids=[c.name for _, c in SETTINGS])
def test_settings_defaults_equal_the_validated_config(module, node):
    """Every default a settings class has is what ``from_config`` makes of the validated
    config's section (``<Name>Settings`` reads config section ``<name>``)."""
    cls = getattr(importlib.import_module(f"livermsc.{module}"), node.name)
    section = node.name.removesuffix("Settings").lower()
    built = cls.from_config(CONFIG[section])
    assert built == cls.from_config(section_defaults(schema_of("config")["properties"][section]
                                                     ["$ref"].removesuffix(".schema.yaml")))
    for f in dataclasses.fields(cls):
        if f.default_factory is not dataclasses.MISSING:
            assert f.default_factory() == getattr(built, f.name), f.name
        elif f.default is not dataclasses.MISSING:
            assert f.default == getattr(built, f.name), f.name


def test_qc_settings_from_a_partial_section_take_the_schema_defaults():
    from livermsc.qc import QCSettings

    assert QCSettings() == QCSettings.from_config(None) == QCSettings.from_config(CONFIG["qc"])
    partial = QCSettings.from_config({"n_mads": 4, "doublets": {"detect": False}})
    assert (partial.n_mads, partial.detect_doublets) == (4, False)
    assert partial.mt_classes == QCSettings().mt_classes and partial.remove_doublets


def test_score_and_claims_settings_are_the_validated_sections():
    assert score_settings(None) == CONFIG["score"] == section_defaults("score")
    assert claims_settings(None) == CONFIG["claims"] == section_defaults("claims_config")
    assert score_settings({"min_cells": 3})["min_genes"] == CONFIG["score"]["min_genes"]


#: stage module -> the config section (path in the validated config) its functions read
STAGE_SECTIONS = {"score": ("score",), "geneset": ("score",), "claims": ("claims",),
                  "qc": ("qc",), "cluster": ("cluster",), "annotate": ("cluster", "annotation"),
                  "integrate": ("integrate",)}


#: (module, function, parameter) whose own default differs from the config's on purpose: a
#: building block with hand-computed unit tests at that value; its stage passes the config's
#: value explicitly (annotate() passes cluster.annotation.min_confidence)
OWN_DEFAULTS = {("annotate", "assign_clusters", "min_confidence")}


def _section(path: tuple[str, ...]) -> Mapping[str, Any]:
    out: Any = CONFIG
    for key in path:
        out = out[key]
    return out


@pytest.mark.parametrize("module", sorted(STAGE_SECTIONS))
def test_function_defaults_named_like_config_fields_equal_the_schema(module):
    section = _section(STAGE_SECTIONS[module])
    mod = importlib.import_module(f"livermsc.{module}")
    bad = []
    for name, fn in inspect.getmembers(mod, inspect.isfunction):
        if fn.__module__ != mod.__name__:
            continue
        for p in inspect.signature(fn).parameters.values():
            scalar = isinstance(p.default, int | float | str)
            if p.name in section and scalar and p.default != section[p.name] \
                    and (module, name, p.name) not in OWN_DEFAULTS:
                bad.append(f"{name}({p.name}={p.default!r}): schema default {section[p.name]!r}")
    assert not bad, f"livermsc.{module}: " + "; ".join(bad)


@pytest.mark.parametrize("module", ["qc", "cluster", "integrate", "report", "plotting"])
def test_figure_dpi_defaults_equal_the_figures_section(module):
    mod = importlib.import_module(f"livermsc.{module}")
    bad = [f"{name}(dpi={p.default!r})"
           for name, fn in inspect.getmembers(mod, inspect.isfunction)
           if fn.__module__ == mod.__name__
           for p in inspect.signature(fn).parameters.values()
           if p.name == "dpi" and p.default is not inspect.Parameter.empty
           and p.default != CONFIG["figures"]["dpi"]]
    assert not bad, f"livermsc.{module}: figures.dpi is {CONFIG['figures']['dpi']}: {bad}"


def _differences(stated: Any, default: Any, where: str) -> list[str]:
    if isinstance(stated, Mapping) and isinstance(default, Mapping):
        return [d for k, v in stated.items() if k in default
                for d in _differences(v, default[k], f"{where}.{k}" if where else k)]
    return [] if stated == default else [f"{where}: {stated!r} (schema default {default!r})"]


#: values config/config.yaml sets apart from the schema, each said so in its comment there
#: (the demo trains scVI briefly; real data use the schema's heuristic and early stopping)
DEMO_VALUES = {"integrate.scvi.max_epochs", "integrate.scvi.early_stopping"}


def test_config_yaml_states_the_schema_defaults():
    stated = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    assert stated["qc"] and stated["score"], "config/config.yaml lost its sections"
    defaults = validate({"studies": stated["studies"]}, "config", "defaults")
    diff = [d for d in _differences(stated, defaults, "") if d.split(":")[0] not in DEMO_VALUES]
    assert not diff, "config/config.yaml differs from the schema defaults:\n" + "\n".join(diff)


def test_vocabulary_matches_the_schema_enums():
    score = schema_of("score")["properties"]
    assert tuple(score["methods"]["items"]["enum"]) == vocabulary.SIGNATURE_METHODS
    assert tuple(score["population_levels"]["items"]["enum"]) == vocabulary.POPULATION_LEVELS
    assert vocabulary.VOOM in schema_of("claims_config")["properties"]["method"]["enum"]
    level = schema_of("claims")["properties"]["claims"]["items"]["properties"]["population"]
    assert set(vocabulary.POPULATION_LEVELS) <= set(level["properties"]["level"]["enum"])

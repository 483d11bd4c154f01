"""The curated inputs every stage reads: the marker panel, the signatures and the claims.

* :func:`load_panel`: ``config/celltypes.yaml`` (schema ``celltypes``), the markers of each cell
  type and state for one species (annotation, marker figures, circularity checks);
* :func:`load_signatures`: ``config/signatures.yaml``, the gene symbols of every signature for
  one species (score and claims stages, calibration);
* :func:`load_catalogue`: the claims catalogue (``claims.catalogue``, schema ``claims``).

Each raises :class:`~livermsc.schema.ConfigError` naming the file and field.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from livermsc.schema import ConfigError, load_yaml, validate
from livermsc.vocabulary import UNASSIGNED

# --- the marker panel -----------------------------------------------------------------------------


@dataclass(frozen=True)
class CellType:
    """A major cell type of the panel, with its markers for one species and its states."""

    name: str
    markers: list[str]
    source: str
    states: dict[str, list[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Panel:
    """The marker panel for one species."""

    species: str
    types: dict[str, CellType]
    path: str = ""

    @property
    def parents(self) -> dict[str, str]:
        """state -> parent type."""
        return {s: t.name for t in self.types.values() for s in t.states}


def load_panel(path: str | Path, species: str = "mouse") -> Panel:
    """Read and validate ``config/celltypes.yaml``; return its markers for ``species``."""
    doc = validate(load_yaml(path), "celltypes", path)
    if species not in ("mouse", "human"):
        raise ConfigError(f"{path}: species {species!r} is not mouse or human")
    types = {}
    names: set[str] = set()
    for name, spec in doc["cell_types"].items():
        states = {s: list(v[species]) for s, v in spec.get("states", {}).items()}
        for n in [name, *states]:
            if n in names or n == UNASSIGNED:
                raise ConfigError(f"{path}: field 'cell_types.{name}': name '{n}' is used twice "
                                  f"or reserved (expected: unique type and state names)")
            names.add(n)
        types[name] = CellType(name=name, markers=list(spec[species]), source=spec["source"],
                               states=states)
    return Panel(species=species, types=types, path=str(path))


# --- signatures ---------------------------------------------------------------------------------

def load_signatures(path: str | Path, species: str) -> dict[str, list[str]]:
    """Gene symbols of every signature in ``path`` for ``species`` (mouse or human).

    The file holds ``signatures: {id: {mouse: [...], human: [...], source: ...}}``. A signature
    without a list for ``species`` gets an empty list (its coverage is then zero).
    """
    doc = load_yaml(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("signatures"), dict) or not doc["signatures"]:
        raise ConfigError(f"{path}: field 'signatures': missing or empty "
                          "(expected: a mapping of signature id -> {mouse: [...], human: [...]})")
    if species not in ("mouse", "human"):
        raise ConfigError(f"{path}: unknown species {species!r} (expected: mouse or human)")
    out: dict[str, list[str]] = {}
    for sid, entry in doc["signatures"].items():
        if not isinstance(entry, dict):
            raise ConfigError(f"{path}: field 'signatures.{sid}': expected a mapping with "
                              "'mouse' and 'human' gene lists")
        genes = entry.get(species, [])
        if not isinstance(genes, list) or not all(isinstance(g, str) for g in genes):
            raise ConfigError(f"{path}: field 'signatures.{sid}.{species}': expected a list of "
                              "gene symbols")
        out[str(sid)] = list(dict.fromkeys(genes))
    return out


# --- claims catalogue ---------------------------------------------------------------------------

def load_catalogue(path: str | Path, signatures: Iterable[str] | None = None) -> dict:
    """Read and validate a claims catalogue; with ``signatures`` check every named signature exists."""
    doc = validate(load_yaml(path), "claims", path)
    ids = [c["id"] for c in doc["claims"]]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ConfigError(f"{path}: field 'claims[].id': duplicated claim ids {dup} (expected: unique)")
    known = set(signatures) if signatures is not None else None
    for i, claim in enumerate(doc["claims"]):
        measure = claim["measure"]
        if measure["type"] == "signature":
            sig = measure.get("signature")
            if not sig:
                raise ConfigError(f"{path}: field 'claims[{i}].measure.signature': missing for "
                                  f"claim '{claim['id']}' (expected: a signature id)")
            if known is not None and sig not in known:
                raise ConfigError(f"{path}: field 'claims[{i}].measure.signature': '{sig}' of claim "
                                  f"'{claim['id']}' is not in the signatures file "
                                  f"(expected one of {sorted(known)})")
        for j, contrast in enumerate(claim["contrasts"]):
            where = f"{path}: field 'claims[{i}].contrasts[{j}]"
            if contrast["type"] == "interaction" and len(set(contrast["levels"])) != 2:
                raise ConfigError(f"{where}.levels': {contrast['levels']} (expected two different "
                                  f"values of '{contrast.get('factor', 'stage')}')")
            if contrast["type"] == "synergy":
                arms = [contrast["arm"], contrast["reference"], *contrast["components"]]
                if len(set(arms)) != 4:
                    raise ConfigError(f"{where}': arm, reference and the two components must be "
                                      f"four different arms (got {arms})")
    return doc

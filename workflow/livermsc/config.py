"""Load and validate the workflow config, study files and sample sheets against JSON schemas.

Every error is a :class:`ConfigError` whose message names the file, the field and what was
expected, so that the Snakefile can stop with one clear line before any job runs. Validation
itself (and the schema defaults) lives in :mod:`livermsc.schema`; its names used across the
stages are re-exported here. :func:`score_settings` and :func:`claims_settings` build the
settings of the score and claims stages from (partial) config sections.
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd

from livermsc.schema import REPO_ROOT as REPO_ROOT
from livermsc.schema import SCHEMA_DIR as SCHEMA_DIR
from livermsc.schema import ConfigError as ConfigError
from livermsc.schema import coerce_strings, schema_of, section_settings
from livermsc.schema import load_yaml as load_yaml
from livermsc.schema import validate as validate
from livermsc.simulate import design


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
    def pairs(self) -> dict[str, str]:
        """Sample -> pair id from the declared ``paired_by`` column ({} when none is declared)."""
        column = self.spec.get("paired_by")
        if not column:
            return {}
        return {str(s): str(v) for s, v in self.samples[column].items()}

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
            f"mapped to arms. Download them (livermsc download {path}), draft a "
            f"sheet from the archive (livermsc draft-sheet <RAW.tar>), fill in arm and "
            f"animal per sample from the paper, add it as 'samples' or 'sample_sheet', then set "
            f"'status: ready' (see README, 'Adding a study')."
        )
    if spec.get("status") == "needs_review":
        raise ConfigError(
            f"{path}: field 'status': this study was drafted from GEO metadata and its arms, "
            f"animals and files are guesses. Check every line marked 'REVIEW' against the paper "
            f"(arm, animal, path/format or split_value per sample), then set 'status: ready'."
        )
    if spec["source"] == "simulate":
        sheet = design(spec["simulate"], species=spec["species"])
        source = f"{path} (simulated design)"
    elif "samples" in spec:
        sheet = pd.DataFrame(spec["samples"]).astype("string")
        source = path
    else:
        sheet_path = (path.parent / spec["sample_sheet"]).resolve()
        sheet = read_sample_sheet(sheet_path)
        source = sheet_path
    samples = validate_sample_sheet(sheet, source)
    paired_by = spec.get("paired_by")
    if paired_by and (paired_by not in samples or samples[paired_by].isna().any()):
        raise ConfigError(f"{path}: field 'paired_by': '{paired_by}' is not a column filled for "
                          f"every sample of {source} (expected: a sample-sheet column such as "
                          "donor or animal naming the matched unit of each sample)")
    study = Study(id=study_id, spec=spec, samples=samples, path=path)
    if spec["source"] == "local":  # fetched studies: checked with their plan (livermsc.fetch)
        check_sample_paths(samples, source, study.data_dir)
        check_local_files(spec, samples, source, study.data_dir)
    if spec["source"] in ("geo", "url") and "format" in samples:
        layouts = {f["name"]: f.get("layout", "raw_tar") for f in spec.get("files") or []}
        for sample, row in samples[samples["format"] == "seurat"].iterrows():
            if layouts.get(row.get("file")) != "sample_file":
                raise ConfigError(
                    f"{source}: sample '{sample}', field 'format': seurat (expected for a "
                    f"downloaded Seurat object: a 'file' column naming a files entry with layout "
                    f"sample_file; to split one object into samples, download it and use a local "
                    f"study with a combined file)")
    return study


def check_sample_paths(samples: pd.DataFrame, source: str | Path, data_dir: str) -> None:
    """Refuse a sample ``path`` that is absolute or leads outside the study's data folder."""
    paths = samples["path"].dropna() if "path" in samples else pd.Series(dtype=str)
    for sample, value in paths.items():
        text = str(value)
        normal = posixpath.normpath(text.replace("\\", "/"))
        if PurePosixPath(normal).is_absolute() or normal == ".." or normal.startswith("../"):
            raise ConfigError(
                f"{source}: sample '{sample}', field 'path': '{text}' points outside "
                f"the study's data folder {data_dir}/ (expected: a path inside it, relative to it)")


def combined_entry(spec: Mapping, row: Mapping) -> dict | None:
    """The ``files`` entry (layout combined) a local sample is cut from; None for its own file."""
    value = row.get("split_value")
    if value is None or pd.isna(value):
        return None
    combined = [f for f in spec.get("files") or [] if f.get("layout") == "combined"]
    name = row.get("file")
    if name is not None and not pd.isna(name):
        combined = [f for f in combined if f["name"] == name]
    return combined[0] if len(combined) == 1 else None


def check_local_files(spec: Mapping, samples: pd.DataFrame, source: str | Path,
                      data_dir: str) -> None:
    """A local study's combined/annotation files stay in its data folder and each sample
    has a file: its own ``path``, or a ``split_value`` of exactly one combined file."""
    files = spec.get("files") or []
    for i, f in enumerate(files):
        def where(sub: str = "", i: int = i) -> str:
            return f"{source}: field 'files[{i}]{sub}'"

        rel = str(f.get("path", f["name"]))
        normal = posixpath.normpath(rel.replace("\\", "/"))
        if PurePosixPath(normal).is_absolute() or normal == ".." or normal.startswith("../"):
            raise ConfigError(f"{where('.path')}: '{rel}' points outside the study's data folder "
                              f"{data_dir}/ (expected: a path inside it, relative to it)")
        if f.get("layout") not in ("combined", "annotation"):
            raise ConfigError(f"{where('.layout')}: '{f.get('layout', 'raw_tar')}' (expected for a "
                              f"local study: combined or annotation; a sample's own file is "
                              f"its row's 'path')")
        if f["layout"] == "annotation":
            continue
        split = f.get("split") or {}
        need = {"obs": ["column"], "barcode": ["pattern"],
                "table": ["table", "cell_column", "sample_column"]}.get(split.get("by"), ["by"])
        missing = [k for k in need if not split.get(k)] + ([] if f.get("format") else ["format"])
        if missing:
            raise ConfigError(f"{where()}: a combined file needs 'format' and 'split' with {need} "
                              f"(missing: {missing})")
        if split["by"] == "obs" and f["format"] not in ("h5ad", "seurat"):
            raise ConfigError(f"{where('.split')}: by obs needs format h5ad or seurat (got "
                              f"'{f['format']}'; expected by: barcode or by: table)")
        if split["by"] == "table" and not any(
                g["name"] == split["table"] and g.get("layout") == "annotation" for g in files):
            raise ConfigError(f"{where('.split.table')}: '{split['table']}' (expected: the name of "
                              f"another files entry with layout annotation)")
    combined = sorted(f["name"] for f in files if f.get("layout") == "combined")
    for sample, row in samples.iterrows():
        value, rel = row.get("split_value"), row.get("path")
        if value is None or pd.isna(value):
            if rel is None or pd.isna(rel):
                raise ConfigError(f"{source}: sample '{sample}': field 'path' is required "
                                  f"(or 'split_value' for a sample of a combined file)")
        elif combined_entry(spec, row) is None:
            raise ConfigError(
                f"{source}: sample '{sample}', field 'file': cannot tell which combined file "
                f"holds this sample (combined files: {combined or 'none'}; expected: exactly one "
                f"files entry with layout combined, or a 'file' column naming it)")


def load_config(config: Mapping, source: str = "config") -> tuple[dict, dict[str, Study]]:
    """Validate the workflow config and every study it selects; return (config, studies)."""
    cfg = validate(coerce_strings(dict(config), schema_of("config")),
                   "config", source)
    studies_dir = Path(cfg["studies_dir"])
    if not studies_dir.is_absolute():
        studies_dir = Path.cwd() / studies_dir
    studies = {sid: load_study(sid, studies_dir) for sid in cfg["studies"]}
    return cfg, studies


def arms_without_claims(studies: Mapping[str, Study], catalogue: Mapping) -> dict[str, list[str]]:
    """Per study, the arms of its sample sheet that no contrast of the claims catalogue names.

    Such arms are allowed: their samples are still ingested, integrated, clustered and scored
    (they shape the embedding and, with ``claims.pool_arms``, help to estimate batch effects),
    but no claim compares them. The workflow and ``livermsc validate`` list them as a note.
    """
    used = {arm for claim in catalogue.get("claims", []) for contrast in claim.get("contrasts", [])
            for arm in (contrast.get("arm"), contrast.get("reference"),
                        *contrast.get("components", []))}
    out = {}
    for sid, study in studies.items():
        unused = sorted(set(study.samples["arm"].astype(str)) - used)
        if unused:
            out[sid] = unused
    return out


def unused_arm_notes(studies: Mapping[str, Study], catalogue_path: str | Path) -> list[str]:
    """One line per study with arms no claim uses (empty when every arm is used)."""
    catalogue = load_yaml(catalogue_path) or {}
    return [f"note: study '{sid}' ({studies[sid].path}): arm(s) {', '.join(arms)} are used by no "
            f"claim in {catalogue_path}; their samples are analysed but not compared"
            for sid, arms in arms_without_claims(studies, catalogue).items()]


# --- settings of the score and claims stages ------------------------------------------------------

def score_settings(cfg: Mapping | None) -> dict[str, Any]:
    """The ``score`` section validated against score.schema.yaml, its defaults filled."""
    return section_settings(cfg, "score", "score")


def claims_settings(cfg: Mapping | None) -> dict[str, Any]:
    """The ``claims`` section validated against claims_config.schema.yaml, its defaults filled."""
    return section_settings(cfg, "claims_config", "claims")

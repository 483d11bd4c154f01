"""Fetch a public study's files and unpack them into one input per sample (the fetch stage).

Two steps, two rules:

* **download** (``fetch_file``, run where there is network): each study file comes from the shared
  cache (``fetch.cache_dir``) or is downloaded (:mod:`livermsc.transfer`: retries, resume,
  checksums, atomic placement) from its URL (:mod:`livermsc.geo` builds GEO's); in offline mode
  only files already present are used. Every outcome is recorded in ``checksums.tsv``.
* **unpack** (``unpack_<study>``): every sample lands at ``<data_dir>/<path>`` as named in the
  sample sheet, where ingest reads it (:mod:`livermsc.unpack`: RAW.tar members regrouped into 10x
  folders, per-sample files linked into place, combined matrices split).

:func:`plan_study` checks, before any job runs, that every sample of a study can be found in its
files. Sample-sheet columns used here (all optional, all kept as sample annotations): ``gsm``
(GEO sample accession: picks the sample's members of a RAW.tar by prefix), ``member`` (regex,
case-insensitive, on member names; overrides the GSM prefix), ``file`` (name of the study file
holding the sample) and ``split_value`` (the sample's value of a combined file's split key).

``livermsc download STUDY.yaml`` downloads a study's files outside the workflow;
``livermsc draft-sheet ARCHIVE`` drafts a sample sheet from a RAW.tar.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from livermsc.config import ConfigError, Study, load_study, load_yaml, validate
from livermsc.geo import geo_base, geo_url
from livermsc.transfer import (
    ChecksumMismatch,
    FetchError,
    FetchSettings,
    download,
    hash_file,
    locked,
    place,
    record_checksum,
    sidecar_sha256,
)
from livermsc.unpack import (
    Archive,
    check_10x_folder,
    copy_sample_file,
    extract_sample,
    split_combined,
)

log = logging.getLogger("livermsc.fetch")


class FetchConfigError(ConfigError):
    """A study's files or sample sheet cannot be fetched as written."""


# --- the plan: what to download for a study, and where each sample comes from --------------------


@dataclass(frozen=True)
class FileSpec:
    """One downloadable file of a study, with its URL resolved."""

    name: str
    url: str
    layout: str = "raw_tar"
    sha256: str | None = None
    md5: str | None = None
    size: int | None = None
    format: str | None = None
    orientation: str = "genes_x_cells"
    split: dict = field(default_factory=dict)
    cache_key: str = ""


@dataclass(frozen=True)
class SamplePlan:
    """Where one sample's counts come from and where they go."""

    sample: str
    path: str
    format: str
    file: str
    gsm: str | None = None
    member: str | None = None
    split_value: str | None = None

    @property
    def is_dir(self) -> bool:
        return self.format == "10x_mtx"


@dataclass(frozen=True)
class StudyPlan:
    """Everything the fetch and unpack steps of one study need (plain data, picklable)."""

    study: str
    study_file: str
    files: dict[str, FileSpec]
    samples: list[SamplePlan]
    downloads_dir: str
    data_dir: str

    def download_paths(self) -> list[str]:
        return [f"{self.downloads_dir}/{name}" for name in self.files]

    def sample_outputs(self) -> list[tuple[str, bool]]:
        """(path, is_dir) of every sample's unpacked input."""
        return [(f"{self.data_dir}/{s.path}", s.is_dir) for s in self.samples]

    def as_dict(self, for_unpack: bool = False) -> dict:
        """Plain data; ``for_unpack`` leaves out URLs and cache keys, so that changing a mirror
        does not make Snakemake unpack again (the dict is the unpack rule's params)."""
        d = asdict(self)
        if for_unpack:
            for f in d["files"].values():
                f["url"], f["cache_key"] = "", ""
        return d

    @classmethod
    def from_dict(cls, d: dict) -> StudyPlan:
        return cls(study=d["study"], study_file=d["study_file"],
                   files={k: FileSpec(**v) for k, v in d["files"].items()},
                   samples=[SamplePlan(**s) for s in d["samples"]],
                   downloads_dir=d["downloads_dir"], data_dir=d["data_dir"])

def file_specs(spec: dict, settings: FetchSettings, source: str | Path) -> dict[str, FileSpec]:
    """Resolve a study spec's ``files`` into :class:`FileSpec` objects (URLs built here)."""
    files = spec.get("files") or []
    if not files:
        raise FetchConfigError(f"{source}: field 'files': a {spec['source']} study needs a list of "
                               f"files to download (expected: at least one entry with a 'name')")
    out: dict[str, FileSpec] = {}
    for i, f in enumerate(files):
        name = f["name"]
        where = f"{source}: field 'files[{i}]'"
        if name in out:
            raise FetchConfigError(f"{where}: duplicated file name '{name}'")
        if f.get("url"):
            url = f["url"].replace("{base_url}", geo_base(settings))
            key = f.get("acc") or spec.get("accession") or spec["id"]
        else:
            acc = f.get("acc") or spec.get("accession")
            if not acc or not re.fullmatch(r"GS[EM]\d+", acc):
                raise FetchConfigError(
                    f"{where}: no URL for '{name}': give 'url', or a GEO 'accession' for the study "
                    f"(or 'acc' for the file), e.g. accession: GSE136103")
            url = geo_url(acc, name, settings)
            key = acc
        layout = f.get("layout", "raw_tar")
        if layout == "combined":
            split = f.get("split") or {}
            need = {"barcode": ["pattern"], "table": ["table", "cell_column", "sample_column"],
                    "obs": ["column"]}.get(split.get("by", ""), ["by"])
            missing = [k for k in need if not split.get(k)]
            if missing or not f.get("format"):
                raise FetchConfigError(
                    f"{where}: a combined file needs 'format' and 'split' with {need} "
                    f"(missing: {missing or ['format']})")
            if split["by"] == "obs" and f["format"] != "h5ad":
                raise FetchConfigError(f"{where}: split by obs needs format h5ad")
            if split["by"] in ("barcode", "table") and f["format"] == "h5ad":
                raise FetchConfigError(f"{where}: an h5ad is split by obs (split: {{by: obs, column: ...}})")
            if split["by"] == "barcode":
                try:
                    if re.compile(split["pattern"]).groups < 1:
                        raise re.error("no group")
                except re.error as err:
                    raise FetchConfigError(f"{where}.split.pattern: '{split['pattern']}' is not a "
                                           f"regex with one group ({err})") from None
        out[name] = FileSpec(name=name, url=url, layout=layout, sha256=f.get("sha256"),
                             md5=f.get("md5"), size=f.get("size"), format=f.get("format"),
                             orientation=f.get("orientation", "genes_x_cells"),
                             split=dict(f.get("split") or {}), cache_key=key)
    for name, fs in out.items():
        if fs.layout == "combined" and fs.split.get("by") == "table":
            table = fs.split["table"]
            if table not in out or out[table].layout != "annotation":
                raise FetchConfigError(f"{source}: file '{name}': split table '{table}' must be "
                                       f"another entry of 'files' with layout annotation")
    return out


def _cell(row: pd.Series, col: str) -> str | None:
    value = row.get(col)
    return None if value is None or pd.isna(value) or str(value) == "" else str(value)


def plan_study(study: Study, settings: FetchSettings) -> StudyPlan:
    """Check that every sample of a fetched study can be found in its files; return the plan.

    Raises :class:`FetchConfigError` naming the study file, the sample and the field at fault.
    """
    source = study.path
    files = file_specs(study.spec, settings, source)
    by_layout: dict[str, list[str]] = {}
    for name, fs in files.items():
        by_layout.setdefault(fs.layout, []).append(name)
    samples: list[SamplePlan] = []
    used_sample_files: dict[str, str] = {}
    seen_paths: dict[str, str] = {}
    for sid, row in study.samples.iterrows():
        where = f"{source}: sample '{sid}'"
        fmt = _cell(row, "format")
        path = _cell(row, "path") or ""
        if fmt is None:
            raise FetchConfigError(f"{where}: field 'format' is required for fetched studies "
                                   f"(expected: 10x_mtx, 10x_h5, h5ad, csv or tsv)")
        parts = Path(path).parts
        if (not path or Path(path).is_absolute() or ".." in parts
                or parts[0] in ("downloads", "fetch_manifest.tsv", "checksums.tsv")):
            raise FetchConfigError(f"{where}: field 'path': '{path}' (expected: a relative path "
                                   f"inside the study's data folder, not under downloads/ and "
                                   f"not fetch_manifest.tsv or checksums.tsv)")
        if path in seen_paths:
            raise FetchConfigError(f"{where}: field 'path': '{path}' is also the path of sample "
                                   f"'{seen_paths[path]}' (expected: one path per sample)")
        seen_paths[path] = str(sid)
        gsm, member = _cell(row, "gsm"), _cell(row, "member")
        fname, split_value = _cell(row, "file"), _cell(row, "split_value")
        if member:
            try:
                re.compile(member)
            except re.error as err:
                raise FetchConfigError(f"{where}: field 'member': '{member}' is not a valid "
                                       f"regex ({err})") from None
        if fname is None:
            if split_value is not None:
                candidates = by_layout.get("combined", [])
            elif gsm or member:
                candidates = by_layout.get("raw_tar", [])
            else:
                candidates = [n for n, fs in files.items() if fs.layout != "annotation"]
            if len(candidates) != 1:
                raise FetchConfigError(
                    f"{where}: field 'file': cannot tell which file holds this sample "
                    f"(candidates: {candidates or 'none'}); name it in a 'file' column")
            fname = candidates[0]
        if fname not in files:
            raise FetchConfigError(f"{where}: field 'file': '{fname}' is not one of the study's "
                                   f"files {sorted(files)}")
        layout = files[fname].layout
        if layout == "raw_tar" and not (gsm or member):
            raise FetchConfigError(f"{where}: sample of archive '{fname}' needs 'gsm' (GEO sample "
                                   f"accession) or 'member' (regex on member names)")
        if layout == "combined":
            if split_value is None:
                raise FetchConfigError(f"{where}: sample of combined file '{fname}' needs "
                                       f"'split_value' (its value of the split key)")
            want = "h5ad" if files[fname].format == "h5ad" else "10x_mtx"
            if fmt != want:
                raise FetchConfigError(f"{where}: field 'format': '{fmt}' (expected: {want}; "
                                       f"split samples of '{fname}' are written as {want})")
        if layout == "sample_file":
            if fname in used_sample_files:
                raise FetchConfigError(f"{where}: file '{fname}' already holds sample "
                                       f"'{used_sample_files[fname]}' (layout sample_file is one "
                                       f"sample per file; use combined to split)")
            used_sample_files[fname] = str(sid)
        if layout == "annotation":
            raise FetchConfigError(f"{where}: file '{fname}' has layout annotation and holds no counts")
        samples.append(SamplePlan(sample=str(sid), path=path, format=fmt, file=fname, gsm=gsm,
                                  member=member, split_value=split_value))
    unused = [n for n, fs in files.items() if fs.layout != "annotation"
              and not any(s.file == n for s in samples)]
    if unused:
        log.debug("%s: files not used by any sample: %s", source, unused)
    return StudyPlan(study=study.id, study_file=str(source), files=files, samples=samples,
                     downloads_dir=f"resources/{study.id}/downloads", data_dir=study.data_dir)


# --- downloading ------------------------------------------------------------------------------------


def fetch_file(fs: FileSpec, dest: str | Path, settings: FetchSettings, *, study: str,
               study_file: str = "", checksums: str | Path | None = None,
               sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    """Make ``dest`` hold file ``fs`` of ``study``: from the shared cache, else by download.

    With ``settings.offline`` nothing is downloaded: a missing file is a clear error that says
    where to put it. The outcome is recorded in ``checksums`` (a TSV) when given.
    """
    dest = Path(dest)
    label = f"{study}/{fs.name}"
    hint = (f"If the file changed on the server, check it and update 'sha256'/'md5' of "
            f"'{fs.name}' in {study_file}." if study_file else "")
    cached = Path(settings.cache_dir) / fs.cache_key / fs.name if settings.cache_dir else None

    def offline_error() -> FetchError:
        where = f"{dest}" + (f" (or {cached})" if cached else "")
        pin = f", sha256 {fs.sha256}" if fs.sha256 else (f", md5 {fs.md5}" if fs.md5 else "")
        return FetchError(
            f"{label}: offline mode (fetch.offline: true) and the file is not present. Put it at "
            f"{where}; on a machine with network it is at {fs.url}{pin}.")

    if cached is not None:
        with locked(cached.with_name(cached.name + ".lock")):
            if cached.exists():
                got_sha, got_md5, nbytes = hash_file(cached)
                want = fs.sha256 or sidecar_sha256(cached)
                bad = ((want and got_sha.lower() != want.lower())
                       or (fs.md5 and got_md5.lower() != fs.md5.lower()))
                if bad:
                    raise ChecksumMismatch(
                        f"{label}: the cached copy {cached} does not match its checksum "
                        f"(sha256 {got_sha}, expected {want or fs.md5}); delete it to download "
                        f"again. {hint}".rstrip())
                status = "verified" if (fs.sha256 or fs.md5) else "recorded"
                result = {"sha256": got_sha, "md5": got_md5, "bytes": nbytes, "attempts": 0,
                          "status": status}
                log.info("%s: found in cache %s (%d bytes)", label, cached, nbytes)
            elif settings.offline:
                raise offline_error()
            else:
                result = download(fs.url, cached, sha256=fs.sha256, md5=fs.md5, size=fs.size,
                                  settings=settings, label=label, sleep=sleep, hint=hint)
                cached.with_name(cached.name + ".sha256").write_text(
                    f"{result['sha256']}  {fs.name}\n")
        used = place(cached, dest, settings.link_mode)
        os.utime(dest)
        log.info("%s: placed at %s (%s)", label, dest, used)
    else:
        if settings.offline:
            raise offline_error()
        result = download(fs.url, dest, sha256=fs.sha256, md5=fs.md5, size=fs.size,
                          settings=settings, label=label, sleep=sleep, hint=hint)
    if result["status"] == "recorded":
        log.warning("%s: no checksum is known for this file; recorded sha256 %s%s. Pin it by "
                    "adding 'sha256: %s' to the file's entry in %s.", label, result["sha256"],
                    f" in {checksums}" if checksums else "", result["sha256"],
                    study_file or "the study file")
    if checksums is not None:
        record_checksum(checksums, {
            "file": fs.name, "sha256": result["sha256"], "md5": result["md5"],
            "bytes": result["bytes"], "status": result["status"], "url": fs.url,
            "recorded_at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    return result


def download_study(study_file: str | Path, settings: FetchSettings,
                   dest: str | Path | None = None) -> None:
    """Download every file of a study file into ``dest`` (default resources/<id>/downloads),
    outside the workflow and without a sample sheet; files already there are skipped."""
    spec = validate(load_yaml(study_file), "study", study_file)
    files = file_specs(spec, settings, study_file)
    dest = Path(dest) if dest else Path("resources") / spec["id"] / "downloads"
    for fs in files.values():
        target = dest / fs.name
        if target.exists():
            log.info("%s exists; skipped", target)
            continue
        fetch_file(fs, target, settings, study=spec["id"], study_file=str(study_file),
                   checksums=dest.parent / "checksums.tsv")


# --- unpacking -------------------------------------------------------------------------------------


def verify_downloads(plan: StudyPlan) -> None:
    """Check every download (including files placed by hand) against the known checksums."""
    for fs in plan.files.values():
        path = Path(plan.downloads_dir) / fs.name
        if not path.exists():
            raise FetchError(f"{plan.study}: {path} is missing")
        if not (fs.sha256 or fs.md5):
            continue
        got_sha, got_md5, _ = hash_file(path)
        if (fs.sha256 and got_sha.lower() != fs.sha256.lower()) or (
                fs.md5 and got_md5.lower() != fs.md5.lower()):
            raise ChecksumMismatch(
                f"{plan.study}: {path} does not match the checksum in {plan.study_file} "
                f"(sha256 {got_sha}); replace the file or fix the checksum")


def _stage_path(tmp: Path, s: SamplePlan) -> Path:
    """Where a sample's output is written before it is moved into place (same suffixes)."""
    return tmp / s.sample if s.is_dir else tmp / (s.sample + "".join(Path(s.path).suffixes))


def unpack_study(plan: StudyPlan, manifest: str | Path | None = None) -> pd.DataFrame:
    """Put every sample's counts at ``<data_dir>/<path>``; write and return a manifest table."""
    verify_downloads(plan)
    data_dir = Path(plan.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(dir=data_dir, prefix=".unpack-") as tmpname:
        tmp = Path(tmpname)
        staged: dict[str, Path] = {}
        by_file: dict[str, list[SamplePlan]] = {}
        for s in plan.samples:
            by_file.setdefault(s.file, []).append(s)
        for fname, samples in by_file.items():
            fs = plan.files[fname]
            src = Path(plan.downloads_dir) / fname
            if fs.layout == "raw_tar":
                archive = Archive(src)
                try:
                    for s in samples:
                        where = f"{plan.study_file}: sample '{s.sample}'"
                        staged[s.sample] = _stage_path(tmp, s)
                        members = extract_sample(archive, staged[s.sample], s.format, s.gsm,
                                                 s.member, where)
                        rows.append({"sample": s.sample, "source": fname,
                                     "members": ";".join(members)})
                finally:
                    archive.close()
            elif fs.layout == "sample_file":
                s = samples[0]
                staged[s.sample] = _stage_path(tmp, s)
                copy_sample_file(src, staged[s.sample])
                rows.append({"sample": s.sample, "source": fname, "members": ""})
            elif fs.layout == "combined":
                values = {s.split_value: s.sample for s in samples}
                split = split_combined(src, fs.format or "", fs.orientation, fs.split, values,
                                       tmp, f"{plan.study}/{fname}")
                for sample, (out, _, _) in split.items():
                    staged[sample] = Path(out)
                    rows.append({"sample": sample, "source": fname, "members": ""})
        dims = [check_10x_folder(staged[s.sample]) if s.is_dir else (None, None)
                for s in plan.samples]  # before anything is moved into place
        for s in plan.samples:
            final = data_dir / s.path
            if final.is_dir() and not final.is_symlink():
                shutil.rmtree(final)
            elif final.exists() or final.is_symlink():
                final.unlink()
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged[s.sample], final)
    table = pd.DataFrame(rows).set_index("sample").loc[[s.sample for s in plan.samples]]
    table.insert(0, "path", [f"{plan.data_dir}/{s.path}" for s in plan.samples])
    table.insert(1, "format", [s.format for s in plan.samples])
    table["n_features"] = [d[0] for d in dims]
    table["n_barcodes"] = [d[1] for d in dims]
    for s, (nf, nb) in zip(plan.samples, dims, strict=True):
        log.info("%s: sample %s -> %s (%s)", plan.study, s.sample, f"{plan.data_dir}/{s.path}",
                 f"{nf} features x {nb} barcodes" if nf is not None else s.format)
    table = table.reset_index()
    if manifest is not None:
        table.to_csv(manifest, sep="\t", index=False)
    return table


# --- Snakemake entry points ------------------------------------------------------------------------


def _study_plan(smk: Any) -> StudyPlan:
    study = load_study(smk.wildcards.study, smk.config["studies_dir"])
    return plan_study(study, FetchSettings.from_config(smk.config.get("fetch")))


def rule_fetch_file(smk: Any) -> None:
    """Rule ``fetch_file``: one study file into ``resources/<study>/downloads/<file>``."""
    plan = _study_plan(smk)
    fs = plan.files[smk.wildcards.file]
    fetch_file(fs, smk.output[0], FetchSettings.from_config(smk.config.get("fetch")),
               study=plan.study, study_file=plan.study_file,
               checksums=Path(plan.downloads_dir).parent / "checksums.tsv")


def rule_unpack(smk: Any) -> None:
    """Rules ``unpack_<study>``: every sample's counts at ``<data_dir>/<path>``."""
    unpack_study(StudyPlan.from_dict(smk.params.plan), smk.output.manifest)

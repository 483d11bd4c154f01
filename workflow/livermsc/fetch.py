"""Fetch a public study's files and unpack them into one input per sample.

Two steps, two rules:

* **download** (``fetch_file``, run where there is network): HTTPS with retries and exponential
  back-off, resume of partial downloads (HTTP Range), checksum verification (SHA-256 or MD5; a
  checksum is recorded on first download when none is known), atomic placement (the data go to
  ``<dest>.part`` and are renamed only once complete and verified), an optional shared cache
  (``fetch.cache_dir``) and an offline mode that only uses files already present.
* **unpack** (``unpack_<study>``): GEO ``RAW.tar`` archives are regrouped per sample into 10x
  folders (``barcodes`` + ``genes``/``features`` + ``matrix``, gzipped), per-sample files are linked
  into place and combined matrices are split into one 10x folder (or h5ad) per sample. Every
  sample lands at ``<data_dir>/<path>`` as named in the sample sheet, where ingest reads it.

Sample-sheet columns used here (all optional, all kept as sample annotations):
``gsm`` (GEO sample accession: picks the sample's members of a RAW.tar by prefix), ``member``
(regex, case-insensitive, on member names; overrides the GSM prefix), ``file`` (name of the
study file holding the sample) and ``split_value`` (the sample's value of a combined file's split
key).

``python -m livermsc.fetch download STUDY.yaml`` downloads a study's files outside the workflow;
``python -m livermsc.fetch sheet ARCHIVE`` drafts a sample sheet from a RAW.tar.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import fcntl
import gzip
import hashlib
import http.client
import io
import logging
import os
import re
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd
import scipy.io
import scipy.sparse as sp

from livermsc.config import ConfigError, Study, load_yaml, validate

log = logging.getLogger("livermsc.fetch")

GEO_BASE = {"ftp": "https://ftp.ncbi.nlm.nih.gov/geo", "cgi": "https://www.ncbi.nlm.nih.gov/geo"}
RETRYABLE_HTTP = {408, 425, 429, 500, 502, 503, 504}
CHUNK = 1 << 20
MB = 1 << 20
TENX_ROLE = re.compile(r"(?i)(?:^|[/_.-])(barcodes|genes|features|matrix)\.(tsv|mtx)(\.gz)?$")
NESTED_TAR = re.compile(r"(?i)\.(tar|tar\.gz|tgz)$")
FORMAT_SUFFIX = {
    "10x_h5": re.compile(r"(?i)\.h5$"),
    "h5ad": re.compile(r"(?i)\.h5ad(\.gz)?$"),
    "csv": re.compile(r"(?i)\.(csv|txt)(\.gz)?$"),
    "tsv": re.compile(r"(?i)\.(tsv|txt)(\.gz)?$"),
}
CHECKSUM_COLUMNS = ["file", "sha256", "md5", "bytes", "status", "url", "recorded_at"]


class FetchError(RuntimeError):
    """A download or unpack failed; the message names the file, the study and what to do."""


class ChecksumMismatch(FetchError):
    """A file's checksum differs from the one in the study file (the file was deleted)."""


class FetchConfigError(ConfigError):
    """A study's files or sample sheet cannot be fetched as written."""


class _Transient(Exception):
    """A failure worth retrying (server error, dropped connection, truncated body)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


# --- settings and plans ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FetchSettings:
    """The ``fetch:`` section of the config (see workflow/schemas/fetch.schema.yaml)."""

    base_url: str = ""
    geo_url_style: str = "ftp"
    cache_dir: str = ""
    offline: bool = False
    retries: int = 5
    backoff_s: float = 2.0
    backoff_max_s: float = 60.0
    timeout_s: float = 60.0
    progress_mb: float = 100.0
    link_mode: str = "hardlink"
    keep_downloads: bool = True
    user_agent: str = "livermsc-fetch/0.1"

    @classmethod
    def from_config(cls, cfg: dict | None) -> FetchSettings:
        """Settings from a (validated) ``fetch:`` config section; unknown keys are ignored."""
        cfg = dict(cfg or {})
        known = {k: cfg[k] for k in cls.__dataclass_fields__ if k in cfg}
        return cls(**known)

    @property
    def geo_base(self) -> str:
        """Base URL of GEO for the chosen URL style (``base_url`` or the style's default)."""
        return (self.base_url or GEO_BASE[self.geo_url_style]).rstrip("/")


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


def geo_stem(acc: str) -> str:
    """GEO's folder stem of an accession: GSE136103 -> GSE136nnn, GSE1234 -> GSE1nnn, GSE12 -> GSEnnn."""
    m = re.fullmatch(r"(GSE|GSM|GPL|GDS)(\d+)", acc)
    if not m:
        raise ValueError(f"'{acc}' is not a GEO series or sample accession (expected GSE123 or GSM123)")
    prefix, digits = m.groups()
    return f"{prefix}{digits[:-3]}nnn"


def geo_url(acc: str, name: str, settings: FetchSettings) -> str:
    """URL of a GEO supplementary file (``ftp`` style: the HTTPS mirror of GEO's FTP tree;
    ``cgi`` style: ``/geo/download/?acc=...&format=file[&file=...]``)."""
    base = settings.geo_base
    if settings.geo_url_style == "cgi":
        url = f"{base}/download/?acc={acc}&format=file"
        if name != f"{acc}_RAW.tar":
            url += "&file=" + urllib.parse.quote(name, safe="")
        return url
    kind = "series" if acc.startswith("GSE") else "samples"
    return f"{base}/{kind}/{geo_stem(acc)}/{acc}/suppl/{urllib.parse.quote(name)}"


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
            url = f["url"].replace("{base_url}", settings.geo_base)
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


def hash_file(path: str | Path) -> tuple[str, str, int]:
    """(sha256, md5, size) of a file, read in 1 MiB chunks."""
    sha, md5, n = hashlib.sha256(), hashlib.md5(), 0
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            sha.update(chunk)
            md5.update(chunk)
            n += len(chunk)
    return sha.hexdigest(), md5.hexdigest(), n


def _content_range(header: str | None) -> tuple[int | None, int | None]:
    """(start, total) of a ``Content-Range: bytes a-b/T`` (or ``bytes */T``) header."""
    if not header:
        return None, None
    m = re.match(r"bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)", header.strip())
    if not m:
        return None, None
    start = int(m.group(1)) if m.group(1) is not None else None
    total = int(m.group(2)) if m.group(2) != "*" else None
    return start, total


def _retry_after(headers: Any) -> float | None:
    value = headers.get("Retry-After") if headers is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


class _Progress:
    """Log a line every ``every_mb`` MB (with percent and rate when the size is known)."""

    def __init__(self, label: str, total: int | None, start: int, every_mb: float) -> None:
        self.label, self.total, self.start = label, total, start
        self.every = max(1, int(every_mb * MB))
        self.next = (start // self.every + 1) * self.every
        self.t0 = time.monotonic()
        self.logged = start

    def update(self, done: int, final: bool = False) -> None:
        if (done < self.next and not final) or done == self.logged:
            return
        while self.next <= done:
            self.next += self.every
        self.logged = done
        rate = (done - self.start) / MB / max(time.monotonic() - self.t0, 1e-6)
        if self.total:
            log.info("%s: %.1f / %.1f MB (%.0f%%), %.1f MB/s", self.label, done / MB,
                     self.total / MB, 100 * done / self.total, rate)
        else:
            log.info("%s: %.1f MB, %.1f MB/s", self.label, done / MB, rate)


def _attempt(url: str, part: Path, settings: FetchSettings, label: str) -> bool:
    """One HTTP request, appending to ``part`` from its current size. Returns True if resumed.

    Raises :class:`_Transient` for what a retry may fix and :class:`FetchError` otherwise.
    """
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": settings.user_agent, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        resp = urllib.request.urlopen(request, timeout=settings.timeout_s)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:
            _, total = _content_range(err.headers.get("Content-Range"))
            if total == offset:
                log.info("%s: already complete (%d bytes)", label, offset)
                return True
            part.unlink()
            raise _Transient(f"server refused to resume at byte {offset}; restarting") from None
        if err.code in RETRYABLE_HTTP or err.code >= 500:
            raise _Transient(f"HTTP {err.code} {err.reason}", _retry_after(err.headers)) from None
        raise FetchError(f"{label}: HTTP {err.code} {err.reason} for {url}") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
        raise _Transient(f"{type(err).__name__}: {getattr(err, 'reason', err)}") from None
    with resp:
        status = resp.status
        length = resp.headers.get("Content-Length")
        total: int | None = None
        if status == 206:
            start, total = _content_range(resp.headers.get("Content-Range"))
            if start != offset:
                part.unlink(missing_ok=True)
                raise _Transient(f"server resumed at byte {start}, not {offset}; restarting")
            log.info("%s: resuming at %.1f MB", label, offset / MB)
        else:
            if offset:
                log.info("%s: server ignored the Range request; restarting from zero", label)
            offset = 0
        if total is None and length is not None:
            total = offset + int(length)
        done = offset
        progress = _Progress(label, total, offset, settings.progress_mb)
        with open(part, "ab" if offset else "wb") as fh:
            while True:
                try:
                    chunk = resp.read(CHUNK)
                except (http.client.HTTPException, OSError) as err:
                    raise _Transient(f"connection lost after {done} bytes "
                                     f"({type(err).__name__})") from None
                if not chunk:
                    break
                fh.write(chunk)
                done += len(chunk)
                progress.update(done)
            fh.flush()
            os.fsync(fh.fileno())
        progress.update(done, final=True)
    if total is not None and done < total:
        raise _Transient(f"truncated body: got {done} of {total} bytes")
    if total is not None and done > total:
        part.unlink()
        raise _Transient(f"body longer than announced ({done} > {total} bytes); restarting")
    return offset > 0


def download(url: str, dest: str | Path, *, sha256: str | None = None, md5: str | None = None,
             size: int | None = None, settings: FetchSettings | None = None, label: str = "",
             sleep: Callable[[float], None] = time.sleep, hint: str = "") -> dict[str, Any]:
    """Download ``url`` to ``dest`` via ``dest.part``: retry, resume, verify, then rename.

    Returns ``{sha256, md5, bytes, attempts, status}`` where status is ``verified`` (a known
    checksum matched) or ``recorded`` (none was known). A checksum or size mismatch deletes the
    partial file and raises :class:`ChecksumMismatch`; ``hint`` is appended to such errors.
    """
    settings = settings or FetchSettings()
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    label = label or dest.name
    attempts, restarted = 0, False
    while True:
        resumed_any = False
        for attempt in range(1, settings.retries + 2):
            attempts += 1
            log.info("%s: GET %s%s", label, url,
                     f" (attempt {attempt})" if attempt > 1 else "")
            try:
                resumed_any |= _attempt(url, part, settings, label)
                break
            except _Transient as err:
                if attempt > settings.retries:
                    kept = (f" The partial file {part} is kept; run again to resume."
                            if part.exists() else "")
                    raise FetchError(f"{label}: giving up after {attempt} attempts on {url}: "
                                     f"{err}.{kept}") from None
                delay = min(settings.backoff_max_s, settings.backoff_s * 2 ** (attempt - 1))
                if err.retry_after is not None:
                    delay = min(settings.backoff_max_s, max(delay, err.retry_after))
                log.warning("%s: %s; retrying in %.1f s (%d of %d retries left)", label, err,
                            delay, settings.retries - attempt + 1, settings.retries)
                sleep(delay)
        got_sha, got_md5, nbytes = hash_file(part)
        problem = None
        if sha256 and got_sha.lower() != sha256.lower():
            problem = f"sha256 {got_sha}, expected {sha256}"
        elif md5 and got_md5.lower() != md5.lower():
            problem = f"md5 {got_md5}, expected {md5}"
        elif size is not None and nbytes != size:
            problem = f"{nbytes} bytes, expected {size}"
        if problem is None:
            break
        part.unlink()
        if resumed_any and not restarted:
            log.warning("%s: checksum mismatch after a resumed download (%s); the old partial "
                        "data may be stale, downloading again from zero", label, problem)
            restarted = True
            continue
        raise ChecksumMismatch(f"{label}: checksum mismatch for {url}: got {problem}. The "
                               f"download was deleted.{(' ' + hint) if hint else ''}")
    os.replace(part, dest)
    status = "verified" if (sha256 or md5) else "recorded"
    log.info("%s: done, %d bytes, sha256 %s (%s)", label, nbytes, got_sha, status)
    return {"sha256": got_sha, "md5": got_md5, "bytes": nbytes, "attempts": attempts,
            "status": status}


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (created if needed), for shared caches and tables."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def record_checksum(table: str | Path, row: dict[str, Any]) -> None:
    """Add or replace ``row`` (keyed by file) in a checksums TSV, under a lock."""
    table = Path(table)
    with _locked(table.with_name(table.name + ".lock")):
        records: list[dict[str, str]] = []
        if table.exists() and table.stat().st_size:
            with open(table, newline="") as fh:
                records = [r for r in csv.DictReader(fh, delimiter="\t") if r["file"] != row["file"]]
        records.append({c: str(row.get(c, "")) for c in CHECKSUM_COLUMNS})
        tmp = table.with_name(table.name + ".tmp")
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, CHECKSUM_COLUMNS, delimiter="\t", extrasaction="ignore")
            writer.writeheader()
            writer.writerows(sorted(records, key=lambda r: r["file"]))
        os.replace(tmp, table)


def place(src: str | Path, dest: str | Path, mode: str = "hardlink") -> str:
    """Put ``src`` at ``dest`` atomically by hard link (falling back to a copy across file
    systems), symlink or copy. Returns the mode used."""
    src, dest = Path(src), Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".placing")
    tmp.unlink(missing_ok=True)
    used = mode
    if mode == "hardlink":
        try:
            os.link(src, tmp)
        except OSError as err:
            log.info("hard link %s -> %s impossible (%s); copying", src, dest, err.strerror)
            used = "copy"
    if mode == "symlink":
        os.symlink(src.resolve(), tmp)
    if used == "copy":
        shutil.copyfile(src, tmp)
    os.replace(tmp, dest)
    return used


def _sidecar_sha(cached: Path) -> str | None:
    side = cached.with_name(cached.name + ".sha256")
    if side.exists():
        text = side.read_text().split()
        return text[0] if text else None
    return None


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
        with _locked(cached.with_name(cached.name + ".lock")):
            if cached.exists():
                got_sha, got_md5, nbytes = hash_file(cached)
                want = fs.sha256 or _sidecar_sha(cached)
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


# --- unpacking -------------------------------------------------------------------------------------


def _is_gzip(head: bytes) -> bool:
    return head[:2] == b"\x1f\x8b"


def _write_stream(src: IO[bytes], dest: Path, gzip_out: bool) -> None:
    """Copy a binary stream to ``dest``, (de)compressing so that ``dest`` is gzip iff ``gzip_out``."""
    head = src.read(2)
    rest: IO[bytes] = src
    src_gz = _is_gzip(head)
    stream: IO[bytes] = io.BufferedReader(_Prepend(head, rest))  # type: ignore[arg-type]
    if src_gz and not gzip_out:
        stream = gzip.GzipFile(fileobj=stream)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if gzip_out and not src_gz:
        with gzip.open(dest, "wb", compresslevel=4) as out:
            shutil.copyfileobj(stream, out, CHUNK)
    else:
        with open(dest, "wb") as out:
            shutil.copyfileobj(stream, out, CHUNK)


class _Prepend(io.RawIOBase):
    """A raw stream that yields ``head`` and then the rest of ``src``."""

    def __init__(self, head: bytes, src: IO[bytes]) -> None:
        self.head, self.src = head, src

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if self.head:
            n = min(len(b), len(self.head))
            b[:n] = self.head[:n]
            self.head = self.head[n:]
            return n
        data = self.src.read(len(b))
        b[: len(data)] = data
        return len(data)


def _open_text(path: Path) -> IO[str]:
    with open(path, "rb") as fh:
        gz = _is_gzip(fh.read(2))
    return gzip.open(path, "rt") if gz else open(path)


def check_10x_folder(folder: str | Path) -> tuple[int, int]:
    """(n_features, n_barcodes) of a 10x folder, checking the matrix header agrees with both."""
    folder = Path(folder)
    names = {p.name.split(".")[0]: p for p in folder.iterdir()}
    feat = names.get("features") or names.get("genes")
    if not all(k in names for k in ("barcodes", "matrix")) or feat is None:
        raise FetchError(f"{folder}: incomplete 10x folder (has {sorted(p.name for p in folder.iterdir())})")
    with _open_text(names["matrix"]) as fh:
        line = fh.readline()
        while line.startswith("%"):
            line = fh.readline()
        rows, cols, _ = (int(x) for x in line.split())
    with _open_text(feat) as fh:
        n_feat = sum(1 for _ in fh)
    with _open_text(names["barcodes"]) as fh:
        n_bc = sum(1 for _ in fh)
    if (rows, cols) != (n_feat, n_bc):
        raise FetchError(f"{folder}: matrix is {rows} x {cols} but there are {n_feat} "
                         f"features and {n_bc} barcodes: the files do not belong together")
    return n_feat, n_bc


def _tenx_groups(names: list[str]) -> dict[str, dict[str, str]]:
    """Group 10x files by their prefix: {prefix: {barcodes|features|matrix: name}}."""
    groups: dict[str, dict[str, str]] = {}
    for name in names:
        m = TENX_ROLE.search(name)
        if not m:
            continue
        role = m.group(1).lower()
        role = "features" if role == "genes" else role
        prefix = name[: m.start()]
        groups.setdefault(prefix, {})[role] = name
    return {p: g for p, g in groups.items() if set(g) == {"barcodes", "features", "matrix"}}


def _prefer_filtered(options: list[str], what: str) -> str:
    if len(options) == 1:
        return options[0]
    filtered = [o for o in options if "filtered" in o.lower()]
    if len(filtered) == 1:
        log.info("%s: several candidates %s; using the filtered one", what, options)
        return filtered[0]
    raise FetchError(f"{what}: several candidates {options}; add a 'member' regex to the "
                     f"sample row to pick one")


def _write_10x(getter: Callable[[str], IO[bytes]], group: dict[str, str], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for role, name in group.items():
        base = Path(name).name.lower()
        target = "genes" if role == "features" and "genes." in base else role
        suffix = ".mtx.gz" if role == "matrix" else ".tsv.gz"
        with getter(name) as src:
            _write_stream(src, out / f"{target}{suffix}", gzip_out=True)


class _Archive:
    """Read access to the regular members of a tar file (by full name and by base name)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tar = tarfile.open(path, "r:*")
        self.members = {m.name: m for m in self.tar.getmembers() if m.isfile()}

    def names(self) -> list[str]:
        return sorted(self.members)

    def open(self, name: str) -> IO[bytes]:
        fh = self.tar.extractfile(self.members[name])
        if fh is None:
            raise FetchError(f"{self.path}: cannot read member {name}")
        return fh

    def close(self) -> None:
        self.tar.close()


def _select(archive: _Archive, s: SamplePlan, where: str) -> list[str]:
    names = archive.names()
    if s.member:
        rx = re.compile(s.member, re.IGNORECASE)
        hits = [n for n in names if rx.search(Path(n).name)]
        how = f"matches member regex '{s.member}'"
    else:
        rx = re.compile(rf"^{re.escape(s.gsm or '')}(?![0-9])", re.IGNORECASE)
        hits = [n for n in names if rx.search(Path(n).name)]
        how = f"starts with '{s.gsm}'"
    if not hits:
        gsms = sorted({m.group(0) for n in names if (m := re.match(r"GSM\d+", Path(n).name))})
        shown = ", ".join(gsms[:30]) or ", ".join(Path(n).name for n in names[:10])
        raise FetchError(f"{where}: no member of {archive.path.name} {how} (it holds: {shown}"
                         f"{' ...' if len(gsms) > 30 else ''})")
    return hits


def _unpack_member_sample(archive: _Archive, s: SamplePlan, out: Path, where: str) -> list[str]:
    """Write one sample's counts from an archive to ``out``; return the members used."""
    hits = _select(archive, s, where)
    if s.format == "10x_mtx":
        groups = _tenx_groups(hits)
        if groups:
            prefix = _prefer_filtered(sorted(groups), f"{where}: 10x file sets in {archive.path.name}")
            _write_10x(archive.open, groups[prefix], out)
            return sorted(Path(m).name for m in groups[prefix].values())
        nested = [n for n in hits if NESTED_TAR.search(n)]
        if not nested:
            raise FetchError(f"{where}: members {[Path(h).name for h in hits]} of "
                             f"{archive.path.name} hold no complete 10x set (barcodes, "
                             f"genes/features, matrix)")
        name = _prefer_filtered(nested, f"{where}: nested archives")
        with archive.open(name) as raw, tarfile.open(fileobj=raw, mode="r:*") as inner:
            inner_files = {m.name: m for m in inner.getmembers() if m.isfile()}
            groups = _tenx_groups(sorted(inner_files))
            if not groups:
                raise FetchError(f"{where}: nested archive {name} holds no complete 10x set")
            prefix = _prefer_filtered(sorted(groups), f"{where}: 10x sets inside {name}")

            def get(n: str) -> IO[bytes]:
                fh = inner.extractfile(inner_files[n])
                assert fh is not None
                return fh

            _write_10x(get, groups[prefix], out)
            return [f"{Path(name).name}:{Path(m).name}" for m in sorted(groups[prefix].values())]
    rx = FORMAT_SUFFIX[s.format]
    cands = [n for n in hits if rx.search(n)]
    if not cands:
        raise FetchError(f"{where}: no {s.format} file among {[Path(h).name for h in hits]} "
                         f"in {archive.path.name}")
    name = _prefer_filtered(cands, f"{where}: {s.format} files")
    with archive.open(name) as src:
        _write_stream(src, out, gzip_out=out.name.endswith(".gz"))
    return [Path(name).name]


def _read_table_map(path: Path, cell_column: str, sample_column: str) -> dict[str, str]:
    with _open_text(path) as fh:
        head = fh.readline()
    sep = "\t" if "\t" in head else ","
    table = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    table.columns = [str(c).strip() for c in table.columns]
    for col in (cell_column, sample_column):
        if col not in table.columns:
            raise FetchError(f"{path.name}: no column '{col}' (columns: {list(table.columns)})")
    return dict(zip(table[cell_column], table[sample_column], strict=True))


def write_10x_folder(X: sp.spmatrix, genes: list[str], barcodes: list[str], out: Path) -> None:
    """Write a genes x cells matrix as a 10x v3 folder (features.tsv.gz with symbols as ids)."""
    out.mkdir(parents=True, exist_ok=True)
    X = sp.coo_matrix(X)
    integral = X.data.size == 0 or bool(np.all(np.equal(np.mod(X.data, 1), 0)))
    with gzip.open(out / "matrix.mtx.gz", "wb", compresslevel=4) as fh:
        scipy.io.mmwrite(fh, X if not integral else X.astype(np.int64),
                         field="integer" if integral else "real")
    pd.DataFrame({"id": genes, "symbol": genes, "type": "Gene Expression"}).to_csv(
        out / "features.tsv.gz", sep="\t", header=False, index=False)
    pd.Series(barcodes).to_csv(out / "barcodes.tsv.gz", sep="\t", header=False, index=False)


def split_dense(path: Path, fs: FileSpec, assign: dict[str, str | None],
                outs: dict[str, Path], chunk_rows: int = 500) -> dict[str, tuple[int, int]]:
    """Split a dense csv/tsv holding several samples into one 10x folder per split value.

    ``assign`` maps each barcode to its split value (None: dropped); ``outs`` maps split values
    to output folders. Returns {split value: (n_genes, n_cells)}.
    """
    sep = "\t" if fs.format == "tsv" else ","
    reader = pd.read_csv(path, sep=sep, index_col=0, chunksize=chunk_rows)
    if fs.orientation == "genes_x_cells":
        header = pd.read_csv(path, sep=sep, index_col=0, nrows=0).columns.astype(str)
        cols = {v: np.flatnonzero([assign.get(bc) == v for bc in header]) for v in outs}
        blocks: dict[str, list[sp.csr_matrix]] = {v: [] for v in outs}
        genes: list[str] = []
        for chunk in reader:
            values = chunk.to_numpy(dtype=np.float64)
            genes.extend(chunk.index.astype(str))
            for v, idx in cols.items():
                blocks[v].append(sp.csr_matrix(values[:, idx]))
        result = {}
        for v, out in outs.items():
            barcodes = [str(b) for b in header[cols[v]]]
            write_10x_folder(sp.vstack(blocks[v]), genes, barcodes, out)
            result[v] = (len(genes), len(barcodes))
        return result
    rows: dict[str, list[sp.csr_matrix]] = {v: [] for v in outs}
    bcs: dict[str, list[str]] = {v: [] for v in outs}
    genes = []
    for chunk in reader:
        genes = [str(g) for g in chunk.columns]
        values = chunk.to_numpy(dtype=np.float64)
        labels = [assign.get(str(b)) for b in chunk.index]
        for v in outs:
            idx = np.flatnonzero([lab == v for lab in labels])
            rows[v].append(sp.csr_matrix(values[idx]))
            bcs[v].extend(str(b) for b in chunk.index[idx])
    result = {}
    for v, out in outs.items():
        write_10x_folder(sp.vstack(rows[v]).T, genes, bcs[v], out)
        result[v] = (len(genes), len(bcs[v]))
    return result


def _split_combined(plan: StudyPlan, fs: FileSpec, samples: list[SamplePlan], tmp: Path
                    ) -> dict[str, tuple[str, int | None, int | None]]:
    """Split one combined file into its samples' outputs (written under ``tmp``)."""
    path = Path(plan.downloads_dir) / fs.name
    where = f"{plan.study}/{fs.name}"
    values = {s.split_value: s for s in samples}
    outs = {v: tmp / s.sample for v, s in values.items()}
    split = fs.split
    if fs.format == "h5ad":
        import anndata as ad

        src = path
        if _head(path) == b"\x1f\x8b":
            src = tmp / (fs.name.removesuffix(".gz") or "combined.h5ad")
            with open(path, "rb") as fh:
                _write_stream(fh, src, gzip_out=False)
        adata = ad.read_h5ad(src, backed="r")
        col = split["column"]
        if col not in adata.obs:
            raise FetchError(f"{where}: no obs column '{col}' (columns: {list(adata.obs.columns)})")
        key = adata.obs[col].astype(str).to_numpy()
        seen = sorted(set(key))
        result = {}
        for v, s in values.items():
            mask = key == v
            if not mask.any():
                raise FetchError(f"{where}: no cell has {col} == '{v}' (sample '{s.sample}'; "
                                 f"values: {seen[:20]})")
            adata[mask].to_memory().write_h5ad(outs[v])
            result[s.sample] = (str(outs[v]), int(adata.n_vars), int(mask.sum()))
        log.info("%s: %d of %d cells assigned to samples", where,
                 sum(r[2] or 0 for r in result.values()), adata.n_obs)
        return result
    sep = "\t" if fs.format == "tsv" else ","
    if fs.orientation == "genes_x_cells":
        barcodes = [str(b) for b in pd.read_csv(path, sep=sep, index_col=0, nrows=0).columns]
    else:
        barcodes = [str(b) for b in pd.read_csv(path, sep=sep, usecols=[0]).iloc[:, 0]]
    if split["by"] == "barcode":
        rx = re.compile(split["pattern"])
        assign = {bc: (m.group(1) if (m := rx.search(bc)) else None) for bc in barcodes}
    else:
        table = _read_table_map(Path(plan.downloads_dir) / split["table"], split["cell_column"],
                                split["sample_column"])
        assign = {bc: table.get(bc) for bc in barcodes}
    seen = sorted({v for v in assign.values() if v is not None})
    for v, s in values.items():
        if v not in seen:
            raise FetchError(f"{where}: no cell has split value '{v}' (sample '{s.sample}'; "
                             f"values found: {seen[:20]})")
    n_assigned = sum(1 for v in assign.values() if v in values)
    log.info("%s: %d of %d cells assigned to %d samples (%d dropped)", where, n_assigned,
             len(barcodes), len(values), len(barcodes) - n_assigned)
    dims = split_dense(path, fs, assign, outs)
    result = {}
    for v, s in values.items():
        result[s.sample] = (str(outs[v]), *dims[v])
    if any(not _integral_mtx(outs[v]) for v in values):
        log.warning("%s: the values are not integers (e.g. log-normalised); stages that need "
                    "raw counts will refuse or mis-handle them", where)
    return result


def _integral_mtx(folder: Path) -> bool:
    with gzip.open(folder / "matrix.mtx.gz", "rt") as fh:
        return "integer" in fh.readline()


def _head(path: Path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(2)


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
                archive = _Archive(src)
                try:
                    for s in samples:
                        where = f"{plan.study_file}: sample '{s.sample}'"
                        staged[s.sample] = _stage_path(tmp, s)
                        members = _unpack_member_sample(archive, s, staged[s.sample], where)
                        rows.append({"sample": s.sample, "source": fname,
                                     "members": ";".join(members)})
                finally:
                    archive.close()
            elif fs.layout == "sample_file":
                s = samples[0]
                target = _stage_path(tmp, s)
                if _head(src) == b"\x1f\x8b" and not s.path.endswith(".gz"):
                    with open(src, "rb") as fh:
                        _write_stream(fh, target, gzip_out=False)
                else:
                    place(src, target, "hardlink")
                staged[s.sample] = target
                rows.append({"sample": s.sample, "source": fname, "members": ""})
            elif fs.layout == "combined":
                for sample, (out, _, _) in _split_combined(plan, fs, samples, tmp).items():
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


def draft_sample_sheet(archive: str | Path) -> pd.DataFrame:
    """A draft sample sheet from a GEO RAW.tar: one row per GSM (arm left empty to fill in)."""
    arc = _Archive(Path(archive))
    try:
        names = arc.names()
    finally:
        arc.close()
    rows: dict[str, dict[str, str]] = {}
    for name in names:
        base = Path(name).name
        m = re.match(r"(GSM\d+)[_.-]?(.*)$", base)
        if not m:
            continue
        gsm, rest = m.groups()
        role = TENX_ROLE.search(rest)
        title = rest[: role.start()] if role else re.sub(r"(?i)\.(csv|tsv|txt|h5ad|h5|mtx|tar)(\.gz)?$", "", rest)
        if role:
            fmt = "10x_mtx"
        elif NESTED_TAR.search(rest):
            fmt = "10x_mtx"
        else:
            fmt = next((f for f in ("h5ad", "10x_h5", "csv", "tsv") if FORMAT_SUFFIX[f].search(rest)), "")
        readable = re.sub(r"-(?=_|$)", "neg", title.replace("+", "pos"))  # CD45- -> CD45neg
        sample = re.sub(r"[^A-Za-z0-9_.-]+", "_", readable).strip("_").lower() or gsm
        row = rows.setdefault(gsm, {"sample": sample, "arm": "", "animal": "", "gsm": gsm,
                                    "path": sample, "format": fmt, "title": title})
        if fmt == "10x_mtx":
            row["format"] = "10x_mtx"
    sheet = pd.DataFrame([rows[g] for g in sorted(rows, key=lambda g: int(g[3:]))])
    if not sheet.empty:
        for i, row in sheet.iterrows():
            if row["format"] not in ("10x_mtx", ""):
                ext = {"h5ad": ".h5ad", "10x_h5": ".h5", "csv": ".csv.gz", "tsv": ".tsv.gz"}[row["format"]]
                sheet.loc[i, "path"] = row["sample"] + ext
        dup = sheet["sample"].duplicated(keep=False)
        sheet.loc[dup, "sample"] = sheet.loc[dup, "sample"] + "_" + sheet.loc[dup, "gsm"].str.lower()
        sheet.loc[dup, "path"] = sheet.loc[dup, "sample"]
    return sheet


# --- Snakemake entry points ------------------------------------------------------------------------


def _study_plan(smk: Any) -> StudyPlan:
    from livermsc.config import load_study

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


# --- command line ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``download STUDY.yaml``: fetch a study's files; ``sheet ARCHIVE``: draft a sample sheet."""
    parser = argparse.ArgumentParser(prog="python -m livermsc.fetch", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("download", help="download a study's files (cache and checksums as in the workflow)")
    p.add_argument("study", type=Path, help="study file, e.g. config/studies/GSE136103.yaml")
    p.add_argument("--configfile", type=Path, default=Path("config/config.yaml"),
                   help="config whose fetch: section to use (default: config/config.yaml)")
    p.add_argument("--dest", type=Path, default=None,
                   help="folder for the files (default: resources/<study>/downloads)")
    p = sub.add_parser("sheet", help="print a draft sample sheet (TSV) for a GEO RAW.tar")
    p.add_argument("archive", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        if args.command == "sheet":
            draft_sample_sheet(args.archive).to_csv(sys.stdout, sep="\t", index=False)
            return 0
        cfg = load_yaml(args.configfile) if args.configfile.is_file() else {}
        fetch_cfg = validate(dict(cfg.get("fetch") or {}), "fetch", args.configfile)
        settings = FetchSettings.from_config(fetch_cfg)
        spec = validate(load_yaml(args.study), "study", args.study)
        files = file_specs(spec, settings, args.study)
        dest = args.dest or Path("resources") / spec["id"] / "downloads"
        for fs in files.values():
            target = dest / fs.name
            if target.exists():
                log.info("%s exists; skipped", target)
                continue
            fetch_file(fs, target, settings, study=spec["id"], study_file=str(args.study),
                       checksums=dest.parent / "checksums.tsv")
        return 0
    except (ConfigError, FetchError) as err:
        print(f"livermsc: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

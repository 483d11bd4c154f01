"""Move bytes: HTTPS downloads with retries, resume and checksum checks; atomic placement.

* :func:`download`: retries with exponential back-off (server errors, dropped connections,
  truncated bodies; 404 and other client errors are not retried), resume of partial downloads
  (HTTP Range), checksum verification (SHA-256 or MD5; a checksum is recorded when none is known)
  and atomic placement (the data go to ``<dest>.part`` and are renamed only once complete and
  verified).
* :func:`place` puts a file somewhere by hard link, symlink or copy; :func:`record_checksum`
  keeps a checksums table; :func:`locked` serialises access to shared caches and tables.
* :class:`FetchSettings` is the ``fetch:`` config section; its defaults live only in
  workflow/schemas/fetch.schema.yaml.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import http.client
import logging
import os
import re
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from livermsc.config import validate

log = logging.getLogger("livermsc.fetch.transfer")

RETRYABLE_HTTP = {408, 425, 429, 500, 502, 503, 504}
CHUNK = 1 << 20
MB = 1 << 20
CHECKSUM_COLUMNS = ["file", "sha256", "md5", "bytes", "status", "url", "recorded_at"]


class FetchError(RuntimeError):
    """A download or unpack failed; the message names the file, the study and what to do."""


class ChecksumMismatch(FetchError):
    """A file's checksum differs from the one in the study file (the file was deleted)."""


class _Transient(Exception):
    """A failure worth retrying (server error, dropped connection, truncated body)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class FetchSettings:
    """The ``fetch:`` section of the config (workflow/schemas/fetch.schema.yaml).

    No field has a default here: build it with :meth:`from_config`, which fills every missing
    key from the schema.
    """

    base_url: str
    geo_url_style: str
    cache_dir: str
    offline: bool
    retries: int
    backoff_s: float
    backoff_max_s: float
    timeout_s: float
    progress_mb: float
    link_mode: str
    keep_downloads: bool
    user_agent: str

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None,
                    source: str | Path = "config section 'fetch'") -> FetchSettings:
        """Settings from a ``fetch:`` config section (``None`` or ``{}``: all defaults).

        The section is validated against the fetch schema, which fills in the defaults;
        ``source`` names it in errors (:class:`~livermsc.config.ConfigError`).
        """
        full = validate(dict(cfg or {}), "fetch", source)
        return cls(**{f.name: full[f.name] for f in fields(cls)})


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
    settings = settings or FetchSettings.from_config({})
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
def locked(path: Path) -> Iterator[None]:
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
    with locked(table.with_name(table.name + ".lock")):
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


def sidecar_sha256(cached: Path) -> str | None:
    """The SHA-256 recorded next to a cached file (``<file>.sha256``), if any."""
    side = cached.with_name(cached.name + ".sha256")
    if side.exists():
        text = side.read_text().split()
        return text[0] if text else None
    return None


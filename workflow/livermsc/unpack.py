"""Unpack downloaded study files: archive members, 10x folders and combined-matrix splitting.

* GEO ``RAW.tar`` archives: a sample's members are picked by GSM prefix or a ``member`` regex and
  regrouped into a 10x folder (``barcodes`` + ``genes``/``features`` + ``matrix``, gzipped), also
  from tars nested in the archive; other formats (10x h5, h5ad, csv/tsv) are extracted as they are.
* Combined matrices holding several samples are split into one 10x folder (dense csv/tsv) or h5ad
  (h5ad) per sample, by a barcode regex, a cell -> sample table or an obs column.
* :func:`draft_sample_sheet` lists the samples of a RAW.tar as a draft sample sheet.
"""

from __future__ import annotations

import gzip
import io
import logging
import re
import shutil
import tarfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.io
import scipy.sparse as sp

from livermsc.transfer import CHUNK, FetchError, place

log = logging.getLogger("livermsc.fetch.unpack")

TENX_ROLE = re.compile(r"(?i)(?:^|[/_.-])(barcodes|genes|features|matrix)\.(tsv|mtx)(\.gz)?$")
NESTED_TAR = re.compile(r"(?i)\.(tar|tar\.gz|tgz)$")
FORMAT_SUFFIX = {
    "10x_h5": re.compile(r"(?i)\.h5$"),
    "h5ad": re.compile(r"(?i)\.h5ad(\.gz)?$"),
    "csv": re.compile(r"(?i)\.(csv|txt)(\.gz)?$"),
    "tsv": re.compile(r"(?i)\.(tsv|txt)(\.gz)?$"),
}


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


class Archive:
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


def select_members(archive: Archive, gsm: str | None, member: str | None, where: str) -> list[str]:
    """Members of ``archive`` whose base name matches ``member`` (a case-insensitive regex) or,
    without one, starts with the GEO sample accession ``gsm``."""
    names = archive.names()
    if member:
        rx = re.compile(member, re.IGNORECASE)
        hits = [n for n in names if rx.search(Path(n).name)]
        how = f"matches member regex '{member}'"
    else:
        rx = re.compile(rf"^{re.escape(gsm or '')}(?![0-9])", re.IGNORECASE)
        hits = [n for n in names if rx.search(Path(n).name)]
        how = f"starts with '{gsm}'"
    if not hits:
        gsms = sorted({m.group(0) for n in names if (m := re.match(r"GSM\d+", Path(n).name))})
        shown = ", ".join(gsms[:30]) or ", ".join(Path(n).name for n in names[:10])
        raise FetchError(f"{where}: no member of {archive.path.name} {how} (it holds: {shown}"
                         f"{' ...' if len(gsms) > 30 else ''})")
    return hits


def extract_sample(archive: Archive, out: Path, fmt: str, gsm: str | None, member: str | None,
                   where: str) -> list[str]:
    """Write one sample's counts (input format ``fmt``) from an archive to ``out``; return the
    members used. 10x sets are regrouped into one folder (also from a nested tar); where several
    candidates match, the one named "filtered" is taken."""
    hits = select_members(archive, gsm, member, where)
    if fmt == "10x_mtx":
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
    rx = FORMAT_SUFFIX[fmt]
    cands = [n for n in hits if rx.search(n)]
    if not cands:
        raise FetchError(f"{where}: no {fmt} file among {[Path(h).name for h in hits]} "
                         f"in {archive.path.name}")
    name = _prefer_filtered(cands, f"{where}: {fmt} files")
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


def split_dense(path: Path, fmt: str, orientation: str, assign: dict[str, str | None],
                outs: dict[str, Path], chunk_rows: int = 500) -> dict[str, tuple[int, int]]:
    """Split a dense csv/tsv holding several samples into one 10x folder per split value.

    ``assign`` maps each barcode to its split value (None: dropped); ``outs`` maps split values
    to output folders. Returns {split value: (n_genes, n_cells)}.
    """
    sep = "\t" if fmt == "tsv" else ","
    reader = pd.read_csv(path, sep=sep, index_col=0, chunksize=chunk_rows)
    if orientation == "genes_x_cells":
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


def split_combined(path: Path, fmt: str, orientation: str, split: Mapping[str, str],
                   samples: Mapping[str, str], tmp: Path, where: str
                   ) -> dict[str, tuple[str, int | None, int | None]]:
    """Split one combined file into one output per sample, written at ``tmp/<sample>``.

    ``samples`` maps each split value to its sample; ``split`` is the file's split rule (by
    ``obs`` column of an h5ad, by a ``barcode`` regex, or by a ``table`` of cell -> sample next
    to ``path``). Returns {sample: (output path, n_features, n_cells)}.
    """
    outs = {v: tmp / s for v, s in samples.items()}
    if fmt == "h5ad":
        src = path
        if _head(path) == b"\x1f\x8b":
            src = tmp / (path.name.removesuffix(".gz") or "combined.h5ad")
            with open(path, "rb") as fh:
                _write_stream(fh, src, gzip_out=False)
        adata = ad.read_h5ad(src, backed="r")
        col = split["column"]
        if col not in adata.obs:
            raise FetchError(f"{where}: no obs column '{col}' (columns: {list(adata.obs.columns)})")
        key = adata.obs[col].astype(str).to_numpy()
        seen = sorted(set(key))
        result = {}
        for v, s in samples.items():
            mask = key == v
            if not mask.any():
                raise FetchError(f"{where}: no cell has {col} == '{v}' (sample '{s}'; "
                                 f"values: {seen[:20]})")
            adata[mask].to_memory().write_h5ad(outs[v])
            result[s] = (str(outs[v]), int(adata.n_vars), int(mask.sum()))
        log.info("%s: %d of %d cells assigned to samples", where,
                 sum(r[2] or 0 for r in result.values()), adata.n_obs)
        return result
    sep = "\t" if fmt == "tsv" else ","
    if orientation == "genes_x_cells":
        barcodes = [str(b) for b in pd.read_csv(path, sep=sep, index_col=0, nrows=0).columns]
    else:
        barcodes = [str(b) for b in pd.read_csv(path, sep=sep, usecols=[0]).iloc[:, 0]]
    if split["by"] == "barcode":
        rx = re.compile(split["pattern"])
        assign = {bc: (m.group(1) if (m := rx.search(bc)) else None) for bc in barcodes}
    else:
        table = _read_table_map(path.parent / split["table"], split["cell_column"],
                                split["sample_column"])
        assign = {bc: table.get(bc) for bc in barcodes}
    seen = sorted({v for v in assign.values() if v is not None})
    for v, s in samples.items():
        if v not in seen:
            raise FetchError(f"{where}: no cell has split value '{v}' (sample '{s}'; "
                             f"values found: {seen[:20]})")
    n_assigned = sum(1 for v in assign.values() if v in samples)
    log.info("%s: %d of %d cells assigned to %d samples (%d dropped)", where, n_assigned,
             len(barcodes), len(samples), len(barcodes) - n_assigned)
    dims = split_dense(path, fmt, orientation, assign, outs)
    result = {}
    for v, s in samples.items():
        result[s] = (str(outs[v]), *dims[v])
    if any(not _integral_mtx(outs[v]) for v in samples):
        log.warning("%s: the values are not integers (e.g. log-normalised); stages that need "
                    "raw counts will refuse or mis-handle them", where)
    return result


def _integral_mtx(folder: Path) -> bool:
    with gzip.open(folder / "matrix.mtx.gz", "rt") as fh:
        return "integer" in fh.readline()


def _head(path: Path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(2)


def copy_sample_file(src: Path, target: Path) -> None:
    """Put a per-sample file at ``target``: decompressed when it is gzipped and ``target`` does
    not end in .gz, else hard-linked (copied across file systems)."""
    if _head(src) == b"\x1f\x8b" and not target.name.endswith(".gz"):
        with open(src, "rb") as fh:
            _write_stream(fh, target, gzip_out=False)
    else:
        place(src, target, "hardlink")


def draft_sample_sheet(archive: str | Path) -> pd.DataFrame:
    """A draft sample sheet from a GEO RAW.tar: one row per GSM (arm left empty to fill in)."""
    arc = Archive(Path(archive))
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


"""Read one sample's counts (10x mtx/h5, h5ad, Seurat, dense CSV/TSV) into a checked AnnData.

Every reader first reads the gene and barcode names (cheap) and only then the matrix, so that
a file of the wrong species is refused before the counts are loaded. The result of
:func:`ingest_sample` holds raw counts as a CSR matrix (float32 holding integers; float64
where a value exceeds 2**24) in ``layers["counts"]`` only (``X`` is empty: one copy of the
counts, the scverse place for raw counts), unique gene symbols as
``var_names`` (duplicated symbols are *summed*, see :func:`merge_duplicate_symbols`), obs names
``<sample>:<barcode>`` and the sample sheet's columns as categorical ``obs``. The cell metadata
a file carries (h5ad ``obs``, Seurat ``meta.data``) is kept in ``obs`` as ``source_<column>``.

A sample may be one file, or the cells of one combined file (h5ad, Seurat, 10x h5/mtx, CSV/TSV)
holding several samples, picked by their value of a split key (an ``obs`` / ``meta.data``
column, a regex on the barcode, or a cell table): see :func:`split_values`.

Seurat objects (``.rds``, ``.rda``/``.RData``; ``Assay`` of Seurat v3/v4 and ``Assay5`` of v5)
are read in pure Python with ``rdata``: raw counts from the ``counts`` slot or layer(s).

Every refusal is an :class:`IngestError` whose message starts with the file's path.
"""

from __future__ import annotations

import gzip
import logging
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import rdata
import scipy.io
import scipy.sparse as sp
import xarray as xr
from anndata.io import read_elem

log = logging.getLogger("livermsc.ingest")

FORMATS = ("10x_mtx", "10x_h5", "h5ad", "seurat", "csv", "tsv")
ORIENTATIONS = ("auto", "genes_x_cells", "cells_x_genes")
#: sample-sheet columns that describe the input file or QC settings, not the cells
NON_OBS_COLUMNS = ("path", "format", "orientation", "qc_n_mads", "qc_n_mads_mt", "qc_max_pct_mt")
#: share of recognisable symbols that must have the declared species' style
MIN_SPECIES_SHARE = 0.6
#: below this many recognisable symbols the species check is skipped (with a warning)
MIN_RECOGNISED_SYMBOLS = 10
#: var columns that may hold gene symbols when var_names are Ensembl ids (h5ad input)
SYMBOL_COLUMNS = ("gene_symbols", "gene_symbol", "symbol", "symbols", "gene_name", "gene_names",
                  "feature_name", "gene_short_name", "name")
GENE_ID_COLUMNS = ("gene_ids", "gene_id", "ensembl_id", "ensembl", "feature_id", "id")
#: float32 holds every integer up to 2**24 exactly
_FLOAT32_EXACT = 2**24
#: how rdata spells the NULL of an empty S4 slot
_R_NULL = "\x01NULL\x01"
#: split keys of a combined file (study.schema.yaml, files[].split.by)
SPLIT_BY = ("obs", "barcode", "table")

_ENSEMBL = re.compile(r"^ENS([A-Z]{3})?G\d{6,}(\.\d+)?$")
_BARCODE = re.compile(r"[ACGTN]{8,}")
_GENE_LIKE = re.compile(r"^(?:[A-Za-z][A-Za-z0-9.\-]*|\d+[A-Za-z0-9.\-]*Rik\d*)$")
_HUMAN_STYLE = re.compile(r"^(?=(?:[^A-Z]*[A-Z]){2})[A-Z0-9.\-]+$")
#: ubiquitously expressed genes (either species, case-insensitive) that anchor the gene axis
_ANCHOR = re.compile(r"^(mt-.+|rp[sl]\d+[a-z]?|actb|gapdh|b2m|malat1|tmsb4x|eef1a1|ftl1?|fth1|"
                     r"tpt1|ppia|ubb|ubc|cfl1|pfn1|myl6|hspa8|vim)$", re.IGNORECASE)


class IngestError(ValueError):
    """A sample's input file is missing, malformed or not raw counts; the message names it."""


@dataclass
class RawSource:
    """A sample file's names (read first) and a loader of its cells x genes matrix."""

    path: Path
    fmt: str
    var: pd.DataFrame  # one row per feature; columns symbol, gene_id[, feature_type]
    barcodes: pd.Index
    load: Callable[[], sp.spmatrix | np.ndarray]
    info: dict[str, Any] = field(default_factory=dict)
    obs: pd.DataFrame | None = None  # the file's cell metadata (h5ad obs, Seurat meta.data)


# --- small helpers ---------------------------------------------------------------------------

def _read_lines_table(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path, sep="\t", header=None, dtype=str, keep_default_na=False,
                           compression="infer", quoting=3)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()
    except (pd.errors.ParserError, UnicodeDecodeError, OSError, EOFError) as err:
        raise IngestError(f"{path}: cannot be read as a tab-separated table ({err})") from err


def _find_one(folder: Path, stems: tuple[str, ...]) -> Path | None:
    """The one file in ``folder`` named ``[prefix]<stem>[.gz]`` (GEO adds sample prefixes)."""
    hits = [p for p in sorted(folder.iterdir()) if p.is_file()
            and any(p.name == s or p.name == f"{s}.gz" or p.name.endswith((f"_{s}", f"_{s}.gz"))
                    for s in stems)]
    if len(hits) > 1:
        raise IngestError(f"{folder}: several candidate files for {stems[0]}: "
                          f"{[h.name for h in hits]} (expected one sample per folder)")
    return hits[0] if hits else None


def is_barcode_like(name: str) -> bool:
    """True for cell-barcode-like names (8+ consecutive nucleotide letters)."""
    return bool(_BARCODE.search(name))


def gene_like_share(names: pd.Index | list[str]) -> float:
    """Share of names that look like a gene symbol or Ensembl id (and not like a barcode)."""
    names = [str(n) for n in names]
    if not names:
        return 0.0
    hits = sum(bool(_GENE_LIKE.match(n)) and not is_barcode_like(n) for n in names)
    return hits / len(names)


def _anchor_hits(names: pd.Index | list[str]) -> int:
    return sum(bool(_ANCHOR.match(str(n))) for n in names)


def symbol_style(symbol: str) -> str | None:
    """'mouse' (Actb, mt-Co1, 1110008P14Rik), 'human' (ACTB, MT-CO1, C1orf112) or None."""
    s = str(symbol)
    m = _ENSEMBL.match(s)
    if m:
        return "mouse" if m.group(1) == "MUS" else ("human" if m.group(1) is None else None)
    if s.startswith("mt-"):
        return "mouse"
    if s.startswith("MT-"):
        return "human"
    if not s or not s[0].isalnum() or is_barcode_like(s):
        return None
    bare = re.sub(r"(?<=\d)orf(?=\d)", "ORF", s)  # human open reading frames: C1orf112
    if _HUMAN_STYLE.match(bare):
        return "human"
    if re.search(r"[a-z]", bare) and (s[0].isupper() or s[0].isdigit()):
        return "mouse"
    return None


def species_fit(symbols: pd.Index | list[str], species: str) -> dict[str, Any]:
    """How many symbols have mouse or human style, and the share fitting ``species``."""
    styles = pd.Series([symbol_style(s) for s in symbols], dtype=object)
    n_mouse = int((styles == "mouse").sum())
    n_human = int((styles == "human").sum())
    n_rec = n_mouse + n_human
    share = (n_mouse if species == "mouse" else n_human) / n_rec if n_rec else float("nan")
    return {"species": species, "n_recognised": n_rec, "n_mouse_style": n_mouse,
            "n_human_style": n_human, "share_fitting": share}


def check_species(symbols: pd.Index | list[str], species: str, source: Path | str) -> dict:
    """Refuse symbols that do not fit ``species``; return :func:`species_fit`'s numbers."""
    if species not in ("mouse", "human"):
        raise IngestError(f"{source}: unknown species {species!r} (expected: mouse or human)")
    fit = species_fit(symbols, species)
    if fit["n_recognised"] < MIN_RECOGNISED_SYMBOLS:
        log.warning("%s: only %d gene symbols have a recognisable mouse/human style; species "
                    "check skipped", source, fit["n_recognised"])
        return fit
    if fit["share_fitting"] < MIN_SPECIES_SHARE:
        other = "human" if species == "mouse" else "mouse"
        examples = [s for s in symbols if symbol_style(s) == other][:5]
        style = "title case like Actb, mt-Co1" if species == "mouse" else \
            "upper case like ACTB, MT-CO1"
        raise IngestError(
            f"{source}: the gene symbols do not fit the declared species '{species}': only "
            f"{fit['share_fitting']:.0%} of {fit['n_recognised']} recognisable symbols have "
            f"{species} style ({style}); the others look {other} (e.g. {', '.join(examples)}). "
            f"Check 'species' in the study file (at least {MIN_SPECIES_SHARE:.0%} must fit).")
    return fit


# --- readers ---------------------------------------------------------------------------------

def _features_frame(table: pd.DataFrame, source: Path) -> pd.DataFrame:
    """Normalise a features/genes table (1-3+ columns) to symbol, gene_id[, feature_type]."""
    if table.shape[1] == 0 or table.empty:
        raise IngestError(f"{source}: no features listed")
    ids = table.iloc[:, 0].astype(str)
    symbols = table.iloc[:, 1].astype(str) if table.shape[1] > 1 else ids
    var = pd.DataFrame({"symbol": symbols.to_numpy(), "gene_id": ids.to_numpy()})
    if table.shape[1] > 2:
        var["feature_type"] = table.iloc[:, 2].astype(str).to_numpy()
    return var


def read_10x_mtx(folder: Path) -> RawSource:
    """A 10x folder: matrix.mtx[.gz] with features.tsv[.gz] (v3) or genes.tsv[.gz] (v2)."""
    if not folder.is_dir():
        raise IngestError(f"{folder}: expected a 10x folder (matrix.mtx[.gz], features.tsv[.gz] "
                          f"or genes.tsv[.gz], barcodes.tsv[.gz]) but this is a file")
    matrix = _find_one(folder, ("matrix.mtx",))
    features = _find_one(folder, ("features.tsv",)) or _find_one(folder, ("genes.tsv",))
    barcodes = _find_one(folder, ("barcodes.tsv",))
    missing = [n for n, p in (("matrix.mtx[.gz]", matrix), ("features.tsv[.gz] or genes.tsv[.gz]",
                                                              features),
                              ("barcodes.tsv[.gz]", barcodes)) if p is None]
    if missing:
        raise IngestError(f"{folder}: file not found: {', '.join(missing)} (10x mtx folder)")
    for part in (matrix, features, barcodes):
        if part.stat().st_size == 0:
            raise IngestError(f"{part}: the file is empty (0 bytes; expected part of a 10x mtx "
                              f"folder)")
    var = _features_frame(_read_lines_table(features), features)
    bc_table = _read_lines_table(barcodes)
    bc = pd.Index(bc_table.iloc[:, 0].astype(str) if bc_table.shape[1] else [], dtype=object)

    def load() -> sp.spmatrix:
        try:
            with (gzip.open(matrix, "rb") if matrix.suffix == ".gz" else matrix.open("rb")) as fh:
                m = scipy.io.mmread(fh)
        except (ValueError, OSError, EOFError) as err:
            raise IngestError(f"{matrix}: not a readable Matrix Market file ({err})") from err
        m = sp.csr_matrix(m)
        if m.shape != (len(var), len(bc)):
            raise IngestError(f"{matrix}: shape {m.shape} does not match {len(var)} features x "
                              f"{len(bc)} barcodes listed in {features.name}, {barcodes.name}")
        return m.T.tocsr()

    version = "v3" if "features" in features.name else "v2"
    return RawSource(folder, "10x_mtx", var, bc, load, {"10x_version": version})


def _h5_str(values: np.ndarray) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


#: what h5py raises for a damaged file beyond the header (besides OSError)
_H5_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError)


def _guarded(path: Path, what: str, func: Callable[[], Any]) -> Any:
    """Run ``func``; a damaged HDF5 file's low-level error becomes an :class:`IngestError`."""
    try:
        return func()
    except IngestError:
        raise
    except _H5_ERRORS as err:
        raise IngestError(f"{path}: damaged {what} file, cannot be read ({type(err).__name__}: "
                          f"{err}); download or export it again") from err


def read_10x_h5(path: Path) -> RawSource:
    """A CellRanger .h5 file: v3 layout (``/matrix``) or v2 (one group per genome)."""
    src = _guarded(path, "10x h5", lambda: _read_10x_h5(path))
    load = src.load
    src.load = lambda: _guarded(path, "10x h5", load)
    return src


def _read_10x_h5(path: Path) -> RawSource:
    try:
        fh = h5py.File(path, "r")
    except OSError as err:
        raise IngestError(f"{path}: not a readable HDF5 file ({err})") from err
    with fh:
        if "matrix" in fh:
            grp_name = "matrix"
            grp = fh["matrix"]
            if "features" not in grp:
                raise IngestError(f"{path}: /matrix has no 'features' group (CellRanger v3 layout)")
            feats = grp["features"]
            var = pd.DataFrame({"symbol": _h5_str(feats["name"][:]),
                                "gene_id": _h5_str(feats["id"][:])})
            if "feature_type" in feats:
                var["feature_type"] = _h5_str(feats["feature_type"][:])
            version = "v3"
        else:
            genomes = [k for k in fh if isinstance(fh[k], h5py.Group) and "barcodes" in fh[k]]
            if len(genomes) != 1:
                raise IngestError(f"{path}: expected /matrix (CellRanger v3) or exactly one genome "
                                  f"group (v2), found {genomes or list(fh)}")
            grp_name = genomes[0]
            grp = fh[grp_name]
            var = pd.DataFrame({"symbol": _h5_str(grp["gene_names"][:]),
                                "gene_id": _h5_str(grp["genes"][:])})
            version = "v2"
        needed = [k for k in ("data", "indices", "indptr", "shape", "barcodes") if k not in grp]
        if needed:
            raise IngestError(f"{path}: /{grp_name} lacks {needed} (10x h5 layout)")
        bc = pd.Index(_h5_str(grp["barcodes"][:]))

    def load() -> sp.spmatrix:
        with h5py.File(path, "r") as f:
            g = f[grp_name]
            n_genes, n_cells = (int(x) for x in g["shape"][:])
            if (n_genes, n_cells) != (len(var), len(bc)):
                raise IngestError(f"{path}: shape ({n_genes}, {n_cells}) does not match "
                                  f"{len(var)} features x {len(bc)} barcodes")
            # stored genes x cells in CSC order = cells x genes in CSR order
            return sp.csr_matrix((g["data"][:], g["indices"][:], g["indptr"][:]),
                                 shape=(n_cells, n_genes))

    return RawSource(path, "10x_h5", var, bc, load, {"10x_version": version})


def read_h5ad(path: Path) -> RawSource:
    """An .h5ad file (cells x genes): counts from ``layers['counts']`` if present, else ``X``.

    Where var_names are Ensembl ids and a symbol column exists (e.g. ``gene_symbol``), the
    symbols are used and the ids kept in ``var['gene_ids']``.
    """
    src = _guarded(path, "h5ad", lambda: _read_h5ad(path))
    load = src.load
    src.load = lambda: _guarded(path, "h5ad", load)
    return src


def _read_h5ad(path: Path) -> RawSource:
    try:
        fh = h5py.File(path, "r")
    except OSError as err:
        raise IngestError(f"{path}: not a readable HDF5/h5ad file ({err})") from err
    with fh:
        if "var" not in fh or "obs" not in fh or "X" not in fh:
            raise IngestError(f"{path}: not an AnnData file (needs /X, /obs, /var)")
        try:
            var_in = read_elem(fh["var"])
            obs_in = read_elem(fh["obs"])
        except Exception as err:  # h5py/anndata raise many types for damaged groups
            raise IngestError(f"{path}: the h5ad's obs/var cannot be read ({type(err).__name__}: "
                              f"{err})") from err
        obs_names = pd.Index(obs_in.index.astype(str))
        obs_in.index = obs_names
        layer = "layers/counts" if "layers" in fh and "counts" in fh["layers"] else "X"
    names = var_in.index.astype(str)
    sym_col = next((c for c in SYMBOL_COLUMNS if c in var_in.columns), None)
    id_col = next((c for c in GENE_ID_COLUMNS if c in var_in.columns), None)
    ensembl = np.mean([bool(_ENSEMBL.match(n)) for n in names]) > 0.5 if len(names) else False
    if ensembl and sym_col is not None:
        var = pd.DataFrame({"symbol": var_in[sym_col].astype(str).to_numpy(),
                            "gene_id": names.to_numpy()})
    else:
        ids = var_in[id_col].astype(str).to_numpy() if id_col else names.to_numpy()
        var = pd.DataFrame({"symbol": names.to_numpy(), "gene_id": ids})
    if "feature_types" in var_in.columns:
        var["feature_type"] = var_in["feature_types"].astype(str).to_numpy()

    def load() -> sp.spmatrix | np.ndarray:
        try:
            with h5py.File(path, "r") as f:
                return read_elem(f[layer])
        except Exception as err:  # a damaged dataset fails inside h5py with OSError/KeyError/...
            raise IngestError(f"{path}: the count matrix /{layer} cannot be read "
                              f"({type(err).__name__}: {err})") from err

    return RawSource(path, "h5ad", var, obs_names, load, {"matrix": layer}, obs=obs_in)


# --- Seurat objects (.rds / .rda / .RData) -------------------------------------------------------

def _r_class(obj: Any) -> list[str]:
    """The R class vector of a converted object ([] for a plain value)."""
    cls = getattr(obj, "class", None) if isinstance(obj, SimpleNamespace) else None
    if cls is None and isinstance(obj, (xr.DataArray, np.ndarray)):
        cls = getattr(obj, "attrs", {}).get("class")
    if cls is None:
        return []
    return [str(c) for c in np.atleast_1d(np.asarray(cls))]


def _r_describe(obj: Any) -> str:
    cls = _r_class(obj)
    if cls:
        return "/".join(cls)
    if isinstance(obj, pd.DataFrame):
        return "data.frame"
    return type(obj).__name__


def _r_strings(value: Any) -> list[str] | None:
    """A converted R character vector as a list (None for NULL or an absent value)."""
    if value is None or (isinstance(value, str) and value == _R_NULL):
        return None
    arr = np.atleast_1d(np.asarray(value, dtype=object))
    return [str(v) for v in arr]


def _r_load(path: Path) -> Any:
    """Parse and convert an .rds/.rda/.RData file (an .rda gives a dict of objects)."""
    try:
        with warnings.catch_warnings():  # "Wrong extension .gz" for a gzipped .rds.gz
            warnings.simplefilter("ignore")
            parsed = rdata.parser.parse_file(path)
    except Exception as err:  # rdata raises several types for a file that is not R data
        raise IngestError(f"{path}: not a readable R data file (.rds, .rda or .RData written by "
                          f"saveRDS/save): {type(err).__name__}: {err}") from err
    with warnings.catch_warnings():  # "Missing constructor for R class ..." for every S4 class
        warnings.simplefilter("ignore")
        try:
            return rdata.conversion.convert(parsed)
        except Exception as err:
            raise IngestError(f"{path}: the R data cannot be converted ({type(err).__name__}: "
                              f"{err})") from err


def _find_seurat(path: Path, obj: Any) -> SimpleNamespace:
    """The one Seurat object of an .rds (the object) or .rda (one of its named objects)."""
    if isinstance(obj, dict) and not _r_class(obj):
        hits = {k: v for k, v in obj.items() if "Seurat" in _r_class(v)}
        if len(hits) == 1:
            return next(iter(hits.values()))
        found = ", ".join(f"{k!s} ({_r_describe(v)})" for k, v in obj.items()) or "nothing"
        if not hits:
            raise IngestError(f"{path}: holds no Seurat object (found: {found}); expected an R "
                              f"object of class Seurat")
        raise IngestError(f"{path}: holds several Seurat objects ({', '.join(map(str, hits))}); expected "
                          f"one per file (save each with saveRDS)")
    if "Seurat" not in _r_class(obj):
        raise IngestError(f"{path}: holds an R object of class '{_r_describe(obj)}'; expected a "
                          f"Seurat object (class Seurat, SeuratObject v3, v4 or v5)")
    return obj


def _r_sparse(m: Any, where: str) -> tuple[sp.csc_matrix, list[str] | None, list[str] | None]:
    """A dgCMatrix (or a dense R matrix) as (genes x cells CSC, row names, column names)."""
    cls = _r_class(m)
    if "dgCMatrix" in cls:
        shape = tuple(int(d) for d in np.asarray(m.Dim))
        x = np.asarray(m.x)
        mat = sp.csc_matrix((x, np.asarray(m.i), np.asarray(m.p)), shape=shape)
        dimnames = list(m.Dimnames) if m.Dimnames is not None else [None, None]
        dimnames += [None] * (2 - len(dimnames))
        return mat, _r_strings(dimnames[0]), _r_strings(dimnames[1])
    if isinstance(m, xr.DataArray) and m.ndim == 2:
        rows = _r_strings(m.coords[m.dims[0]].values) if m.dims[0] in m.coords else None
        cols = _r_strings(m.coords[m.dims[1]].values) if m.dims[1] in m.coords else None
        return sp.csc_matrix(np.asarray(m.values)), rows, cols
    if isinstance(m, np.ndarray) and m.ndim == 2 and m.size:
        return sp.csc_matrix(m), None, None
    raise IngestError(f"{where} is a {_r_describe(m)}; expected a dgCMatrix or a matrix of "
                      f"raw counts")


def _logmap(m: Any, where: str) -> tuple[list[str], list[str], np.ndarray]:
    """A SeuratObject LogMap (logical matrix: names x layers) as (names, layers, matrix)."""
    if isinstance(m, xr.DataArray) and m.ndim == 2:
        names = _r_strings(m.coords[m.dims[0]].values) if m.dims[0] in m.coords else None
        layers = _r_strings(m.coords[m.dims[1]].values) if m.dims[1] in m.coords else []
        if names is not None:
            return names, layers or [], np.asarray(m.values, dtype=bool)
    raise IngestError(f"{where} is a {_r_describe(m)}; expected a LogMap (logical matrix with "
                      f"feature or cell names as row names)")


def _seurat_counts(path: Path, assay: Any, name: str
                   ) -> tuple[sp.csc_matrix, list[str], list[str], str]:
    """Raw counts (genes x cells), gene names, cell names and 'v3'/'v5' of one assay."""
    cls = _r_class(assay)
    where = f"{path}: assay '{name}'"
    if "Assay5" in cls or "StdAssay" in cls or hasattr(assay, "layers"):
        layers = getattr(assay, "layers", None) or {}
        if not isinstance(layers, dict):
            raise IngestError(f"{where}: slot 'layers' is a {_r_describe(layers)}; expected a "
                              f"named list of matrices (Seurat v5 Assay5)")
        layers = {str(k): v for k, v in layers.items()}
        wanted = ["counts"] if "counts" in layers else sorted(
            k for k in layers if re.fullmatch(r"counts[._].+", str(k)))
        if not wanted:
            raise IngestError(
                f"{where} (Seurat v5 Assay5) has no 'counts' layer (layers: "
                f"{sorted(layers) or 'none'}); expected raw counts in layer 'counts' (or split "
                f"layers 'counts.<group>'). An object holding only normalised 'data' cannot be "
                f"used: export it with its raw counts")
        feat_names, feat_layers, feat_map = _logmap(getattr(assay, "features", None),
                                                    f"{where}: slot 'features'")
        cell_names, cell_layers, cell_map = _logmap(getattr(assay, "cells", None),
                                                    f"{where}: slot 'cells'")
        blocks, cells = [], []
        features = None
        for layer in wanted:
            mat, rows, cols = _r_sparse(layers[layer], f"{where}: layer '{layer}'")
            if layer not in feat_layers or layer not in cell_layers:
                raise IngestError(f"{where}: layer '{layer}' is not listed in the assay's "
                                  f"'features'/'cells' maps")
            lf = [n for n, keep in zip(feat_names, feat_map[:, feat_layers.index(layer)],
                                       strict=True) if keep]
            lc = [n for n, keep in zip(cell_names, cell_map[:, cell_layers.index(layer)],
                                       strict=True) if keep]
            rows, cols = rows or lf, cols or lc
            if mat.shape != (len(rows), len(cols)):
                raise IngestError(f"{where}: layer '{layer}' is {mat.shape[0]} x {mat.shape[1]} "
                                  f"but lists {len(rows)} features x {len(cols)} cells")
            if features is None:
                features = rows
            elif rows != features:  # align split layers on the first layer's features
                order = pd.Index(rows).get_indexer(features)
                if (order < 0).any():
                    raise IngestError(f"{where}: split counts layers hold different features; "
                                      f"expected the same genes in every 'counts.*' layer")
                mat = mat[order, :]
            blocks.append(mat)
            cells += cols
        return sp.hstack(blocks, format="csc"), list(features or []), cells, "v5"
    if "Assay" in cls or hasattr(assay, "counts"):
        counts = getattr(assay, "counts", None)
        empty = counts is None or (isinstance(counts, np.ndarray) and counts.size == 0) or (
            "dgCMatrix" in _r_class(counts) and int(np.prod(np.asarray(counts.Dim))) == 0)
        if empty:
            raise IngestError(
                f"{where} (Seurat v3/v4 Assay) has no raw counts: slot 'counts' is missing or "
                f"empty; expected a genes x cells dgCMatrix of raw counts. An object holding only "
                f"normalised 'data' cannot be used: export it with its raw counts")
        mat, rows, cols = _r_sparse(counts, f"{where}: slot 'counts'")
        if rows is None or cols is None:
            raise IngestError(f"{where}: slot 'counts' has no gene/cell names (Dimnames)")
        return mat, rows, cols, "v3/v4"
    raise IngestError(f"{where} is a {_r_describe(assay)}; expected an Assay (Seurat v3/v4) or "
                      f"Assay5 (Seurat v5)")


def _meta_frame(md: Any, cells: list[str], path: Path) -> pd.DataFrame:
    """meta.data as a DataFrame indexed like the counts' cells (empty columns if absent)."""
    if not isinstance(md, pd.DataFrame) or md.shape[1] == 0:
        return pd.DataFrame(index=pd.Index(cells))
    md = md.copy()
    md.index = md.index.astype(str)
    md.columns = [str(c) for c in md.columns]
    missing = pd.Index(cells).difference(md.index)
    if len(missing):
        raise IngestError(f"{path}: {len(missing)} cells of the counts are not in meta.data "
                          f"(e.g. {missing[0]}); expected one meta.data row per cell")
    return md.loc[cells]


def read_seurat(path: Path) -> RawSource:
    """A Seurat object saved by R: counts of the ``RNA`` assay (else the active one).

    v3/v4 ``Assay``: the ``counts`` slot (dgCMatrix, genes x cells, with Dimnames). v5
    ``Assay5``: the ``counts`` layer, or the split layers ``counts.<group>`` joined; layers have
    no Dimnames in v5, names come from the assay's ``features``/``cells`` maps.
    """
    obj = _find_seurat(path, _r_load(path))
    assays = getattr(obj, "assays", None)
    if not isinstance(assays, dict) or not assays:
        raise IngestError(f"{path}: the Seurat object has no assays; expected an 'RNA' assay")
    assays = {str(k): v for k, v in assays.items()}
    active = (_r_strings(getattr(obj, "active.assay", None)) or [None])[0]
    name = "RNA" if "RNA" in assays else (active if active in assays else next(iter(assays)))
    mat, genes, cells, version = _seurat_counts(path, assays[name], name)
    if len(set(cells)) != len(cells):
        dup = pd.Index(cells)[pd.Index(cells).duplicated()][0]
        raise IngestError(f"{path}: duplicated cell names in assay '{name}' (e.g. {dup})")
    obs = _meta_frame(getattr(obj, "meta.data", None), cells, path)
    var = pd.DataFrame({"symbol": genes, "gene_id": genes})
    log.info("%s: Seurat %s object, assay '%s' (%d genes x %d cells)", path, version, name,
             len(genes), len(cells))
    return RawSource(path, "seurat", var, pd.Index(cells, dtype=object), lambda: mat.T.tocsr(),
                     {"seurat_assay": name, "seurat_version": version}, obs=obs)


def guess_orientation(index: pd.Index, columns: pd.Index, source: Path | str) -> str:
    """'genes_x_cells' or 'cells_x_genes' from which axis holds gene-like names."""
    score_rows = gene_like_share(index) + (_anchor_hits(index) > _anchor_hits(columns))
    score_cols = gene_like_share(columns) + (_anchor_hits(columns) > _anchor_hits(index))
    if score_rows - score_cols >= 0.3:
        return "genes_x_cells"
    if score_cols - score_rows >= 0.3:
        return "cells_x_genes"
    raise IngestError(
        f"{source}: cannot tell which axis holds the genes (gene-like row names "
        f"{gene_like_share(index):.0%}, column names {gene_like_share(columns):.0%}); set "
        f"'orientation' in the sample sheet to genes_x_cells or cells_x_genes")


def read_dense(path: Path, fmt: str, orientation: str = "auto") -> RawSource:
    """A dense CSV/TSV table ([.gz]) with names in the first row and column."""
    sep = "," if fmt == "csv" else "\t"
    try:
        table = pd.read_csv(path, sep=sep, index_col=0, compression="infer")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError,
            EOFError) as err:
        raise IngestError(f"{path}: cannot be read as a {fmt.upper()} table ({err})") from err
    if table.shape[0] == 0 or table.shape[1] == 0:
        raise IngestError(f"{path}: the count matrix is empty ({table.shape[0]} rows x "
                          f"{table.shape[1]} columns of values)")
    non_numeric = [c for c in table.columns if not pd.api.types.is_numeric_dtype(table[c])]
    if non_numeric:
        raise IngestError(f"{path}: non-numeric values in column(s) {non_numeric[:5]} (expected "
                          f"a matrix of counts with names in the first row and column)")
    table.index = table.index.astype(str)
    table.columns = table.columns.astype(str)
    if orientation == "auto":
        orientation = guess_orientation(table.index, table.columns, path)
    if orientation == "genes_x_cells":
        genes, cells, values = table.index, table.columns, table.to_numpy().T
    else:
        genes, cells, values = table.columns, table.index, table.to_numpy()
    if np.isnan(values).any():
        raise IngestError(f"{path}: missing values (NaN/empty cells) in the count matrix")
    var = pd.DataFrame({"symbol": np.asarray(genes), "gene_id": np.asarray(genes)})
    return RawSource(path, fmt, var, pd.Index(cells), lambda: values,
                     {"orientation": orientation})


def open_source(path: str | Path, fmt: str, orientation: str = "auto") -> RawSource:
    """Check that ``path`` exists and read its names, dispatching on ``fmt``."""
    path = Path(path)
    if fmt not in FORMATS:
        raise IngestError(f"{path}: unknown format {fmt!r} (expected one of {list(FORMATS)})")
    if orientation not in ORIENTATIONS:
        raise IngestError(f"{path}: unknown orientation {orientation!r} "
                          f"(expected one of {list(ORIENTATIONS)})")
    if not path.exists():
        raise IngestError(f"{path}: file not found (format {fmt})")
    if fmt == "10x_mtx":
        return read_10x_mtx(path)
    if path.is_dir():
        raise IngestError(f"{path}: is a folder, expected a {fmt} file")
    if path.stat().st_size == 0:
        raise IngestError(f"{path}: the file is empty (0 bytes; expected a {fmt} file)")
    if fmt == "10x_h5":
        return read_10x_h5(path)
    if fmt == "h5ad":
        return read_h5ad(path)
    if fmt == "seurat":
        return read_seurat(path)
    return read_dense(path, fmt, orientation)


# --- combined files: which cells belong to which sample --------------------------------------

def read_cell_table(path: Path, cell_column: str, sample_column: str) -> pd.Series:
    """barcode -> split value from a cell table (TSV, or CSV by suffix; [.gz])."""
    sep = "," if ".csv" in path.name.lower() else "\t"
    if not path.is_file():
        raise IngestError(f"{path}: cell table not found (split by table)")
    try:
        table = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, na_values=[""])
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError,
            EOFError) as err:
        raise IngestError(f"{path}: cannot be read as a cell table ({err})") from err
    missing = [c for c in (cell_column, sample_column) if c not in table.columns]
    if missing:
        raise IngestError(f"{path}: column(s) {missing} not found (split by table needs "
                          f"cell_column '{cell_column}' and sample_column '{sample_column}'; "
                          f"columns: {list(table.columns)[:20]})")
    if table[cell_column].duplicated().any():
        dup = table.loc[table[cell_column].duplicated(), cell_column].iloc[0]
        raise IngestError(f"{path}: column '{cell_column}': cell '{dup}' is listed twice "
                          f"(expected one row per cell)")
    return table.set_index(cell_column)[sample_column]


def split_values(src: RawSource, split: Mapping[str, Any], table: Path | None = None
                 ) -> pd.Series:
    """Each cell's value of a combined file's split key, indexed by barcode (NaN: no value).

    ``split``: ``{by: obs, column}`` (an h5ad ``obs`` / Seurat ``meta.data`` column),
    ``{by: barcode, pattern}`` (regex whose first group is the value) or ``{by: table,
    cell_column, sample_column}`` (a cell table at ``table``).
    """
    by = split.get("by")
    index = pd.Index(src.barcodes, dtype=object)
    if by == "obs":
        col = str(split.get("column"))
        if src.obs is None or col not in src.obs.columns:
            avail = [str(c) for c in src.obs.columns][:20] if src.obs is not None else []
            what = "meta.data" if src.fmt == "seurat" else "obs"
            raise IngestError(f"{src.path}: split column '{col}' not found in the {what} "
                              f"(columns: {avail or 'none'}); set files[].split.column in the "
                              f"study file to one of them")
        values = src.obs[col]
        return pd.Series(values.astype(object).where(values.notna(), None).to_numpy(),
                         index=index, dtype=object).map(lambda v: None if v is None else str(v))
    if by == "barcode":
        rx = re.compile(str(split.get("pattern")))
        found = [rx.search(str(b)) for b in src.barcodes]
        return pd.Series([m.group(1) if m else None for m in found], index=index, dtype=object)
    if by == "table":
        if table is None:
            raise IngestError(f"{src.path}: split by table needs the cell table's path")
        mapping = read_cell_table(Path(table), str(split.get("cell_column")),
                                  str(split.get("sample_column")))
        return pd.Series(mapping.reindex(index).to_numpy(), index=index, dtype=object)
    raise IngestError(f"{src.path}: unknown split {dict(split)} (expected by: one of "
                      f"{list(SPLIT_BY)})")


def _select_cells(src: RawSource, combined: Mapping[str, Any], sample: str, value: str
                  ) -> np.ndarray:
    """Positions of the cells of one sample in a combined file."""
    values = split_values(src, combined["split"], combined.get("table"))
    hits = np.flatnonzero((values == value).to_numpy())
    if not len(hits):
        present = sorted(v for v in values.dropna().unique())
        key = combined["split"].get("column") or combined["split"].get("by")
        raise IngestError(f"{src.path}: no cell has split value '{value}' (sample '{sample}', "
                          f"split by {combined['split']['by']} '{key}'); values in the file: "
                          f"{present[:20]}{' ...' if len(present) > 20 else ''}")
    return hits


def _source_obs(obs: pd.DataFrame | None, rows: np.ndarray | None) -> dict[str, Any]:
    """The file's cell metadata as ``source_<column>`` obs columns (strings categorical)."""
    if obs is None or obs.shape[1] == 0:
        return {}
    part = obs.iloc[rows] if rows is not None else obs
    out: dict[str, Any] = {}
    for col in part.columns:
        values = part[col]
        if pd.api.types.is_bool_dtype(values) and not values.isna().any():
            out[f"source_{col}"] = values.to_numpy(dtype=bool)
        elif pd.api.types.is_numeric_dtype(values):
            out[f"source_{col}"] = values.to_numpy(dtype=float, na_value=np.nan)
        else:
            text = values.astype(object).where(values.notna(), None)
            out[f"source_{col}"] = pd.Categorical(
                [None if v is None else str(v) for v in text])
    return out


# --- checks and assembly ---------------------------------------------------------------------

def as_count_matrix(X: sp.spmatrix | np.ndarray, source: Path | str) -> sp.csr_matrix:
    """CSR cells x genes, checked: non-empty, finite, non-negative integers."""
    X = sp.csr_matrix(X)
    if X.shape[0] == 0 or X.shape[1] == 0 or X.nnz == 0 or not np.any(X.data):
        raise IngestError(f"{source}: the count matrix is empty ({X.shape[0]} cells x "
                          f"{X.shape[1]} genes, {int(np.count_nonzero(X.data))} non-zero values)")
    data = X.data
    if not np.issubdtype(data.dtype, np.number) or np.issubdtype(data.dtype, np.complexfloating):
        raise IngestError(f"{source}: the matrix holds {data.dtype} values (expected counts)")
    if np.issubdtype(data.dtype, np.floating):
        if not np.isfinite(data).all():
            raise IngestError(f"{source}: the matrix holds NaN or infinite values "
                              f"(expected raw counts)")
        frac = data != np.round(data)
        if frac.any():
            examples = ", ".join(f"{v:.4g}" for v in data[frac][:3])
            raise IngestError(
                f"{source}: {frac.mean():.1%} of the non-zero values are not integers (e.g. "
                f"{examples}): the data look normalised or log-transformed; ingest needs raw "
                f"counts (UMI or read counts). Point the sample sheet at the raw matrix (or an "
                f"h5ad whose layers['counts'] holds them)")
    if (data < 0).any():
        raise IngestError(f"{source}: the matrix holds negative values (e.g. {data[data < 0][0]}); "
                          f"expected raw counts (scaled or centred data were given)")
    X.eliminate_zeros()
    dtype = np.float32 if (X.data.max() if X.nnz else 0) < _FLOAT32_EXACT else np.float64
    X = X.astype(dtype)
    X.sort_indices()
    return X


def merge_duplicate_symbols(X: sp.csr_matrix, var: pd.DataFrame
                            ) -> tuple[sp.csr_matrix, pd.DataFrame, int]:
    """Sum the counts of features sharing a gene symbol; return (X, var, n duplicated symbols).

    Several Ensembl ids can map to one symbol (paralogous loci, readthrough, patches); their
    counts are summed under the symbol, so that signatures written in symbols see all of them.
    ``var['gene_ids']`` keeps every merged id (``;``-joined) and ``var['n_features']`` how many.
    """
    symbols = var["symbol"].astype(str).to_numpy()
    codes, uniques = pd.factorize(symbols)
    n_dup = int((pd.Series(codes).value_counts() > 1).sum())
    ids = var["gene_id"].astype(str).groupby(codes).agg(";".join)
    n_feat = pd.Series(codes).value_counts().sort_index()
    out = pd.DataFrame({"gene_ids": ids.to_numpy(), "n_features": n_feat.to_numpy()},
                       index=pd.Index(uniques, name=None))
    if "feature_type" in var:
        out["feature_types"] = var["feature_type"].groupby(codes).first().to_numpy()
    if n_dup == 0:
        return X, out, 0
    agg = sp.csr_matrix((np.ones(len(codes), dtype=X.dtype), (np.arange(len(codes)), codes)),
                        shape=(len(codes), len(uniques)))
    return (X @ agg).tocsr(), out, n_dup


def _sheet_obs(row: Mapping[str, Any], study: str, species: str) -> dict[str, str]:
    values = {k: str(v) for k, v in row.items()
              if k not in NON_OBS_COLUMNS and v is not None and not (isinstance(v, float)
                                                                      and np.isnan(v))}
    values.setdefault("animal", values["sample"])
    values.setdefault("batch", values["sample"])
    values["study"] = study
    values["species"] = species
    first = ["study", "sample", "arm", "animal", "batch", "species"]
    return {k: values[k] for k in first} | {k: v for k, v in values.items() if k not in first}


def ingest_sample(path: str | Path, row: Mapping[str, Any], study: str, species: str,
                  combined: Mapping[str, Any] | None = None) -> ad.AnnData:
    """Read, check and annotate one sample (``row``: its sample-sheet row as a mapping).

    ``combined`` (a study file's ``files`` entry with layout combined: ``format``, ``split``,
    optional ``orientation`` and ``table``, the cell table's path) makes ``path`` a file holding
    several samples, of which the cells with the row's ``split_value`` are this sample.
    """
    sample = str(row["sample"])
    if combined:
        fmt = str(combined.get("format") or "")
        orientation = str(combined.get("orientation") or "auto")
    else:
        fmt = str(row.get("format") or "")
        orientation = str(row.get("orientation") or "auto")
    if not fmt:
        raise IngestError(f"{path}: sample '{sample}' has no 'format' in the sample sheet "
                          f"(expected one of {list(FORMATS)})")
    src = open_source(path, fmt, orientation)
    var = src.var.copy()
    n_features = len(var)
    dropped = 0
    if "feature_type" in var:
        keep = var["feature_type"].str.lower().isin(["gene expression", "gene_expression"])
        if keep.any():
            dropped = int((~keep).sum())
        else:  # no feature labelled as gene expression: keep every feature
            keep = pd.Series(True, index=var.index)
    else:
        keep = pd.Series(True, index=var.index)
    var = var[keep.to_numpy()].reset_index(drop=True)
    blank = var["symbol"].isin(["", "nan", "NA", "None"])
    var.loc[blank, "symbol"] = var.loc[blank, "gene_id"]
    fit = check_species(var["symbol"].tolist(), species, src.path)
    rows: np.ndarray | None = None
    barcodes = src.barcodes
    if combined:
        value = str(row.get("split_value") or "")
        if not value:
            raise IngestError(f"{path}: sample '{sample}' of a combined file has no "
                              f"'split_value' in the sample sheet (its value of the split key)")
        rows = _select_cells(src, combined, sample, value)
        barcodes = src.barcodes[rows]
    if len(barcodes) == 0 or len(var) == 0:
        raise IngestError(f"{src.path}: the count matrix is empty ({len(barcodes)} cells x "
                          f"{len(var)} genes)")
    dup_bc = barcodes[barcodes.duplicated()]
    if len(dup_bc):
        raise IngestError(f"{src.path}: {len(dup_bc)} duplicated barcodes (e.g. {dup_bc[0]}); "
                          f"a sample must have unique cell barcodes")
    matrix = src.load()
    if rows is not None:
        matrix = sp.csr_matrix(matrix)[rows] if sp.issparse(matrix) else np.asarray(matrix)[rows]
    where = src.path if rows is None else f"{src.path} (sample '{sample}')"
    X = as_count_matrix(matrix, where)
    X = X[:, np.flatnonzero(keep.to_numpy())] if dropped else X
    X, var_out, n_dup = merge_duplicate_symbols(X, var)
    obs_values = _sheet_obs(row, study, species)
    obs = pd.DataFrame({k: pd.Categorical([v] * X.shape[0]) for k, v in obs_values.items()},
                       index=pd.Index([f"{sample}:{b}" for b in barcodes]))
    obs.insert(0, "barcode", barcodes.to_numpy())
    for col, values in _source_obs(src.obs, rows).items():
        obs[col] = values
    adata = ad.AnnData(X=None, obs=obs, var=var_out, layers={"counts": X})
    adata.uns["ingest"] = {
        "source_file": str(src.path), "format": fmt, **{k: str(v) for k, v in src.info.items()},
        "n_cells": int(X.shape[0]), "n_features_in_file": int(n_features),
        "n_non_gene_features_dropped": dropped, "n_duplicated_symbols": n_dup,
        "n_features_merged": int(len(var) - var_out.shape[0]),
        "duplicate_symbols": "summed",
        "species_check": {k: (float(v) if isinstance(v, float) else v) for k, v in fit.items()},
    }
    if combined:
        adata.uns["ingest"]["split"] = {"by": str(combined["split"]["by"]),
                                        "key": str(combined["split"].get("column")
                                                   or combined["split"].get("pattern")
                                                   or combined["split"].get("sample_column")),
                                        "value": str(row["split_value"]),
                                        "n_cells_in_file": len(src.barcodes)}
    log.info("%s: %d cells x %d genes (%d duplicated symbols summed, %d non-gene features "
             "dropped)", where, X.shape[0], X.shape[1], n_dup, dropped)
    return adata


def sample_path(input_path: str | Path, row: Mapping[str, Any], simulated: bool) -> Path:
    """The sample's file: ``<input>/<path>`` for a simulated study, else the rule's input."""
    return Path(input_path) / str(row["path"]) if simulated else Path(input_path)


def rule_ingest(smk: Any) -> None:
    """Rule ``ingest``: write ``results/{study}/raw/{sample}.h5ad``."""
    row = dict(smk.params.sample_row)
    combined = dict(smk.params.combined or {})
    data = smk.input.data
    first = data if isinstance(data, str) else data[0]  # combined: [file, cell table]
    path = sample_path(first, row, bool(smk.params.simulated))
    adata = ingest_sample(path, row, study=smk.wildcards.study, species=smk.params.species,
                          combined=combined or None)
    Path(smk.output.h5ad).parent.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(smk.output.h5ad, compression="gzip")

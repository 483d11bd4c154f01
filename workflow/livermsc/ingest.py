"""Read one sample's counts (10x mtx/h5, h5ad, dense CSV/TSV) into a checked AnnData.

Every reader first reads the gene and barcode names (cheap) and only then the matrix, so that
a file of the wrong species is refused before the counts are loaded. The result of
:func:`ingest_sample` holds raw counts as a CSR matrix (float32 holding integers; float64
where a value exceeds 2**24) in ``X`` and ``layers["counts"]``, unique gene symbols as
``var_names`` (duplicated symbols are *summed*, see :func:`merge_duplicate_symbols`), obs names
``<sample>:<barcode>`` and the sample sheet's columns as categorical ``obs``.

Every refusal is an :class:`IngestError` whose message starts with the file's path.
"""

from __future__ import annotations

import gzip
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.io
import scipy.sparse as sp

log = logging.getLogger("livermsc.ingest")

FORMATS = ("10x_mtx", "10x_h5", "h5ad", "csv", "tsv")
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


def read_10x_h5(path: Path) -> RawSource:
    """A CellRanger .h5 file: v3 layout (``/matrix``) or v2 (one group per genome)."""
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
    from anndata.io import read_elem

    try:
        fh = h5py.File(path, "r")
    except OSError as err:
        raise IngestError(f"{path}: not a readable HDF5/h5ad file ({err})") from err
    with fh:
        if "var" not in fh or "obs" not in fh or "X" not in fh:
            raise IngestError(f"{path}: not an AnnData file (needs /X, /obs, /var)")
        var_in = read_elem(fh["var"])
        obs_names = pd.Index(read_elem(fh["obs"]).index.astype(str))
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
        with h5py.File(path, "r") as f:
            return read_elem(f[layer])

    return RawSource(path, "h5ad", var, obs_names, load, {"matrix": layer})


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
    if fmt == "10x_h5":
        return read_10x_h5(path)
    if fmt == "h5ad":
        return read_h5ad(path)
    return read_dense(path, fmt, orientation)


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


def ingest_sample(path: str | Path, row: Mapping[str, Any], study: str, species: str
                  ) -> ad.AnnData:
    """Read, check and annotate one sample (``row``: its sample-sheet row as a mapping)."""
    sample = str(row["sample"])
    fmt = str(row.get("format") or "")
    if not fmt:
        raise IngestError(f"{path}: sample '{sample}' has no 'format' in the sample sheet "
                          f"(expected one of {list(FORMATS)})")
    orientation = str(row.get("orientation") or "auto")
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
    if len(src.barcodes) == 0 or len(var) == 0:
        raise IngestError(f"{src.path}: the count matrix is empty ({len(src.barcodes)} cells x "
                          f"{len(var)} genes)")
    dup_bc = src.barcodes[src.barcodes.duplicated()]
    if len(dup_bc):
        raise IngestError(f"{src.path}: {len(dup_bc)} duplicated barcodes (e.g. {dup_bc[0]}); "
                          f"a file must hold one sample with unique cell barcodes")
    X = as_count_matrix(src.load(), src.path)
    X = X[:, np.flatnonzero(keep.to_numpy())] if dropped else X
    X, var_out, n_dup = merge_duplicate_symbols(X, var)
    obs_values = _sheet_obs(row, study, species)
    obs = pd.DataFrame({k: pd.Categorical([v] * X.shape[0]) for k, v in obs_values.items()},
                       index=pd.Index([f"{sample}:{b}" for b in src.barcodes]))
    obs.insert(0, "barcode", src.barcodes.to_numpy())
    adata = ad.AnnData(X=X, obs=obs, var=var_out)
    adata.layers["counts"] = X.copy()
    adata.uns["ingest"] = {
        "source_file": str(src.path), "format": fmt, **{k: str(v) for k, v in src.info.items()},
        "n_cells": int(X.shape[0]), "n_features_in_file": int(n_features),
        "n_non_gene_features_dropped": dropped, "n_duplicated_symbols": n_dup,
        "n_features_merged": int(len(var) - var_out.shape[0]),
        "duplicate_symbols": "summed",
        "species_check": {k: (float(v) if isinstance(v, float) else v) for k, v in fit.items()},
    }
    log.info("%s: %d cells x %d genes (%d duplicated symbols summed, %d non-gene features "
             "dropped)", src.path, X.shape[0], X.shape[1], n_dup, dropped)
    return adata


def sample_path(input_path: str | Path, row: Mapping[str, Any], simulated: bool) -> Path:
    """The sample's file: ``<input>/<path>`` for a simulated study, else the rule's input."""
    return Path(input_path) / str(row["path"]) if simulated else Path(input_path)


def snakemake_entry(smk: Any) -> None:
    """Rule ``ingest``: write ``results/{study}/raw/{sample}.h5ad``."""
    row = dict(smk.params.sample_row)
    path = sample_path(smk.input.data, row, bool(smk.params.simulated))
    adata = ingest_sample(path, row, study=smk.wildcards.study, species=smk.params.species)
    Path(smk.output.h5ad).parent.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(smk.output.h5ad, compression="gzip")

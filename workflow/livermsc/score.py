"""Signature scores per cell and per sample, pseudobulk profiles and cell-type shares.

The biological sample is the unit that later statistics compare, so everything here ends in one
value per sample x population x measure x method (``sample_scores.tsv``, long format):

* **populations** are the values of ``obs["cell_type"]`` and ``obs["cell_state"]`` (the levels in
  ``score.population_levels``); the whole sample is the population ``all``;
* **signature scores** (``measure_type == "signature"``), one per method in ``score.methods``:

  - ``voom`` (primary): the per-animal score of the signature test (:mod:`livermsc.geneset`):
    counts summed per sample x population; per population, over the study's samples with at
    least ``min_cells`` cells, TMM size factors, the expression filter (``min_count``,
    ``min_total_count``, judged at the smallest library and the smallest arm) and voom precision
    weights; the score is the precision-weighted mean of the kept genes' log2-CPM, centred per
    gene (log2 units: a difference of scores is a log2 fold change);
  - ``pseudobulk_z``: edgeR-style log-CPM (TMM effective library sizes, a prior count of 2
    scaled by library size) of the kept signature genes, each z-scored across the population's
    samples, averaged over genes (every gene weighs the same; genes without variation are left
    out);
  - ``pseudobulk_mean``: mean of the same log-CPM over the kept signature genes;
  - ``ssgsea``: single-sample GSEA (gseapy) enrichment score of the pseudobulk profile, with local
    gene sets built from the signatures file (no download);
  - ``score_genes``: mean over the sample's cells of scanpy's per-cell ``score_genes``;
  - ``ulm``: mean over the sample's cells of decoupler's per-cell univariate linear model score;

  samples whose population has fewer than ``min_cells`` cells get no value (NaN, with n_cells);
* **shares** (``measure_type == "share"``, method ``proportion``): a population's cells over a
  parent population's cells in the sample: every population over ``all``, every cell state over
  the cell type it belongs to, and any population/parent pair a claims catalogue asks for.

Per-cell scores use log-normalised counts made here from ``layers["counts"]`` (total 1e4, log1p),
so that scores do not depend on how an earlier stage normalised ``X``.

``population_coverage`` reports, per signature and population, the genes found in the data and
the genes the expression filter keeps (``n_genes_used``), which the pseudobulk methods use.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import decoupler as dc
import gseapy
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp

from livermsc import geneset
from livermsc.catalogue import load_catalogue, load_signatures
from livermsc.config import score_settings
from livermsc.vocabulary import ALL, POPULATION_LEVELS, SHARE_METHOD, share_measure

log = logging.getLogger("livermsc.score")

PSEUDOBULK_METHODS = ("voom", "pseudobulk_z", "pseudobulk_mean")
PRIOR_COUNT = 2.0  # edgeR cpm(log = TRUE) prior count, scaled by library size
CELL_METHODS = ("score_genes", "ulm")
SAMPLE_INFO = ("sample", "animal", "arm", "batch", "stage")
SCORE_COLUMNS = ["study", "sample", "animal", "arm", "batch", "stage", "population_level",
                 "population", "measure_type", "measure", "method", "value", "n_cells",
                 "n_parent_cells"]

COVERAGE_COLUMNS = ["signature", "population_level", "population", "n_samples", "n_genes",
                    "n_found", "n_genes_used", "genes_used", "usable"]


# --- signatures ---------------------------------------------------------------------------------

def write_gmt(gene_sets: Mapping[str, Sequence[str]], path: str | Path) -> Path:
    """Write gene sets as a GMT file (name, description, genes; tab-separated)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        for name, genes in gene_sets.items():
            fh.write("\t".join([name, "livermsc signature", *genes]) + "\n")
    return path


def symbol_lookup(adata: ad.AnnData) -> dict[str, str]:
    """Gene symbol -> var name: var names, or ``var["symbol"]`` when var names are not symbols."""
    names = adata.var_names.astype(str)
    lookup = {n: n for n in names}
    for col in ("symbol", "gene_symbols", "gene_symbol", "feature_name"):
        if col in adata.var:
            for name, sym in zip(names, adata.var[col].astype(str), strict=True):
                lookup.setdefault(sym, name)
            break
    return lookup


def signature_coverage(signatures: Mapping[str, Sequence[str]], adata: ad.AnnData,
                       min_genes: int) -> pd.DataFrame:
    """Per signature: genes listed, genes found in the data, fraction, the missing genes, usable."""
    lookup = symbol_lookup(adata)
    rows = []
    for sid, genes in signatures.items():
        found = [g for g in genes if g in lookup]
        missing = [g for g in genes if g not in lookup]
        rows.append({"signature": sid, "n_genes": len(genes), "n_found": len(found),
                     "fraction": len(found) / len(genes) if genes else 0.0,
                     "genes_missing": ",".join(missing), "genes_found": ",".join(found),
                     "usable": len(found) >= min_genes})
    return pd.DataFrame(rows, columns=["signature", "n_genes", "n_found", "fraction",
                                       "genes_missing", "genes_found", "usable"])


def usable_gene_sets(signatures: Mapping[str, Sequence[str]], adata: ad.AnnData,
                     min_genes: int) -> dict[str, list[str]]:
    """Signatures with at least ``min_genes`` genes in the data, as lists of var names."""
    lookup = symbol_lookup(adata)
    sets = {}
    for sid, genes in signatures.items():
        found = list(dict.fromkeys(lookup[g] for g in genes if g in lookup))
        if len(found) >= min_genes:
            sets[sid] = found
    return sets


# --- inputs ---------------------------------------------------------------------------------------

def check_adata(adata: ad.AnnData, levels: Iterable[str], source: str = "AnnData") -> None:
    """Fail early, naming what is missing, when ``adata`` lacks what scoring needs."""
    need = ["sample", "arm", *levels]
    missing = [c for c in need if c not in adata.obs]
    if missing:
        raise ValueError(f"{source}: obs lacks column(s) {missing} (expected: {need}, plus "
                         "optional animal, batch, stage)")
    counts = adata.layers["counts"] if "counts" in adata.layers else adata.X
    data = counts.data if sp.issparse(counts) else np.asarray(counts)
    if data.size and (np.any(data < 0) or not np.allclose(data[: 100000], np.round(data[: 100000]))):
        raise ValueError(f"{source}: layers['counts'] (or X) must hold raw integer counts")
    if adata.n_obs == 0:
        raise ValueError(f"{source}: no cells")


def counts_matrix(adata: ad.AnnData) -> sp.csr_matrix:
    """Raw counts (``layers["counts"]``, else ``X``) as a float32 CSR matrix."""
    counts = adata.layers["counts"] if "counts" in adata.layers else adata.X
    return sp.csr_matrix(counts, dtype=np.float32)


def lognorm(adata: ad.AnnData) -> ad.AnnData:
    """A copy holding counts normalised to 1e4 per cell and log1p-transformed in ``X``."""
    out = ad.AnnData(X=counts_matrix(adata), obs=adata.obs.copy(), var=adata.var[[]].copy())
    sc.pp.normalize_total(out, target_sum=1e4)
    sc.pp.log1p(out)
    return out


def sample_table(obs: pd.DataFrame) -> pd.DataFrame:
    """One row per sample: animal (default: the sample), arm, batch (default: the sample), stage."""
    df = pd.DataFrame({"sample": obs["sample"].astype(str).to_numpy(),
                       "arm": obs["arm"].astype(str).to_numpy()}, index=obs.index)
    for col in ("animal", "batch", "stage"):
        default = "" if col == "stage" else df["sample"]
        if col in obs:
            values = obs[col].astype(object)
            df[col] = values.where(values.notna(), default).astype(str)
        else:
            df[col] = default
    info = df.groupby("sample", observed=True, sort=True)[list(SAMPLE_INFO[1:])].first()
    arms = df.groupby("sample", observed=True)["arm"].nunique()
    if (arms > 1).any():
        raise ValueError(f"samples {arms[arms > 1].index.tolist()} have cells in more than one arm")
    return info.reset_index()


# --- per-cell scores ------------------------------------------------------------------------------

def score_cells(norm: ad.AnnData, gene_sets: Mapping[str, Sequence[str]],
                methods: Iterable[str] = CELL_METHODS, seed: int = 0, ctrl_size: int = 50,
                ) -> pd.DataFrame:
    """Per-cell signature scores (columns ``<method>:<signature>``), also written into ``obs``.

    ``norm`` holds log-normalised expression in ``X``. ``score_genes`` is scanpy's (control
    genes matched by expression bin, seeded); ``ulm`` is decoupler's univariate linear model of
    each cell's expression on signature membership (t-value of the slope).
    """
    methods = [m for m in methods if m in CELL_METHODS]
    out = pd.DataFrame(index=norm.obs_names)
    if not gene_sets:
        return out
    if "score_genes" in methods:
        tmp = ad.AnnData(X=norm.X, obs=pd.DataFrame(index=norm.obs_names), var=norm.var[[]])
        for sid, genes in gene_sets.items():
            sc.tl.score_genes(tmp, list(genes), ctrl_size=ctrl_size, random_state=seed,
                              score_name="_score", use_raw=False)
            out[f"score_genes:{sid}"] = tmp.obs["_score"].to_numpy()
    if "ulm" in methods:
        net = pd.DataFrame([(sid, g, 1.0) for sid, genes in gene_sets.items() for g in genes],
                           columns=["source", "target", "weight"])
        tmp = ad.AnnData(X=sp.csr_matrix(norm.X), obs=pd.DataFrame(index=norm.obs_names),
                         var=norm.var[[]])
        tmin = min(len(g) for g in gene_sets.values())
        res = dc.mt.ulm(tmp, net, tmin=tmin, bsize=500, verbose=False)
        scores = (res if res is not None else tmp).obsm["score_ulm"]
        scores = scores.reindex(index=norm.obs_names)
        for sid in gene_sets:
            if sid in scores:
                out[f"ulm:{sid}"] = scores[sid].to_numpy(dtype=float)
    for col in out:
        norm.obs[col] = out[col]
    return out


# --- pseudobulk -----------------------------------------------------------------------------------

def _groups(obs: pd.DataFrame, levels: Iterable[str]) -> pd.DataFrame:
    """Cell -> (sample, population_level, population) memberships, the whole sample as ``all``."""
    frames = [pd.DataFrame({"cell": np.arange(len(obs)), "sample": obs["sample"].astype(str).to_numpy(),
                            "population_level": ALL, "population": ALL})]
    for level in levels:
        frames.append(pd.DataFrame({"cell": np.arange(len(obs)),
                                    "sample": obs["sample"].astype(str).to_numpy(),
                                    "population_level": level,
                                    "population": obs[level].astype(str).to_numpy()}))
    return pd.concat(frames, ignore_index=True)


def pseudobulk(adata: ad.AnnData, levels: Iterable[str] = POPULATION_LEVELS) -> ad.AnnData:
    """Summed counts per sample x population (every level, plus ``all``) with log2(CPM + 1) in X.

    ``obs`` holds sample, animal, arm, batch, stage, population_level, population, n_cells;
    ``layers["counts"]`` the summed counts.
    """
    counts = counts_matrix(adata)
    members = _groups(adata.obs, levels)
    keys = members[["sample", "population_level", "population"]].drop_duplicates()
    keys = keys.sort_values(["population_level", "population", "sample"]).reset_index(drop=True)
    keys["group"] = np.arange(len(keys))
    members = members.merge(keys, on=["sample", "population_level", "population"])
    indicator = sp.csr_matrix((np.ones(len(members), np.float32),
                               (members["group"].to_numpy(), members["cell"].to_numpy())),
                              shape=(len(keys), adata.n_obs))
    summed = (indicator @ counts).toarray()
    n_cells = np.asarray(indicator.sum(axis=1)).ravel().astype(int)
    lib = summed.sum(axis=1, keepdims=True)
    cpm = np.divide(summed, lib, out=np.zeros_like(summed), where=lib > 0) * 1e6
    info = sample_table(adata.obs)
    obs = keys.drop(columns="group").merge(info, on="sample", how="left")
    obs["n_cells"] = n_cells
    obs.index = (obs["sample"] + "|" + obs["population_level"] + "|" + obs["population"]).to_numpy()
    obs = obs[["sample", "animal", "arm", "batch", "stage", "population_level", "population",
               "n_cells"]]
    pb = ad.AnnData(X=np.log2(cpm + 1).astype(np.float32), obs=obs,
                    var=pd.DataFrame(index=adata.var_names.astype(str)))
    pb.layers["counts"] = summed.astype(np.float32)
    return pb


def _zscore_mean(values: np.ndarray) -> np.ndarray:
    """Mean over genes (columns) of values z-scored across rows; constant genes are left out."""
    if values.shape[0] < 2 or values.shape[1] == 0:
        return np.full(values.shape[0], np.nan)
    sd = values.std(axis=0, ddof=1)
    keep = sd > 1e-9
    if not keep.any():
        return np.full(values.shape[0], np.nan)
    z = (values[:, keep] - values[:, keep].mean(axis=0)) / sd[keep]
    return z.mean(axis=1)


def edger_log_cpm(counts: np.ndarray, lib_size: np.ndarray, prior_count: float = PRIOR_COUNT
                  ) -> np.ndarray:
    """edgeR ``cpm(log = TRUE)``: log2((y + p_j) / (N_j + 2 p_j) * 1e6), ``p_j = prior * N_j /
    mean(N)`` (genes x samples), so the prior is the same in CPM units for every library."""
    lib = np.asarray(lib_size, float)
    prior = prior_count * lib / lib.mean()
    return np.log2((counts + prior[None, :]) / (lib + 2 * prior)[None, :] * 1e6)


def arm_design(arms: Sequence[str]) -> pd.DataFrame:
    """One-way design over arms: an intercept and an indicator per arm after the first."""
    arms = pd.Series([str(a) for a in arms])
    levels = sorted(arms.unique())
    cols = {"intercept": np.ones(len(arms))}
    for level in levels[1:]:
        cols[f"arm[{level}]"] = (arms == level).to_numpy(float)
    return pd.DataFrame(cols)


def population_signature_scores(pb: ad.AnnData, gene_sets: Mapping[str, Sequence[str]],
                                methods: Iterable[str], min_cells: int, min_genes: int = 3,
                                min_count: float = 10.0, min_total_count: float = 15.0,
                                ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``voom``, ``pseudobulk_z`` and ``pseudobulk_mean`` scores, per population over the
    study's samples with at least ``min_cells`` cells, and the genes each population uses.

    Per population: TMM effective library sizes and the expression filter of
    :mod:`livermsc.geneset` over those samples (arms as groups); a signature with fewer than
    ``min_genes`` kept genes gets no value. Returns the long table (pb, measure, method, value)
    and the coverage table (``COVERAGE_COLUMNS``).
    """
    methods = [m for m in methods if m in PSEUDOBULK_METHODS]
    counts_all = pb.layers["counts"] if "counts" in pb.layers else pb.X
    counts_all = counts_all.toarray() if sp.issparse(counts_all) else np.asarray(counts_all)
    ok = pb.obs["n_cells"].to_numpy() >= min_cells
    var_names = pb.var_names.astype(str)
    values = {m: pd.DataFrame(np.nan, index=pb.obs_names, columns=list(gene_sets))
              for m in methods}
    cov_rows = []
    grouped = pb.obs.assign(_ok=ok).groupby(["population_level", "population"], observed=True,
                                            sort=True)
    for (level, pop), grp in grouped:
        names = grp.index[grp["_ok"].to_numpy()]
        if len(names) < 2:
            for sid, genes in gene_sets.items():
                cov_rows.append({"signature": sid, "population_level": level, "population": pop,
                                 "n_samples": len(names), "n_genes": len(genes),
                                 "n_found": len(genes), "n_genes_used": 0, "genes_used": "",
                                 "usable": False})
            continue
        pos = pb.obs_names.get_indexer(names)
        counts = pd.DataFrame(counts_all[pos].T.astype(float), index=var_names, columns=names)
        arms = grp.loc[names, "arm"].astype(str).to_numpy()
        design = arm_design(arms).set_axis(names)
        vs = geneset.signature_scores(counts, design, gene_sets, group=arms, min_count=min_count,
                                      min_total_count=min_total_count, min_genes=min_genes,
                                      voom="voom" in methods)
        for note in dict.fromkeys(vs.notes):
            log.info("population %s=%s: %s", level, pop, note)
        eff = (counts.sum(axis=0).to_numpy() * vs.norm_factors.to_numpy()
               if vs.norm_factors.notna().all() else None)
        for sid, genes in gene_sets.items():
            used = vs.genes_used[sid]
            usable = len(used) >= min_genes and eff is not None
            cov_rows.append({"signature": sid, "population_level": level, "population": pop,
                             "n_samples": len(names), "n_genes": len(genes),
                             "n_found": vs.n_found[sid], "n_genes_used": len(used),
                             "genes_used": ",".join(used), "usable": usable})
            if not usable:
                continue
            if "voom" in methods:
                values["voom"].loc[names, sid] = vs.scores[sid].to_numpy()
            if {"pseudobulk_z", "pseudobulk_mean"} & set(methods):
                logcpm = edger_log_cpm(counts.loc[used].to_numpy(), eff).T   # samples x genes
                if "pseudobulk_mean" in methods:
                    values["pseudobulk_mean"].loc[names, sid] = logcpm.mean(axis=1)
                if "pseudobulk_z" in methods:
                    values["pseudobulk_z"].loc[names, sid] = _zscore_mean(logcpm)
    frames = [values[m].rename_axis("pb").reset_index()
              .melt(id_vars="pb", var_name="measure", value_name="value").assign(method=m)
              for m in methods]
    long = (pd.concat(frames, ignore_index=True)[["pb", "measure", "method", "value"]] if frames
            else pd.DataFrame(columns=["pb", "measure", "method", "value"]))
    return long, pd.DataFrame(cov_rows, columns=COVERAGE_COLUMNS)


def pseudobulk_scores(pb: ad.AnnData, gene_sets: Mapping[str, Sequence[str]],
                      methods: Iterable[str], min_cells: int, seed: int = 0,
                      ssgsea_weight: float = 0.25, threads: int = 1, min_genes: int = 3,
                      min_count: float = 10.0, min_total_count: float = 15.0,
                      ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Sample-level signature scores from the pseudobulk (``voom``, ``pseudobulk_z``,
    ``pseudobulk_mean``, ``ssgsea``); rows below ``min_cells`` cells get NaN. Returns the long
    table without sample info and the per-population coverage table."""
    methods = [m for m in methods if m in (*PSEUDOBULK_METHODS, "ssgsea")]
    ok = pb.obs["n_cells"].to_numpy() >= min_cells
    long, coverage = population_signature_scores(pb, gene_sets, methods, min_cells, min_genes,
                                                 min_count, min_total_count)
    rows = [long]
    if "ssgsea" in methods and gene_sets and ok.any():
        rows.append(_ssgsea(pb[ok], gene_sets, seed=seed, weight=ssgsea_weight, threads=threads))
    rows = [r for r in rows if len(r)]
    if not rows or not methods:
        return pd.DataFrame(columns=["pb", "measure", "method", "value"]), coverage
    out = pd.concat(rows, ignore_index=True)
    # ssGSEA skips sub-threshold rows; give them explicit NaN so every method has every row
    full = pd.MultiIndex.from_product([pb.obs_names, list(gene_sets), methods],
                                      names=["pb", "measure", "method"])
    out = out.set_index(["pb", "measure", "method"])["value"].reindex(full).reset_index()
    return out, coverage


def _ssgsea(pb: ad.AnnData, gene_sets: Mapping[str, Sequence[str]], seed: int, weight: float,
            threads: int) -> pd.DataFrame:
    """ssGSEA enrichment scores (gseapy, local gene sets) of each pseudobulk profile."""
    expr = pd.DataFrame(np.asarray(pb.X).T, index=pb.var_names, columns=pb.obs_names)
    expr = expr.loc[expr.var(axis=1) > 0]
    sets = {k: [g for g in v if g in expr.index] for k, v in gene_sets.items()}
    sets = {k: v for k, v in sets.items() if v}
    if not sets or expr.shape[1] == 0:
        return pd.DataFrame(columns=["pb", "measure", "method", "value"])
    min_size = min(len(v) for v in sets.values())
    res = gseapy.ssgsea(data=expr, gene_sets=sets, outdir=None, sample_norm_method="rank",
                        min_size=min_size, max_size=max(len(v) for v in sets.values()),
                        permutation_num=0, weight=weight, threads=threads, no_plot=True,
                        seed=seed, verbose=False).res2d
    return pd.DataFrame({"pb": res["Name"].astype(str).to_numpy(),
                         "measure": res["Term"].astype(str).to_numpy(), "method": "ssgsea",
                         "value": pd.to_numeric(res["ES"]).to_numpy()})


def cell_score_means(cell_scores: pd.DataFrame, pb: ad.AnnData, obs: pd.DataFrame,
                     levels: Iterable[str], min_cells: int) -> pd.DataFrame:
    """Mean per-cell score per sample x population (``score_genes``, ``ulm``)."""
    if cell_scores.shape[1] == 0:
        return pd.DataFrame(columns=["pb", "measure", "method", "value"])
    members = _groups(obs, levels)
    vals = cell_scores.to_numpy()[members["cell"].to_numpy()]
    key = (members["sample"] + "|" + members["population_level"] + "|" + members["population"])
    means = pd.DataFrame(vals, columns=cell_scores.columns).groupby(key.to_numpy()).mean()
    means = means.reindex(pb.obs_names)
    small = pb.obs["n_cells"].to_numpy() < min_cells
    means.loc[small] = np.nan
    long = means.rename_axis("pb").reset_index().melt(id_vars="pb", var_name="col",
                                                       value_name="value")
    parts = long["col"].str.split(":", n=1, expand=True)
    long["method"], long["measure"] = parts[0], parts[1]
    return long[["pb", "measure", "method", "value"]]


# --- shares ---------------------------------------------------------------------------------------

def default_share_pairs(obs: pd.DataFrame, levels: Sequence[str]) -> list[tuple[str, str, str, str]]:
    """(level, population, parent level, parent) pairs: every population over all cells, and
    every cell state over the cell type most of its cells belong to (where they differ)."""
    pairs = []
    for level in levels:
        for pop in sorted(obs[level].astype(str).unique()):
            pairs.append((level, pop, ALL, ALL))
    if "cell_type" in levels and "cell_state" in levels:
        tab = pd.crosstab(obs["cell_state"].astype(str), obs["cell_type"].astype(str))
        for state, row in tab.iterrows():
            parent = str(row.idxmax())
            if parent != state:
                pairs.append(("cell_state", str(state), "cell_type", parent))
    return pairs


def cell_shares(obs: pd.DataFrame, pairs: Iterable[tuple[str, str, str, str]]) -> pd.DataFrame:
    """Share rows: n cells of the population, n of the parent, and their ratio, per sample."""
    samples = sorted(obs["sample"].astype(str).unique())
    sample = obs["sample"].astype(str)
    totals = sample.value_counts().reindex(samples, fill_value=0)
    rows = []
    for level, pop, plevel, parent in dict.fromkeys(pairs):
        in_pop = obs[level].astype(str) == pop if level in obs else pd.Series(False, obs.index)
        if plevel == ALL:
            in_parent = pd.Series(True, index=obs.index)
        elif plevel in obs:
            in_parent = obs[plevel].astype(str) == parent
        else:
            in_parent = pd.Series(False, index=obs.index)
        n = sample[in_pop & in_parent].value_counts().reindex(samples, fill_value=0)
        n_parent = sample[in_parent].value_counts().reindex(samples, fill_value=0) \
            if plevel != ALL else totals
        value = np.where(n_parent > 0, n / n_parent.where(n_parent > 0, 1), np.nan)
        rows.append(pd.DataFrame({"sample": samples, "population_level": level, "population": pop,
                                  "measure_type": "share",
                                  "measure": share_measure(plevel, parent),
                                  "method": SHARE_METHOD, "value": value,
                                  "n_cells": n.to_numpy(), "n_parent_cells": n_parent.to_numpy()}))
    if not rows:
        return pd.DataFrame(columns=["sample", "population_level", "population", "measure_type",
                                     "measure", "method", "value", "n_cells", "n_parent_cells"])
    return pd.concat(rows, ignore_index=True)


def catalogue_share_pairs(catalogue: Mapping | None) -> list[tuple[str, str, str, str]]:
    """Population/parent pairs that the share claims of a catalogue ask for."""
    pairs = []
    for claim in (catalogue or {}).get("claims", []):
        measure = claim.get("measure", {})
        if measure.get("type") != "share":
            continue
        pop = claim["population"]
        parent = measure.get("parent") or {"level": ALL, "value": ALL}
        pairs.append((pop["level"], pop["value"], parent["level"], parent["value"]))
    return pairs


# --- the whole stage ------------------------------------------------------------------------------

@dataclass
class ScoreResult:
    """Everything the score stage writes."""

    sample_scores: pd.DataFrame
    coverage: pd.DataFrame
    pseudobulk: ad.AnnData
    cell_scores: pd.DataFrame
    population_coverage: pd.DataFrame | None = None  # genes used per signature x population


def score_study(adata: ad.AnnData, signatures: Mapping[str, Sequence[str]], study: str,
                cfg: Mapping | None = None, share_pairs: Iterable[tuple[str, str, str, str]] = (),
                seed: int = 0, threads: int = 1,
                populations: Iterable[tuple[str, str]] | None = None) -> ScoreResult:
    """Score one study: coverage, per-cell scores (also added to ``adata.obs`` as
    ``<method>:<signature>``), pseudobulk, sample-level scores and shares.

    ``signatures`` maps signature id to gene symbols of the study's species; ``share_pairs`` adds
    (level, population, parent level, parent) shares to the defaults; ``populations`` limits the
    sample-level signature scores to these (level, value) populations (default: every one).
    """
    settings = score_settings(cfg)
    levels = list(settings["population_levels"])
    check_adata(adata, levels, source=f"study {study}")
    min_genes, min_cells = int(settings["min_genes"]), int(settings["min_cells"])
    methods = list(settings["methods"])
    coverage = signature_coverage(signatures, adata, min_genes)
    for row in coverage.itertuples():
        log.info("%s: signature %s: %d of %d genes found%s", study, row.signature, row.n_found,
                 row.n_genes, "" if row.usable else f" (below min_genes {min_genes}, not scored)")
    gene_sets = usable_gene_sets(signatures, adata, min_genes)
    norm = lognorm(adata)
    cell_scores = score_cells(norm, gene_sets, methods, seed=seed,
                              ctrl_size=int(settings["ctrl_size"]))
    for col in cell_scores:
        adata.obs[col] = cell_scores[col].to_numpy()
    pb = pseudobulk(adata, levels)
    pb_sig = pb
    if populations is not None:
        wanted = set(map(tuple, populations))
        keep = [(lv, p) in wanted for lv, p in zip(pb.obs["population_level"],
                                                     pb.obs["population"], strict=True)]
        pb_sig = pb[np.asarray(keep, bool)]
    pb_long, pop_coverage = pseudobulk_scores(
        pb_sig, gene_sets, methods, min_cells, seed=seed,
        ssgsea_weight=float(settings["ssgsea_weight"]), threads=threads, min_genes=min_genes,
        min_count=float(settings["min_count"]), min_total_count=float(settings["min_total_count"]))
    listed = coverage.set_index("signature")
    for col in ("n_genes", "n_found"):
        pop_coverage[col] = pop_coverage["signature"].map(listed[col]).astype(int)
    to_symbol = {var: sym for sym, var in symbol_lookup(adata).items() if sym != var}
    pop_coverage["genes_used"] = [",".join(to_symbol.get(g, g) for g in genes.split(",") if g)
                                  for genes in pop_coverage["genes_used"]]
    parts = [pb_long, cell_score_means(cell_scores, pb_sig, adata.obs, levels, min_cells)]
    parts = [p for p in parts if len(p)] or parts[:1]
    long = pd.concat(parts, ignore_index=True)
    long = long[long["method"].isin(methods)]
    meta = pb.obs[["sample", "population_level", "population", "n_cells"]]
    sig = long.merge(meta, left_on="pb", right_index=True).drop(columns="pb")
    sig["measure_type"] = "signature"
    sig["n_parent_cells"] = np.nan
    pairs = default_share_pairs(adata.obs, levels) + [
        p for p in share_pairs if p[0] in levels and (p[2] in levels or p[2] == ALL)]
    shares = cell_shares(adata.obs, pairs)
    info = sample_table(adata.obs)
    table = pd.concat([sig, shares], ignore_index=True).merge(info, on="sample", how="left")
    table["study"] = study
    table = table[SCORE_COLUMNS].sort_values(
        ["measure_type", "measure", "method", "population_level", "population", "sample"],
        kind="stable").reset_index(drop=True)
    cells = pd.concat([adata.obs[[c for c in ("sample", "arm", *levels) if c in adata.obs]]
                       .astype(str), cell_scores], axis=1)
    return ScoreResult(table, coverage, pb, cells, pop_coverage)


def rule_score(smk: Any) -> None:
    """Rule ``score``: score ``input.adata`` and write the tables, the pseudobulk and the GMT."""
    cfg = dict(smk.params.cfg)
    signatures = load_signatures(smk.input.signatures, smk.params.species)
    catalogue = load_catalogue(smk.input.catalogue) if smk.input.get("catalogue") else None
    adata = ad.read_h5ad(smk.input.adata)
    res = score_study(adata, signatures, smk.wildcards.study, cfg,
                      share_pairs=catalogue_share_pairs(catalogue), seed=int(smk.params.seed),
                      threads=int(smk.threads))
    Path(smk.output.scores).parent.mkdir(parents=True, exist_ok=True)
    res.sample_scores.to_csv(smk.output.scores, sep="\t", index=False, na_rep="NA")
    res.coverage.to_csv(smk.output.coverage, sep="\t", index=False)
    if smk.output.get("population_coverage"):
        res.population_coverage.to_csv(smk.output.population_coverage, sep="\t", index=False)
    res.pseudobulk.write_h5ad(smk.output.pseudobulk)
    res.cell_scores.to_csv(smk.output.cells, sep="\t", index_label="cell", na_rep="NA")
    write_gmt({k: v for k, v in signatures.items() if v}, smk.output.gmt)

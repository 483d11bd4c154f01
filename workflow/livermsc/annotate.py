"""Annotate liver cell types from a marker panel (config/celltypes.yaml), then refine states.

Method (deliberately simple, transparent and deterministic):

1. **Score** every cell for every major type with :func:`scanpy.tl.score_genes` (mean
   log-normalised expression of the type's markers minus that of expression-matched random
   control genes, seeded) — species-specific symbols from the panel, markers absent from the
   data dropped and reported.
2. **Assign clusters** (Leiden at ``cluster.annotation.resolution``): each cluster takes the type
   with the highest mean score (types compared with each other within the cluster). Its
   *confidence* is the fraction of the cluster's cells whose own best type (from scores
   averaged over the cell's kNN-graph neighbours, ``score_smoothing``, which tempers
   single-cell dropout) is that same type; the *margin* is the gap between the best and the
   second-best mean score; its *marker AUC* is the rank enrichment of the best type's markers
   in the cluster's mean profile (the probability that a marker outranks a random gene of the
   cluster). No absolute score level is used: score levels shrink with sequencing depth and
   change with panel size, ranks do not. A cluster is called ``unassigned`` instead of guessed
   when its marker AUC is below ``min_marker_auc`` (its best type's markers are not among its
   expressed genes: a type missing from the panel), its confidence is below ``min_confidence``
   (a mixed cluster) or its margin is below ``min_margin``.
   A mixed cluster with marker evidence is first re-clustered once (Leiden restricted to it,
   ``subcluster_resolution``) and its sub-clusters are called by the same rules; this separates,
   e.g., CD4 from CD8 T cells or neutrophils from dendritic cells that share a coarse cluster.
3. **Refine states per cell** within a parent type (macrophage -> kupffer / momac, cd4_t -> treg /
   cd4_tconv): states can be small (Tregs are ~5-10% of CD4 T cells) and rarely form their own
   Leiden cluster, so each cell of the parent gets the state with the highest state score,
   after averaging the scores over the cell's kNN-graph neighbours of the same parent type
   (``state_smoothing``). Cells whose best state score is at or below ``min_state_score`` keep
   the parent name as their state, and so do all cells of a parent when one of its states has
   too few markers among the genes to be scored (no state is forced by elimination).

Circularity: a claim that scores a signature in a population is biased when the markers that
select the population's cells share genes with the signature. :func:`signature_marker_overlap`
lists such genes for one claim and :func:`check_signature_overlap` checks every claim when the
workflow config is loaded (``cluster.annotation.signature_overlap``: error or warn).

Writes ``obs["cell_type"]``, ``obs["cell_state"]`` (categoricals), ``obs["cell_type_confidence"]``
(float, the cluster's confidence; 0 for unassigned clusters), ``obs["annotation_cluster"]`` (the
clusters as annotated, ``<cluster>,<sub>`` where re-clustered), per-type scores in
``obsm["celltype_scores"]`` (columns: ``uns["celltype_score_names"]``) and the settings and
missing markers in ``uns["annotation"]``; returns the per-cluster table.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp
from scipy.stats import rankdata

from livermsc.catalogue import Panel, load_panel
from livermsc.cluster import read_clustered
from livermsc.schema import ConfigError, load_yaml, validate
from livermsc.vocabulary import UNASSIGNED, resolution_key

log = logging.getLogger("livermsc.annotate")


class AnnotationInputError(ValueError):
    """An input of the annotation is unusable; the message says which and why."""


# --- circularity between the panel and the scored signatures ---------------------------------------


def population_markers(panel: Panel, level: str, population: str) -> list[str]:
    """The panel genes that decide whether a cell belongs to ``population``.

    A type (``level="cell_type"``) is defined by its own markers and, because its cells are
    split among its states, by its states' markers too; a state (``level="cell_state"``) by its
    parent type's markers and the markers of every state of that parent (a cell is put in one
    state by comparing it with the others). A population the panel does not name has none.
    """
    if level == "cell_type":
        parent = panel.types.get(population)
    elif level == "cell_state":
        parent = panel.types.get(panel.parents.get(population, ""))
    else:
        raise ValueError(f"level {level!r} is not cell_type or cell_state")
    if parent is None:
        return []
    genes = list(parent.markers)
    for markers in parent.states.values():
        genes += markers
    return list(dict.fromkeys(genes))


def signature_marker_overlap(panel: Panel | str | Path,
                             signatures: Mapping[str, Any] | str | Path, level: str,
                             population: str, signature: str, species: str) -> list[str]:
    """Genes of ``signature`` that are also markers defining ``population`` (in signature order).

    A signature scored in a population must share no gene with the markers that select that
    population's cells: otherwise the selection itself raises the score (circularity). ``panel``
    is a :class:`Panel` or the path of a panel file; ``signatures`` maps signature ids to gene
    lists, or to entries with ``mouse`` / ``human`` lists as in ``config/signatures.yaml``, or
    is that file's path. An unknown signature id raises :class:`ConfigError`.
    """
    if not isinstance(panel, Panel):
        panel = load_panel(panel, species)
    elif panel.species != species:
        if not panel.path:
            raise ConfigError(f"panel is for {panel.species}, not {species}, and has no file "
                              "to reload it from")
        panel = load_panel(panel.path, species)
    if not isinstance(signatures, Mapping):
        path = signatures
        signatures = validate(load_yaml(path), "signatures", path)["signatures"]
    if signature not in signatures:
        raise ConfigError(f"signature '{signature}' is not in the signatures "
                          f"(expected one of {sorted(signatures)})")
    genes = signatures[signature]
    if isinstance(genes, Mapping):
        genes = genes.get(species, [])
    markers = set(population_markers(panel, level, population))
    return [g for g in dict.fromkeys(genes) if g in markers]


def claim_overlaps(panel_path: str | Path, signatures_path: str | Path,
                   catalogue_path: str | Path, species: list[str]) -> list[dict[str, Any]]:
    """Every (claim, species) whose scored signature shares genes with its population's markers.

    Returns rows with claim, species, level, population, signature and the shared genes.
    """
    catalogue = validate(load_yaml(catalogue_path), "claims", catalogue_path)
    signatures = validate(load_yaml(signatures_path), "signatures", signatures_path)["signatures"]
    rows = []
    for sp_ in dict.fromkeys(species):
        panel = load_panel(panel_path, sp_)
        for claim in catalogue["claims"]:
            measure = claim["measure"]
            if measure["type"] != "signature" or measure.get("signature") not in signatures:
                continue
            pop = claim["population"]
            shared = signature_marker_overlap(panel, signatures, pop["level"], pop["value"],
                                              measure["signature"], sp_)
            if shared:
                rows.append({"claim": claim["id"], "species": sp_, "level": pop["level"],
                             "population": pop["value"], "signature": measure["signature"],
                             "genes": shared})
    return rows


def check_signature_overlap(config: Mapping[str, Any], species: list[str]) -> list[dict[str, Any]]:
    """Check, at config load, that no claim scores a signature in a population whose defining
    markers share genes with it (for each species in use).

    ``config`` is the validated workflow config. With ``cluster.annotation.signature_overlap:
    error`` (the default) an overlap is a :class:`ConfigError` naming each claim, population,
    signature and gene; with ``warn`` it is logged. Returns the overlaps found.
    """
    rows = claim_overlaps(config["cluster"]["celltypes"], config["score"]["signatures"],
                          config["claims"]["catalogue"], species)
    if not rows:
        return rows
    lines = [f"  claim '{r['claim']}' ({r['species']}): signature '{r['signature']}' scored in "
             f"{r['level']} '{r['population']}' shares {', '.join(r['genes'])} with the markers "
             f"that define it" for r in rows]
    text = (f"{config['cluster']['celltypes']} / {config['score']['signatures']}: "
            f"{len(rows)} claim(s) score a signature with genes that also select the population "
            "(circular: remove the genes from the marker panel or from the signature)\n"
            + "\n".join(lines))
    if config["cluster"]["annotation"]["signature_overlap"] == "error":
        raise ConfigError(text + "\n(set cluster.annotation.signature_overlap: warn to run anyway)")
    log.warning("%s", text)
    return rows


# --- scoring --------------------------------------------------------------------------------------


def _present(adata: ad.AnnData, genes: list[str]) -> list[str]:
    index = set(adata.var_names)
    return [g for g in dict.fromkeys(genes) if g in index]


def score_sets(adata: ad.AnnData, sets: Mapping[str, list[str]], seed: int,
               ctrl_size: int = 50, min_genes: int = 2) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Score each gene set per cell with ``sc.tl.score_genes`` on the log-normalised ``X``.

    Returns (cells x sets scores, report). Sets with fewer than ``min_genes`` genes among the
    data are not scored (column of NaN) and are listed in the report with their missing genes.
    """
    scores = {}
    report: dict[str, Any] = {}
    tmp = ad.AnnData(X=adata.X, obs=pd.DataFrame(index=adata.obs_names),
                     var=pd.DataFrame(index=adata.var_names))
    for name, genes in sets.items():
        present = _present(adata, genes)
        missing = [g for g in genes if g not in set(present)]
        report[name] = {"n_markers": len(genes), "n_present": len(present),
                        "missing": missing}
        if len(present) < min_genes:
            log.warning("%s: only %d of %d markers among the genes; not scored", name,
                        len(present), len(genes))
            scores[name] = np.full(adata.n_obs, np.nan)
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sc.tl.score_genes(tmp, present, ctrl_size=ctrl_size, score_name="_s",
                              random_state=seed, use_raw=False)
        scores[name] = tmp.obs["_s"].to_numpy(dtype=float)
    return pd.DataFrame(scores, index=adata.obs_names), report


# --- cluster-level assignment ----------------------------------------------------------------------


def cluster_profiles(adata: ad.AnnData, clusters: pd.Series) -> pd.DataFrame:
    """Mean log-normalised expression (``X``) of every gene in each cluster (clusters x genes)."""
    labels = pd.Categorical(clusters.astype(str).to_numpy())
    onehot = sp.csr_matrix((np.ones(len(labels)), (labels.codes, np.arange(len(labels)))),
                           shape=(len(labels.categories), len(labels)))
    sums = onehot @ adata.X
    sums = sums.toarray() if sp.issparse(sums) else np.asarray(sums)
    sizes = np.asarray(onehot.sum(axis=1)).ravel()
    return pd.DataFrame(sums / sizes[:, None], index=list(labels.categories),
                        columns=adata.var_names)


def marker_auc(profiles: pd.DataFrame, sets: Mapping[str, list[str]],
               min_genes: int = 2) -> pd.DataFrame:
    """Rank enrichment of each marker set in each cluster's profile (clusters x sets).

    Within one cluster's mean-expression profile, all genes are ranked (ties share their mean
    rank); a set's value is the area under the ROC curve of its markers against all other genes,
    i.e. the probability that a marker is expressed more highly than a random gene of the same
    cluster (Mann-Whitney U / (m (n - m))). 0.5 means no enrichment, 1 means the markers are the
    cluster's most expressed genes. It depends only on ranks, so it neither shrinks with
    sequencing depth nor grows with the number of markers, and needs no other cluster to compare
    with (a study of one cell type is called as such). Sets with fewer than ``min_genes`` markers
    among the genes are NaN.
    """
    n = profiles.shape[1]
    ranks = np.apply_along_axis(rankdata, 1, profiles.to_numpy(dtype=float))
    col = {g: i for i, g in enumerate(profiles.columns)}
    out = {}
    for name, genes in sets.items():
        idx = [col[g] for g in dict.fromkeys(genes) if g in col]
        m = len(idx)
        if m < min_genes or m >= n:
            out[name] = np.full(len(profiles), np.nan)
            continue
        out[name] = (ranks[:, idx].sum(axis=1) - m * (m + 1) / 2) / (m * (n - m))
    return pd.DataFrame(out, index=profiles.index)


def contrast_auc(profiles: pd.DataFrame, best: pd.Series, sets: Mapping[str, list[str]],
                 min_genes: int = 2) -> pd.Series:
    """Per cluster, the rank enrichment (as :func:`marker_auc`) of its best type's markers in
    its profile minus the mean profile of the clusters whose best type differs, each gene scaled
    by its standard deviation over clusters.

    This is the evidence when the measured genes are themselves a selection of highly expressed
    genes (a targeted panel), where a type's markers need not outrank the cluster's other genes
    although they clearly separate it from the other types' clusters. NaN when every cluster has
    the same best type (a one-type study: only the cluster's own profile can speak).
    """
    out = pd.Series(np.nan, index=best.index, dtype=float)
    sd = profiles.std(axis=0, ddof=0)
    profiles = profiles.loc[:, sd > 0] / sd[sd > 0]  # each gene in units of its spread over clusters
    for cl, t in best.items():
        others = best.index[best != t]
        if len(others) == 0 or t not in sets:
            continue
        diff = profiles.loc[[cl]] - profiles.loc[others].mean(axis=0)
        out[cl] = float(marker_auc(diff, {t: sets[t]}, min_genes)[t].iloc[0])
    return out


def assign_clusters(scores: pd.DataFrame, clusters: pd.Series,
                    auc: pd.DataFrame | None = None, min_marker_auc: float = 0.75,
                    min_confidence: float = 0.5, min_margin: float = 0.0,
                    cell_scores: pd.DataFrame | None = None,
                    profiles: pd.DataFrame | None = None,
                    sets: Mapping[str, list[str]] | None = None,
                    min_genes: int = 2) -> pd.DataFrame:
    """Call each cluster's type from the cells' type scores (see the module docstring).

    The best type is the one with the highest mean score in the cluster (a comparison between
    types within the cluster, never an absolute score level). The call stands when (1) the
    best type's markers are enriched in the cluster's own profile: ``auc`` (clusters x types,
    :func:`marker_auc`) at least ``min_marker_auc`` (no ``auc``: not checked) — or, with
    ``profiles`` and ``sets``, enriched against the clusters of the other types
    (:func:`contrast_auc`, column ``marker_auc_contrast``) at least ``min_marker_auc`` — (2) at least
    ``min_confidence`` of its cells have it as their own best type (``cell_scores``, default
    ``scores``; e.g. kNN-smoothed) and (3) the best and second-best mean scores differ by at
    least ``min_margin``; otherwise the cluster is ``unassigned`` and ``reason`` says why.
    Returns one row per cluster: cluster, n_cells, cell_type, best_type, best_score,
    second_type, second_score, margin, marker_auc, confidence, reason.
    """
    valid = scores.dropna(axis=1, how="all")
    if valid.shape[1] == 0:
        raise AnnotationInputError("no cell type could be scored (no panel markers among the genes)")
    per_cell = valid if cell_scores is None else cell_scores[valid.columns]
    cell_best = per_cell.idxmax(axis=1)
    clusters = clusters.astype(str)
    groups = clusters.groupby(clusters, observed=True, sort=False).groups
    best_types = pd.Series({cl: valid.loc[idx].mean(axis=0).idxmax() for cl, idx in groups.items()})
    contrast = (contrast_auc(profiles, best_types, sets, min_genes)
                if profiles is not None and sets is not None
                else pd.Series(np.nan, index=best_types.index, dtype=float))
    rows = []
    for cl, idx in groups.items():
        means = valid.loc[idx].mean(axis=0).sort_values(ascending=False)
        best, second = means.index[0], (means.index[1] if len(means) > 1 else None)
        best_score = float(means.iloc[0])
        second_score = float(means.iloc[1]) if second is not None else float("nan")
        margin = best_score - second_score if second is not None else float("inf")
        confidence = float((cell_best.loc[idx] == best).mean())
        best_auc = float(auc.loc[cl, best]) if auc is not None else float("nan")
        reasons = []
        vs_others = float(contrast[cl])
        if auc is not None and not (best_auc >= min_marker_auc or vs_others >= min_marker_auc):
            against = "" if np.isnan(vs_others) else f" (vs other types' clusters {vs_others:.2f})"
            reasons.append(f"{best} marker AUC {best_auc:.2f}{against} < min_marker_auc "
                           f"{min_marker_auc}")
        if confidence < min_confidence:
            reasons.append(f"confidence {confidence:.2f} < min_confidence {min_confidence}")
        if margin < min_margin:
            reasons.append(f"margin {margin:.3f} < min_margin {min_margin}")
        rows.append({"cluster": cl, "n_cells": len(idx),
                     "cell_type": UNASSIGNED if reasons else best, "best_type": best,
                     "best_score": best_score, "second_type": second,
                     "second_score": second_score, "margin": margin, "marker_auc": best_auc,
                     "marker_auc_contrast": vs_others, "confidence": confidence, "reason": "; ".join(reasons)})
    table = pd.DataFrame(rows)
    order = pd.to_numeric(table["cluster"], errors="coerce")
    return table.assign(_o=order).sort_values(["_o", "cluster"]).drop(columns="_o").reset_index(drop=True)


# --- per-cell state refinement ------------------------------------------------------------------------


def smooth(values: np.ndarray, graph: sp.spmatrix | None,
           members: np.ndarray | None = None) -> np.ndarray:
    """Average ``values`` (cells x k) over each cell and its kNN-graph neighbours.

    With ``members`` (indices into the graph), only neighbours among the members count and
    ``values`` has one row per member. The graph's edge weights (connectivities) weight the mean.
    """
    if graph is None:
        return values
    g = sp.csr_matrix(graph)
    if members is not None:
        g = g[members][:, members]
    g = g + sp.identity(g.shape[0], format="csr")
    deg = np.asarray(g.sum(axis=1)).ravel()
    return np.asarray(sp.diags(1.0 / deg) @ g @ values)


def refine_states(cell_type: pd.Series, state_scores: pd.DataFrame, panel: Panel,
                  graph: sp.spmatrix | None = None, min_state_score: float = 0.0
                  ) -> pd.Series:
    """Per-cell state within each parent type; other cells' state is their type.

    ``state_scores`` has one column per state (cells x states); ``graph`` (cells x cells, e.g.
    ``obsp["connectivities"]``) smooths the scores among cells of the same parent when given.
    """
    state = cell_type.astype(str).copy()
    for parent in panel.types.values():
        names = [s for s in parent.states if s in state_scores and state_scores[s].notna().any()]
        members = np.flatnonzero((cell_type.astype(str) == parent.name).to_numpy())
        if not names or members.size == 0:
            continue
        vals = state_scores[names].to_numpy(dtype=float)[members]
        vals = smooth(vals, graph, members)
        best = np.asarray(names)[np.argmax(vals, axis=1)]
        best = np.where(vals.max(axis=1) > min_state_score, best, parent.name)
        state.iloc[members] = best
    return state


def _subcluster(adata: ad.AnnData, cluster_key: str, clusters: list[str],
                cfg: Mapping[str, Any], seed: int) -> pd.Series:
    """Leiden within each of ``clusters`` (same flavor; ``annotation.subcluster_resolution``).

    Returns the refined labels (``<cluster>,<sub>`` inside the re-clustered clusters).
    """
    labels = adata.obs[cluster_key].astype(str).astype("category")
    tmp = "_annotation_subcluster"
    adata.obs[tmp] = labels
    for cl in clusters:
        kwargs: dict[str, Any] = {"resolution": float(cfg["annotation"]["subcluster_resolution"]),
                                  "restrict_to": (tmp, [cl]), "key_added": tmp,
                                  "random_state": seed, "flavor": cfg["leiden_flavor"],
                                  "n_iterations": int(cfg["leiden_n_iterations"])}
        if cfg["leiden_flavor"] == "igraph":
            kwargs["directed"] = False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sc.tl.leiden(adata, **kwargs)
    out = adata.obs.pop(tmp).astype(str)
    adata.uns.pop("_annotation_subcluster", None)
    return out


def annotate(adata: ad.AnnData, panel: Panel, cfg: Mapping[str, Any], seed: int,
             threads: int = 1,
             transfer: Callable[[ad.AnnData], pd.DataFrame] | None = None) -> pd.DataFrame:
    """Score, assign clusters (re-clustering mixed ones once), refine states, in place.

    ``cfg`` is the validated ``cluster`` config section (its ``annotation`` sub-section holds
    the thresholds; its Leiden settings are reused for re-clustering). With
    ``transfer`` (a function of the AnnData returning per-cell ``label``, ``predicted`` and
    ``confidence``: :func:`livermsc.reference.transfer_labels` with its reference bound), ``obs["cell_type"]`` holds the
    labels transferred from the reference (confidence: the label's probability) and the panel's
    calls go to ``obs["cell_type_panel"]``; states are then refined within the transferred types
    that the panel names. Returns the per-cluster table (the panel's calls).
    """
    acfg = cfg["annotation"]
    cluster_key = resolution_key(acfg["resolution"])
    if cluster_key not in adata.obs:
        raise AnnotationInputError(
            f"obs has no '{cluster_key}': cluster.annotation.resolution "
            f"({acfg['resolution']}) must be one of cluster.resolutions and the data clustered")
    graph = adata.obsp.get("connectivities")
    if (acfg["score_smoothing"] or acfg["state_smoothing"]) and graph is None:
        raise AnnotationInputError("obsp has no 'connectivities' (run the cluster step first) "
                                   "but score_smoothing / state_smoothing is on")
    type_sets = {name: t.markers for name, t in panel.types.items()}
    state_sets = {s: genes for t in panel.types.values() for s, genes in t.states.items()}
    type_scores, type_report = score_sets(adata, type_sets, seed, acfg["ctrl_size"],
                                          acfg["min_markers"])
    state_scores, state_report = score_sets(adata, state_sets, seed, acfg["ctrl_size"],
                                            acfg["min_markers"])
    valid = type_scores.dropna(axis=1, how="all")
    cell_scores = (pd.DataFrame(smooth(valid.to_numpy(), graph), index=valid.index,
                                columns=valid.columns) if acfg["score_smoothing"] else valid)
    thresholds = {"min_marker_auc": acfg["min_marker_auc"],
                  "min_confidence": acfg["min_confidence"], "min_margin": acfg["min_margin"]}
    clusters = adata.obs[cluster_key].astype(str)
    type_sets = {k: v for k, v in type_sets.items() if k in valid.columns}

    def call(labels: pd.Series) -> pd.DataFrame:
        profiles = cluster_profiles(adata, labels)
        auc = marker_auc(profiles, type_sets, acfg["min_markers"])
        return assign_clusters(valid, labels, auc, cell_scores=cell_scores, profiles=profiles,
                               sets=type_sets, min_genes=acfg["min_markers"], **thresholds)

    table = call(clusters)
    evidence = table[["marker_auc", "marker_auc_contrast"]].max(axis=1)
    mixed = table.loc[(table["cell_type"] == UNASSIGNED)
                      & (evidence >= acfg["min_marker_auc"]), "cluster"].tolist()
    if mixed and acfg["subcluster_resolution"] is not None:
        log.info("re-clustering %d mixed cluster(s): %s", len(mixed), mixed)
        clusters = _subcluster(adata, cluster_key, mixed, cfg, seed)
        table = call(clusters)
    by_cluster = table.set_index("cluster")
    cell_type = clusters.map(by_cluster["cell_type"])
    confidence = clusters.map(by_cluster["confidence"]).astype(float)
    confidence[cell_type == UNASSIGNED] = 0.0
    type_levels = [*panel.types, UNASSIGNED]
    if transfer is not None:
        transferred = transfer(adata)
        adata.obs["cell_type_panel"] = pd.Categorical(cell_type.to_numpy(),
                                                      categories=type_levels)
        cell_type = transferred["label"]
        confidence = transferred["confidence"]
        adata.obs["reference_prediction"] = transferred["predicted"].astype("category")
        extra = sorted(set(cell_type) - set(type_levels))
        if extra:
            log.warning("reference labels not in the panel (no states, and claims name panel "
                        "types): %s", extra)
        type_levels = [*panel.types, *extra, UNASSIGNED]
        agree = (adata.obs["cell_type_panel"].astype(str) == cell_type.astype(str)).mean()
        log.info("reference labels equal the panel's calls for %.1f%% of cells", 100 * agree)
    scorable = {s for s in state_scores if state_scores[s].notna().any()}
    for t in panel.types.values():
        if t.states and not set(t.states) <= scorable:
            log.warning("%s: states %s not all scorable here; its cells keep state %r",
                        t.name, sorted(t.states), t.name)
    state_panel = Panel(panel.species, {k: t for k, t in panel.types.items()
                                        if set(t.states) <= scorable}, panel.path)
    cell_state = refine_states(cell_type, state_scores, state_panel,
                               graph if acfg["state_smoothing"] else None,
                               acfg["min_state_score"])
    state_levels = list(dict.fromkeys(
        [x for t in panel.types.values() for x in [t.name, *t.states]] + type_levels))
    adata.obs["annotation_cluster"] = pd.Categorical(clusters.to_numpy(),
                                                     categories=table["cluster"].tolist())
    adata.obs["cell_type"] = pd.Categorical(cell_type.to_numpy(), categories=type_levels)
    adata.obs["cell_state"] = pd.Categorical(cell_state.to_numpy(), categories=state_levels)
    adata.obs["cell_type_confidence"] = confidence.to_numpy(dtype=float)
    for col in ("cell_type", "cell_state"):
        adata.obs[col] = adata.obs[col].cat.remove_unused_categories()
    adata.obsm["celltype_scores"] = type_scores.fillna(0.0).to_numpy(dtype=np.float32)
    adata.uns["celltype_score_names"] = list(type_scores.columns)
    states = (pd.crosstab(clusters, cell_state).reindex(table["cluster"]).fillna(0).astype(int))
    table["states"] = [", ".join(f"{s}:{n}" for s, n in row.items() if n > 0)
                       for _, row in states.iterrows()]
    table.insert(0, "resolution", float(acfg["resolution"]))
    adata.uns["annotation"] = {
        "cluster_key": cluster_key, "panel": panel.path, "species": panel.species,
        "reclustered": mixed,
        "markers_missing": {k: v["missing"] for k, v in {**type_report, **state_report}.items()
                            if v["missing"]},
        **{k: ({a: b for a, b in v.items() if b is not None} if isinstance(v, Mapping) else v)
           for k, v in acfg.items() if v is not None},
    }
    log.info("annotated %d clusters; %d unassigned (%d cells)", len(table),
             int((table["cell_type"] == UNASSIGNED).sum()), int((cell_type == UNASSIGNED).sum()))
    return table


def rule_annotate(smk: Any) -> None:
    """Rule ``annotate``: cell types and states into annotated.h5ad, plus the cluster table
    (``annotate_reference`` runs :func:`livermsc.reference.rule_annotate` instead)."""
    panel = load_panel(smk.input.celltypes, species=smk.params.species)
    adata = read_clustered(smk.input.integrated, smk.input.clustered)
    table = annotate(adata, panel, smk.params.cfg, int(smk.params.seed), int(smk.threads))
    table.to_csv(smk.output.table, sep="\t", index=False)
    adata.write_h5ad(smk.output.h5ad, compression="gzip")

"""Cluster the integrated cells, rank markers and draw the figures.

* :func:`cluster`: kNN graph on ``obsm["X_scVI"]`` (exact kNN through scikit-learn, which avoids
  compiling pynndescent), Leiden at every configured resolution (``obs["leiden_<res>"]``) and
  UMAP (``obsm["X_umap"]``).
* :func:`rank_markers`: one Wilcoxon marker table per resolution, on the log-normalised data.
* :func:`plot_umaps`, :func:`plot_marker_dotplot`: the stage's figures.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import scanpy as sc

from livermsc.catalogue import load_panel
from livermsc.plotting import OKABE_ITO, arm_colour, save_figure
from livermsc.vocabulary import resolution_key

log = logging.getLogger("livermsc.cluster")


class ClusterInputError(ValueError):
    """An input of the cluster stage is unusable; the message says which and why."""


def check_input(adata: ad.AnnData, source: str, use_rep: str, needs: Iterable[str] = ()) -> None:
    """Fail early when the embedding or an obs column the stage needs is absent."""
    if use_rep not in adata.obsm:
        raise ClusterInputError(
            f"{source}: obsm has no '{use_rep}' (cluster.use_rep); available: {sorted(adata.obsm)}")
    missing = [k for k in needs if k not in adata.obs]
    if missing:
        raise ClusterInputError(f"{source}: obs lacks column(s) {missing}; available: "
                                f"{sorted(adata.obs.columns)}")
    if adata.n_obs < 10:
        raise ClusterInputError(f"{source}: only {adata.n_obs} cells; at least 10 are needed")


# --- graph, Leiden, UMAP ----------------------------------------------------------------------------


def cluster(adata: ad.AnnData, cfg: Mapping[str, Any], seed: int) -> ad.AnnData:
    """kNN graph, Leiden at each resolution of ``cfg["resolutions"]`` and UMAP, in place.

    ``cfg`` is the validated ``cluster`` config section.
    """
    check_input(adata, "cluster input", cfg["use_rep"])
    n_neighbors = min(int(cfg["n_neighbors"]), adata.n_obs - 1)
    sc.pp.neighbors(adata, n_neighbors=n_neighbors, use_rep=cfg["use_rep"],
                    transformer="sklearn", random_state=seed)
    flavor = cfg["leiden_flavor"]
    for res in cfg["resolutions"]:
        kwargs: dict[str, Any] = {"resolution": float(res), "random_state": seed,
                                  "key_added": resolution_key(res), "flavor": flavor,
                                  "n_iterations": int(cfg["leiden_n_iterations"])}
        if flavor == "igraph":
            kwargs["directed"] = False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            sc.tl.leiden(adata, **kwargs)
        log.info("Leiden resolution %s: %d clusters", res,
                 adata.obs[resolution_key(res)].nunique())
    sc.tl.umap(adata, min_dist=float(cfg["umap_min_dist"]), random_state=seed)
    adata.uns["cluster"] = {"use_rep": cfg["use_rep"], "n_neighbors": n_neighbors,
                            "resolutions": [float(r) for r in cfg["resolutions"]],
                            "leiden_flavor": flavor, "seed": int(seed)}
    return adata


def marker_cells(groups: pd.Series, max_cells: int | None, seed: int) -> np.ndarray:
    """Boolean mask of the cells the marker ranking uses: clusters of >= 2 cells (Wilcoxon
    needs two), each cut to a seeded random ``max_cells`` of its cells (None: all)."""
    codes = groups.astype(str).to_numpy()
    keep = np.zeros(codes.size, dtype=bool)
    rng = np.random.default_rng(seed)
    for g in sorted(set(codes)):
        idx = np.flatnonzero(codes == g)
        if idx.size < 2:
            continue
        if max_cells is not None and idx.size > max_cells:
            idx = rng.choice(idx, size=max_cells, replace=False)
        keep[idx] = True
    return keep


def rank_markers(adata: ad.AnnData, groupby: str, n_genes: int = 50,
                 max_cells: int | None = None, seed: int = 0) -> pd.DataFrame:
    """Wilcoxon marker ranking (one cluster against the rest) on the log-normalised ``X``.

    Returns the top ``n_genes`` per cluster: cluster, rank, gene, score (the Wilcoxon
    statistic, used for ranking only), logfoldchange, pct_in (fraction of the cluster's cells
    expressing) and pct_out. Cell-level p-values are left out on purpose: cells are not
    replicates, so they would overstate the evidence. With ``max_cells`` each cluster is
    represented by at most that many cells (:func:`marker_cells`), as Seurat's
    ``max.cells.per.ident``: the tables describe clusters, and the ranking's cost grows with
    cells while its top genes do not change.
    """
    cols = ["cluster", "rank", "gene", "score", "logfoldchange", "pct_in", "pct_out"]
    groups = adata.obs[groupby]
    mask = marker_cells(groups, max_cells, seed)
    if groups[mask].nunique() < 2:
        log.warning("%s: fewer than two clusters with >= 2 cells; no marker table", groupby)
        return pd.DataFrame(columns=cols)
    sub = adata if mask.all() else adata[mask].copy()
    if sub is not adata:
        sub.obs[groupby] = sub.obs[groupby].cat.remove_unused_categories() \
            if isinstance(sub.obs[groupby].dtype, pd.CategoricalDtype) else sub.obs[groupby]
    key = f"rank_genes_{groupby}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # scanpy's default tie_correct=False: exact tie correction is ~6x slower on sparse
        # data, and these tables describe clusters (cells are not replicates for inference)
        sc.tl.rank_genes_groups(sub, groupby, method="wilcoxon", use_raw=False, pts=True,
                                key_added=key)
        df = sc.get.rank_genes_groups_df(sub, None, key=key)
    df = df.rename(columns={"group": "cluster", "names": "gene", "scores": "score",
                            "logfoldchanges": "logfoldchange", "pct_nz_group": "pct_in",
                            "pct_nz_reference": "pct_out"})
    df["rank"] = df.groupby("cluster", observed=True).cumcount() + 1
    df = df[df["rank"] <= n_genes]
    if sub is not adata:
        adata.uns[key] = sub.uns[key]
    return df[[c for c in cols if c in df.columns]].reset_index(drop=True)


# --- figures ---------------------------------------------------------------------------------------------


def _palette(categories: Sequence[str], key: str) -> list[str]:
    if key == "arm":
        return [arm_colour(c, categories) for c in categories]
    if len(categories) <= len(OKABE_ITO) - 1:
        return [c for c in OKABE_ITO if c != "#000000"][: len(categories)]
    return sc.pl.palettes.default_102[: len(categories)]


def plot_umaps(adata: ad.AnnData, keys: Mapping[str, str], outdir: str | Path,
               formats: Sequence[str] = ("png",), dpi: int = 300) -> list[Path]:
    """One UMAP per ``{name: obs column}``, saved as ``<outdir>/umap_<name>.<fmt>``."""
    paths: list[Path] = []
    for name, key in keys.items():
        if key not in adata.obs:
            raise ClusterInputError(f"cannot colour the UMAP by '{key}': no such obs column")
        col = adata.obs[key]
        if not isinstance(col.dtype, pd.CategoricalDtype):
            adata.obs[key] = col.astype(str).astype("category")
        cats = list(adata.obs[key].cat.categories)
        fig, ax = plt.subplots(figsize=(6.5, 5))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sc.pl.umap(adata, color=key, ax=ax, show=False, palette=_palette(cats, key),
                       legend_loc="on data" if name == "cluster" else "right margin",
                       legend_fontsize=7, frameon=False, title=f"{key} ({adata.n_obs} cells)")
        paths += save_figure(fig, Path(outdir) / f"umap_{name}", formats, dpi)
    return paths


def plot_marker_dotplot(adata: ad.AnnData, markers: Mapping[str, Sequence[str]], groupby: str,
                        stem: str | Path, formats: Sequence[str] = ("png",),
                        per_group: int = 4, keep: Iterable[str] = (), dpi: int = 300
                        ) -> list[Path]:
    """Dot plot of the panel markers (those present) of each group found in ``groupby``.

    ``markers`` maps a type or state name to its markers; names that occur in
    ``adata.obs[groupby]`` (or are listed in ``keep``) are drawn, in the order of ``markers``,
    ``per_group`` genes each.
    """
    groups = adata.obs[groupby].astype(str)
    found = set(groups)
    wanted = found | set(keep)
    present = {k: [g for g in v if g in adata.var_names][:per_group]
               for k, v in markers.items() if k in wanted}
    present = {k: v for k, v in present.items() if v}
    if not present:
        raise ClusterInputError(f"no panel markers among the genes for the groups of '{groupby}'")
    order = [k for k in present if k in found] + sorted(found - set(present))
    sub = ad.AnnData(X=adata.X, obs=pd.DataFrame(
        {groupby: pd.Categorical(groups.to_numpy(), categories=order)}, index=adata.obs_names),
        var=pd.DataFrame(index=adata.var_names))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dp = sc.pl.dotplot(sub, present, groupby=groupby, show=False, return_fig=True,
                           standard_scale="var", use_raw=False,
                           title=f"panel markers by {groupby}")
        dp.make_figure()
    return save_figure(dp.fig, stem, formats, dpi)


def check_config(cfg: Mapping[str, Any]) -> None:
    """Cross-field checks of the ``cluster`` section that the JSON schema cannot express."""
    res = float(cfg["annotation"]["resolution"])
    if res not in [float(r) for r in cfg["resolutions"]]:
        raise ClusterInputError(
            f"config: field 'cluster.annotation.resolution': {res:g} is not one of "
            f"cluster.resolutions {list(cfg['resolutions'])} (expected: one of them)")


# --- Snakemake entry points --------------------------------------------------------------------------------


def rule_cluster(smk: Any) -> None:
    """Rule ``cluster``: graph, Leiden, UMAP and one marker table per resolution."""
    cfg = smk.params.cfg
    adata = ad.read_h5ad(smk.input.h5ad)
    check_input(adata, smk.input.h5ad, cfg["use_rep"])
    cluster(adata, cfg, seed=int(smk.params.seed))
    for res, path in zip(cfg["resolutions"], smk.output.markers, strict=True):
        rank_markers(adata, resolution_key(res), cfg["n_marker_genes"],
                     cfg["marker_max_cells"], int(smk.params.seed)).to_csv(
            path, sep="\t", index=False)
    clusters_only(adata).write_h5ad(smk.output.h5ad)  # temporary: no compression


def clusters_only(adata: ad.AnnData) -> ad.AnnData:
    """What the cluster stage adds (obs, obsm, obsp, uns), without the expression matrices:
    the next stage takes those from integrated.h5ad (:func:`read_clustered`), so no full
    matrix is written twice."""
    return ad.AnnData(obs=adata.obs, var=pd.DataFrame(index=adata.var_names), obsm=adata.obsm,
                      obsp=adata.obsp, uns=adata.uns)


def read_clustered(integrated: str | Path, clustered: str | Path) -> ad.AnnData:
    """integrated.h5ad (expression, counts, var) with the obs, obsm, obsp and uns of
    clustered.h5ad (:func:`clusters_only`), checked to hold the same cells."""
    adata = ad.read_h5ad(integrated)
    clusters = ad.read_h5ad(clustered)
    if not adata.obs_names.equals(clusters.obs_names):
        raise ClusterInputError(f"{clustered}: its cells are not those of {integrated} "
                                "(rerun the cluster rule)")
    adata.obs = clusters.obs
    for key, value in clusters.obsm.items():
        adata.obsm[key] = value
    for key, value in clusters.obsp.items():
        adata.obsp[key] = value
    adata.uns.update(clusters.uns)
    return adata


def placeholder_figure(title: str, why: str) -> Any:
    """A figure that says what was not drawn and why (diagnostics never stop the run)."""
    fig, ax = plt.subplots(figsize=(6.5, 2))
    ax.axis("off")
    ax.text(0.0, 0.9, f"{title}: not computed\n{why}", va="top", ha="left", fontsize=9,
            transform=ax.transAxes, wrap=True)
    return fig


def rule_cluster_figures(smk: Any) -> None:
    """Rule ``cluster_figures``: UMAPs by sample, arm, cluster and cell type; marker dot plot.

    A diagnostic: a figure that cannot be drawn (an absent obs column, no panel marker among
    the genes, ...) is written as a figure saying "not computed: why", and the rule exits 0.
    """
    adata = ad.read_h5ad(smk.input.h5ad)
    formats, dpi = list(smk.params.formats), int(smk.params.dpi)
    keys = {"sample": "sample", "arm": "arm",
            "cluster": resolution_key(smk.params.resolution), "cell_type": "cell_type",
            "cell_state": "cell_state"}
    outdir = Path(smk.output.figures[0]).parent
    for name, key in keys.items():
        try:
            plot_umaps(adata, {name: key}, outdir, formats, dpi)
        except Exception as err:  # a diagnostic figure: record why, never stop the run
            why = f"{type(err).__name__}: {err}"
            log.warning("UMAP by %s not drawn (%s)", key, why)
            save_figure(placeholder_figure(f"UMAP by {key}", why), outdir / f"umap_{name}",
                        formats, dpi)
    try:
        panel = load_panel(smk.input.celltypes, species=smk.params.species)
        markers: dict[str, list[str]] = {}
        found = set(adata.obs["cell_state"].astype(str))
        keep = []
        for name, t in panel.types.items():
            markers[name] = t.markers
            markers.update(t.states)
            if found & set(t.states):
                keep.append(name)  # the parent's markers next to its states
        plot_marker_dotplot(adata, markers, "cell_state", outdir / "markers_dotplot", formats,
                            keep=keep, dpi=dpi)
    except Exception as err:  # a diagnostic figure: record why, never stop the run
        why = f"{type(err).__name__}: {err}"
        log.warning("marker dot plot not drawn (%s)", why)
        save_figure(placeholder_figure("marker dot plot", why), outdir / "markers_dotplot",
                    formats, dpi)

"""Cluster stage: graph, Leiden, UMAP, marker tables and figures; integration metrics."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from livermsc.cluster import (
    ClusterInputError,
    check_config,
    cluster,
    marker_cells,
    plot_marker_dotplot,
    plot_umaps,
    rank_markers,
)
from livermsc.config import ConfigError, validate
from livermsc.integrate import IntegrationInputError, integration_metrics, metrics_figure
from livermsc.plotting import save_figure
from livermsc.simulate import CELL_TYPES
from livermsc.vocabulary import resolution_key
from sklearn.metrics import adjusted_rand_score
from test_integrate import integrated_sim

_CACHE: dict[str, ad.AnnData] = {}


def cluster_config(**overrides: object) -> dict:
    """The cluster section as the workflow validates it, with overrides."""
    return validate(dict(overrides), "cluster", "test config")


def clustered_sim(sim_adata: ad.AnnData, tmp_dir) -> ad.AnnData:
    """The integrated simulated study after :func:`cluster` (once per session; do not modify)."""
    if "sim" not in _CACHE:
        a = integrated_sim(sim_adata, tmp_dir).copy()
        cluster(a, cluster_config(), seed=0)
        _CACHE["sim"] = a
    return _CACHE["sim"]


@pytest.fixture(scope="session")
def sim_clustered(sim_adata, tmp_path_factory):
    return clustered_sim(sim_adata, tmp_path_factory.mktemp("cluster"))


def test_resolution_key():
    assert resolution_key(1) == "leiden_1"
    assert resolution_key(0.5) == "leiden_0.5"
    assert resolution_key(2.0) == "leiden_2"


def test_config_checks():
    cfg = cluster_config()
    assert cfg["leiden_flavor"] == "igraph" and cfg["leiden_n_iterations"] == 2
    check_config(cfg)
    with pytest.raises(ClusterInputError, match=r"cluster\.annotation\.resolution': 1\.5"):
        check_config(cluster_config(annotation={"resolution": 1.5}))
    with pytest.raises(ConfigError, match="leiden_flavor"):
        cluster_config(leiden_flavor="louvain")


def test_missing_embedding_is_named():
    a = ad.AnnData(np.zeros((20, 3), dtype=np.float32))
    with pytest.raises(ClusterInputError, match="obsm has no 'X_scVI'"):
        cluster(a, cluster_config(), seed=0)


def test_clusters_recover_planted_types(sim_clustered):
    a = sim_clustered
    n = [a.obs[resolution_key(r)].nunique() for r in (0.5, 1.0, 2.0)]
    assert n[0] <= n[1] <= n[2]
    assert a.obsm["X_umap"].shape == (a.n_obs, 2)
    # every cluster at resolution 1 is (almost) one planted type
    tab = pd.crosstab(a.obs["leiden_1"], a.obs["true_type"])
    purity = tab.max(axis=1) / tab.sum(axis=1)
    assert purity.min() >= 0.95, purity.sort_values().head()
    assert adjusted_rand_score(a.obs["true_type"], a.obs["leiden_0.5"]) > 0.6


def test_leidenalg_flavor_is_supported(sim_clustered):
    a = sim_clustered[:600].copy()
    cluster(a, cluster_config(leiden_flavor="leidenalg", resolutions=[1.0]), seed=0)
    assert a.obs["leiden_1"].nunique() > 5


def test_marker_tables_name_planted_markers(sim_clustered):
    a = sim_clustered.copy()
    table = rank_markers(a, "leiden_1", n_genes=20)
    assert list(table.columns[:3]) == ["cluster", "rank", "gene"]
    assert table.groupby("cluster").size().max() == 20
    majority = pd.crosstab(a.obs["leiden_1"], a.obs["true_type"]).idxmax(axis=1)
    for cl, top in table.groupby("cluster"):
        planted = set(CELL_TYPES[majority[cl]][2])
        assert planted & set(top["gene"].head(10)), f"cluster {cl} ({majority[cl]})"
    assert (table["pct_in"] >= 0).all()
    assert not {"pval", "pval_adj"} & set(table.columns)  # no cell-level p-values


def test_marker_cells_cap_each_cluster_and_drop_singletons():
    groups = pd.Series(["a"] * 30 + ["b"] * 5 + ["c"], dtype="category")
    mask = marker_cells(groups, max_cells=10, seed=3)
    kept = groups[mask].value_counts()
    assert kept["a"] == 10 and kept["b"] == 5 and kept["c"] == 0  # c: one cell
    assert (mask == marker_cells(groups, 10, seed=3)).all()  # seeded
    assert (marker_cells(groups, None, 0) == (groups != "c").to_numpy()).all()


def test_capped_marker_ranking_keeps_the_full_ranking_top_genes(sim_clustered):
    a = sim_clustered.copy()
    full = rank_markers(a, "leiden_1", n_genes=10)
    sizes = a.obs["leiden_1"].value_counts()
    cap = int(max(20, sizes.median() // 4))  # most clusters cut to a quarter or less
    capped = rank_markers(a, "leiden_1", n_genes=10, max_cells=cap, seed=1)
    overlap = [len(set(top["gene"]) & set(capped.loc[capped["cluster"] == cl, "gene"])) / 10
               for cl, top in full.groupby("cluster")]
    assert np.mean(overlap) >= 0.7, overlap


def test_integration_metrics_scvi_beats_pca(sim_clustered):
    """scVI mixes the samples better than the PCA baseline and keeps the types apart."""
    a = sim_clustered
    table = integration_metrics(a, label_key="true_type", batch_key="sample")
    wide = table.pivot(index="metric", columns="embedding", values="value")
    print("\nintegration metrics (simulated study, planted labels)\n", wide.round(3))
    assert set(table["group"]) == {"batch_mixing", "conservation"}
    # (the batch silhouette is close to 0.9 for both here and does not separate them)
    for m in ("ilisi", "kbet", "graph_connectivity"):
        assert wide.loc[m, "X_scVI"] > wide.loc[m, "X_pca"], m
    assert wide.loc["ilisi", "X_scVI"] > 1.5 * wide.loc["ilisi", "X_pca"]
    # types stay separated in scVI
    assert wide.loc["nmi", "X_scVI"] > 0.9
    assert wide.loc["silhouette_label", "X_scVI"] > 0.8
    assert wide.loc["isolated_labels", "X_scVI"] > 0.8


def test_integration_metrics_inputs():
    a = ad.AnnData(np.zeros((30, 2), dtype=np.float32),
                   obs=pd.DataFrame({"t": ["a", "b"] * 15, "s": ["x"] * 15 + ["y"] * 15},
                                    index=[f"c{i}" for i in range(30)]))
    a.obsm["X_pca"] = np.random.default_rng(0).normal(size=(30, 3))
    with pytest.raises(IntegrationInputError, match=r"obsm lacks embedding\(s\) \['X_scVI'\]"):
        integration_metrics(a, "t", "s")
    with pytest.raises(ValueError, match="unknown metric"):
        integration_metrics(a, "t", "s", embeddings=["X_pca"], metrics=["asw"])
    # one label: the label metrics are not computed (NaN, the note says why), the rest are
    a.obs["t"] = "a"
    table = integration_metrics(a, "t", "s", embeddings=["X_pca"],
                                metrics=["ilisi", "silhouette_label", "nmi", "ari"])
    by = table.set_index("metric")
    assert np.isfinite(by.loc["ilisi", "value"]) and by.loc["ilisi", "note"] == ""
    for m in ("silhouette_label", "nmi", "ari"):
        assert np.isnan(by.loc[m, "value"])
        assert by.loc[m, "note"] == "not computed: needs >= 2 labels in 't', found 1"
    # one batch: the batch metrics are not computed
    a.obs["t"], a.obs["s"] = ["a", "b"] * 15, "x"
    table = integration_metrics(a, "t", "s", embeddings=["X_pca"],
                                metrics=["ilisi", "silhouette_label"]).set_index("metric")
    assert table.loc["ilisi", "note"].startswith("not computed: needs >= 2 batches")
    assert np.isfinite(table.loc["silhouette_label", "value"])


def test_integration_metrics_rule_never_fails(tmp_path):
    """The diagnostic rule writes a 'not computed: why' table and figure whatever goes wrong."""
    from types import SimpleNamespace

    from livermsc.integrate import rule_integration_metrics

    a = ad.AnnData(np.zeros((30, 2), dtype=np.float32),
                   obs=pd.DataFrame({"cell_type": ["hepatocyte"] * 30, "sample": ["x", "y"] * 15},
                                    index=[f"c{i}" for i in range(30)]))
    a.obsm["X_pca"] = np.random.default_rng(0).normal(size=(30, 3))
    a.write_h5ad(tmp_path / "one_type.h5ad")  # one label and no X_scVI at all
    cfg = cluster_config()["metrics"]
    for name, why in (("one_type.h5ad", "obsm lacks embedding(s) ['X_scVI']"),
                      ("missing.h5ad", "missing.h5ad")):
        out = tmp_path / name.replace(".h5ad", "")
        smk = SimpleNamespace(
            input=SimpleNamespace(h5ad=str(tmp_path / name)),
            output=SimpleNamespace(table=str(out / "metrics.tsv"),
                                   figures=[str(out / "metrics.png")]),
            params=SimpleNamespace(cfg=cfg, batch_key="sample", seed=0, formats=["png"],
                                   dpi=100))
        out.mkdir()
        rule_integration_metrics(smk)
        table = pd.read_csv(out / "metrics.tsv", sep="\t")
        assert len(table) == 2 * len(cfg["metrics"])
        assert table["value"].isna().all()
        assert table["note"].str.startswith("not computed").all()
        assert table["note"].str.contains(why, regex=False).all(), table["note"].iloc[0]
        assert (out / "metrics.png").stat().st_size > 1000


def test_figures_are_written(sim_clustered, tmp_path):
    a = sim_clustered.copy()
    paths = plot_umaps(a, {"sample": "sample", "arm": "arm", "cluster": "leiden_1"}, tmp_path)
    markers = {t: CELL_TYPES[t][2] for t in ("hepatocyte", "lsec", "macrophage")}
    paths += plot_marker_dotplot(a, markers, "true_type", tmp_path / "dot", ["png", "svg"])
    table = pd.DataFrame({"embedding": ["X_pca", "X_scVI"] * 2, "metric": ["ilisi"] * 2 + ["nmi"] * 2,
                          "group": ["batch_mixing"] * 2 + ["conservation"] * 2,
                          "value": [0.1, 0.3, 0.9, 0.95], "n_cells": 10, "label_key": "t",
                          "batch_key": "s"})
    paths += save_figure(metrics_figure(table), tmp_path / "metrics", ["png"])
    names = sorted(p.name for p in paths)
    assert names == ["dot.png", "dot.svg", "metrics.png", "umap_arm.png", "umap_cluster.png",
                     "umap_sample.png"]
    assert all(p.stat().st_size > 1000 for p in paths)
    with pytest.raises(ClusterInputError, match="no such obs column"):
        plot_umaps(a, {"x": "nope"}, tmp_path)

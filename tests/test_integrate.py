"""Integration stage: merging, normalisation, HVGs, PCA baseline, scVI, accelerator choice.

``integrated_sim`` (used by test_cluster.py and test_annotate.py too) integrates the simulated
study once per test session: QC-flagged cells dropped as QC would, a few scVI epochs on one
CPU thread.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from livermsc.config import ConfigError, validate
from livermsc.integrate import (
    IntegrationInputError,
    check_input,
    choose_accelerator,
    integrate,
    merge_samples,
    normalise,
    select_hvgs,
)

#: scVI epochs in tests: enough for scVI to beat the PCA baseline on batch mixing.
TEST_EPOCHS = 15
_CACHE: dict[str, ad.AnnData] = {}


def integrate_config(**scvi: object) -> dict:
    """The integrate section as the workflow validates it, with scVI overrides."""
    settings = {"max_epochs": TEST_EPOCHS, "early_stopping": False, **scvi}
    return validate({"scvi": settings, "accelerator": "cpu"}, "integrate", "test config")


def qc_like(sim_adata: ad.AnnData) -> ad.AnnData:
    """The simulated study as QC would leave it: flagged cells dropped, truth renamed."""
    keep = ~(sim_adata.obs["is_doublet"] | sim_adata.obs["is_low_quality"]).to_numpy()
    a = sim_adata[keep].copy()
    a.obs = a.obs.drop(columns=["doublet_of", "is_doublet", "is_low_quality"]).rename(
        columns={"cell_type": "true_type", "cell_state": "true_state"})
    return a


def integrated_sim(sim_adata: ad.AnnData, tmp_dir) -> ad.AnnData:
    """The simulated study after :func:`integrate` (computed once per session; do not modify)."""
    if "sim" not in _CACHE:
        a = qc_like(sim_adata)
        integrate(a, integrate_config(), seed=0, threads=1, model_dir=tmp_dir / "scvi_model")
        _CACHE["sim"] = a
    return _CACHE["sim"]


@pytest.fixture(scope="session")
def sim_integrated(sim_adata, tmp_path_factory):
    return integrated_sim(sim_adata, tmp_path_factory.mktemp("integrate"))


def _toy(n_cells: int, genes: list[str], sample: str, seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    counts = sp.csr_matrix(rng.poisson(2.0, size=(n_cells, len(genes))).astype(np.float32))
    obs = pd.DataFrame({"sample": sample, "arm": "a"},
                       index=[f"AAAC{i:04d}-1" for i in range(n_cells)])
    a = ad.AnnData(X=counts.copy(), obs=obs, var=pd.DataFrame(index=genes))
    a.layers["counts"] = counts
    return a


# --- accelerator ----------------------------------------------------------------------------------


def test_choose_accelerator(monkeypatch):
    import torch

    assert choose_accelerator("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert choose_accelerator("auto") == "cpu"
    with pytest.raises(RuntimeError, match="no CUDA device"):
        choose_accelerator("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert choose_accelerator("auto") == "gpu"
    assert choose_accelerator("gpu") == "gpu"
    with pytest.raises(ValueError, match="not one of auto, cpu, gpu"):
        choose_accelerator("tpu")


def test_accelerator_is_validated_by_the_schema():
    with pytest.raises(ConfigError, match="integrate"):
        validate({"accelerator": "cuda"}, "integrate", "integrate")
    assert validate({}, "integrate", "x")["accelerator"] == "auto"
    assert validate({}, "integrate", "x")["scvi"]["max_epochs"] is None  # library heuristic


# --- merging and input checks -----------------------------------------------------------------------


def test_merge_inner_keeps_shared_genes_outer_fills_zero():
    a = _toy(5, ["g1", "g2", "g3"], "s1", seed=1)
    b = _toy(4, ["g2", "g3", "g4"], "s2", seed=2)
    inner = merge_samples({"s1": a, "s2": b}, join="inner")
    assert list(inner.var_names) == ["g2", "g3"]
    assert inner.n_obs == 9
    outer = merge_samples({"s1": a, "s2": b}, join="outer")
    assert set(outer.var_names) == {"g1", "g2", "g3", "g4"}
    g4 = outer[:, "g4"].layers["counts"].toarray().ravel()
    assert np.all(g4[:5] == 0)  # s1 never measured g4
    assert np.array_equal(g4[5:], b[:, "g4"].layers["counts"].toarray().ravel())
    # clashing barcodes are made unique with the sample id
    assert inner.obs_names.is_unique and inner.obs_names[0].startswith("s1:")
    assert isinstance(inner.obs["sample"].dtype, pd.CategoricalDtype)
    with pytest.raises(ValueError, match="inner, outer"):
        merge_samples({"s1": a}, join="left")


def test_check_input_names_the_problem():
    a = _toy(5, ["g1", "g2"], "s1")
    check_input(a, "x.h5ad", "sample")
    with pytest.raises(IntegrationInputError, match=r"x\.h5ad: obs lacks column\(s\) \['donor'\]"):
        check_input(a, "x.h5ad", "donor")
    with pytest.raises(IntegrationInputError, match="continuous covariate"):
        check_input(a, "x.h5ad", "sample", continuous=["arm"])
    b = a.copy()
    b.layers["counts"] = b.layers["counts"] * 0.5
    with pytest.raises(IntegrationInputError, match="non-integer"):
        check_input(b, "y.h5ad", "sample")
    del b.layers["counts"]
    with pytest.raises(IntegrationInputError, match=r"y\.h5ad: no layers\['counts'\]"):
        check_input(b, "y.h5ad", "sample")


def test_early_stopping_needs_validation_cells():
    a = _toy(30, [f"g{i}" for i in range(60)], "s1")
    with pytest.raises(IntegrationInputError, match="train_size < 1"):
        integrate(a, integrate_config(early_stopping=True, train_size=1.0), seed=0)


def test_hvg_keeps_every_gene_when_fewer_than_requested():
    a = _toy(40, [f"g{i}" for i in range(60)], "s1")
    select_hvgs(a, n_top_genes=2000, batch_key=None)
    assert a.var["highly_variable"].all()
    assert a.uns["hvg"]["method"] == "all_genes"


def _droin_batches(shared_data, sizes: dict[str, int], seed: int = 0) -> ad.AnnData:
    """Real hepatocytes (Droin 2021): ``sizes[mouse]`` random cells of each mouse, normalised."""
    full = ad.read_h5ad(shared_data / "droin2021_liver_circadian"
                        / "droin2021_liver_hepatocytes_circadian.h5ad", backed="r")
    rng = np.random.default_rng(seed)
    mice = full.obs["sample"].astype(str).to_numpy()
    idx = np.sort(np.concatenate([rng.choice(np.flatnonzero(mice == m), n, replace=False)
                                  for m, n in sizes.items()]))
    a = full[idx].to_memory()
    full.file.close()
    a.obs = a.obs[["sample"]].astype(str).astype("category")
    a.layers["counts"] = a.X.copy()
    normalise(a)
    return a


@pytest.mark.realdata
def test_hvg_survives_small_real_batches(shared_data):
    """50 real hepatocytes per mouse: batch-aware seurat_v3 fails in loess ("near
    singularities"); the selection falls back to seurat_v3 on all cells and records it."""
    mice = ["ZT00A", "ZT00B", "ZT00C", "ZT06A", "ZT06B", "ZT12A", "ZT12B", "ZT12C"]
    a = _droin_batches(shared_data, dict.fromkeys(mice, 50))
    record = select_hvgs(a, n_top_genes=1000, batch_key="sample", min_batch_cells=10)
    assert record["failed"] and record["failed"][0].startswith("seurat_v3_batch: ValueError")
    assert record["method"] == "seurat_v3"
    assert int(a.var["highly_variable"].sum()) == 1000
    assert a.uns["hvg"]["method"] == "seurat_v3" and "singularit" in a.uns["hvg"]["failed"]


@pytest.mark.realdata
def test_hvg_leaves_tiny_batches_out_of_the_ranking(shared_data):
    """Batches under min_batch_cells do not enter the batch-aware ranking but keep their cells;
    with fewer than two large batches the ranking is on all cells."""
    a = _droin_batches(shared_data, {"ZT00A": 600, "ZT00B": 600, "ZT12A": 12})
    record = select_hvgs(a, n_top_genes=500, batch_key="sample", min_batch_cells=100)
    assert record["method"] in ("seurat_v3_batch", "seurat_v3")
    if record["method"] == "seurat_v3_batch":
        assert record["batches_left_out"] == ["ZT12A"]
    assert int(a.var["highly_variable"].sum()) == 500 and a.n_obs == 1212
    b = _droin_batches(shared_data, {"ZT00A": 300, "ZT12A": 12})
    record = select_hvgs(b, n_top_genes=500, batch_key="sample", min_batch_cells=100)
    assert record["method"] == "seurat_v3" and not record["batches_left_out"]


def test_scvi_trains_when_the_last_minibatch_would_hold_one_cell():
    """143 cells, train_size 0.9: 129 training cells = one minibatch of 128 and one of 1, which
    batch normalisation cannot train on; that incomplete minibatch is dropped."""
    genes = [f"g{i}" for i in range(80)]
    parts = {"s1": _toy(70, genes, "s1", seed=1), "s2": _toy(73, genes, "s2", seed=2)}
    a = merge_samples(parts)
    integrate(a, integrate_config(max_epochs=2, n_latent=4, n_hidden=16), seed=0)
    assert a.obsm["X_scVI"].shape == (143, 4) and np.isfinite(a.obsm["X_scVI"]).all()


def test_hvg_falls_back_to_variance_when_every_flavour_fails(monkeypatch):
    """Whatever scanpy raises, a documented fallback flags exactly n_top_genes genes."""
    import livermsc.integrate as integ

    a = _toy(40, [f"g{i}" for i in range(300)], "s1")
    normalise(a)

    def broken(*args, **kwargs):
        raise ValueError("There are other near singularities as well")

    monkeypatch.setattr(integ.sc.pp, "highly_variable_genes", broken)
    record = select_hvgs(a, n_top_genes=100, batch_key=None)
    assert record["method"] == "variance" and len(record["failed"]) == 2
    assert int(a.var["highly_variable"].sum()) == 100
    X = a.X.toarray()
    top = np.argsort(-X.var(axis=0), kind="stable")[:100]
    assert a.var["highly_variable"].to_numpy()[top].all()


# --- the integration on the simulated study ---------------------------------------------------------


def test_integrate_writes_the_data_model(sim_integrated, sim_adata):
    a = sim_integrated
    # counts untouched, X log-normalised from them
    before = qc_like(sim_adata)
    assert (a.layers["counts"] != before.layers["counts"]).nnz == 0
    libs = np.asarray(a.layers["counts"].sum(axis=1)).ravel()
    norm = np.expm1(a.X.toarray() if sp.issparse(a.X) else a.X).sum(axis=1)
    np.testing.assert_allclose(norm, np.median(libs), rtol=1e-3)
    assert a.var["highly_variable"].sum() == 2000
    assert a.obsm["X_pca"].shape == (a.n_obs, 30)
    assert a.obsm["X_scVI"].shape == (a.n_obs, 20)
    rec = a.uns["scvi"]
    assert rec["accelerator"] == "cpu" and rec["device"] == "cpu"
    assert rec["epochs_trained"] == TEST_EPOCHS and rec["seed"] == 0
    assert rec["batch_key"] == "sample"


def test_saved_model_reloads_and_reproduces_the_latent(sim_integrated):
    import scvi

    a = sim_integrated
    hvg = a[:, a.var["highly_variable"].to_numpy()].copy()
    model = scvi.model.SCVI.load(a.uns["scvi"]["model_dir"], adata=hvg, accelerator="cpu")
    np.testing.assert_allclose(model.get_latent_representation(), a.obsm["X_scVI"], atol=1e-5)


def test_scvi_is_deterministic_on_cpu(sim_adata):
    """Same data, config and seed twice: identical latent spaces."""
    a = qc_like(sim_adata)[:400].copy()
    cfg = integrate_config(max_epochs=3, n_latent=5)
    cfg["n_top_genes"] = 300
    first = integrate(a.copy(), cfg, seed=7, threads=1).obsm["X_scVI"]
    second = integrate(a.copy(), cfg, seed=7, threads=1).obsm["X_scVI"]
    np.testing.assert_array_equal(first, second)
    other = integrate(a.copy(), cfg, seed=8, threads=1).obsm["X_scVI"]
    assert not np.allclose(first, other)

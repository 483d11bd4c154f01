"""Integrate a study's QC'd samples: merge, normalise, select HVGs, PCA baseline and scVI.

The output AnnData keeps every gene (``var["highly_variable"]`` flags the HVGs), the
log-normalised data in ``X``, raw counts in ``layers["counts"]``, the unintegrated PCA baseline
in ``obsm["X_pca"]`` and the scVI latent space in ``obsm["X_scVI"]``. The trained model is saved
next to it; it was trained on the HVG subset, so reload it with
``scvi.model.SCVI.load(model_dir, adata=adata[:, adata.var["highly_variable"]].copy())``.

:func:`integration_metrics` scores the PCA baseline against scVI with scib-metrics (batch
mixing and bio-conservation, with the annotated cell types as labels); its rule runs after
annotation.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp

from livermsc.plotting import save_figure

log = logging.getLogger("livermsc.integrate")

#: AnnData layer holding raw integer counts (written by ingest, never overwritten).
COUNTS = "counts"


class IntegrationInputError(ValueError):
    """An input of the integrate stage is unusable; the message says which and why."""


# --- accelerator --------------------------------------------------------------------------------


def choose_accelerator(requested: str = "auto") -> str:
    """Resolve ``integrate.accelerator`` (``auto|cpu|gpu``) to ``"cpu"`` or ``"gpu"``.

    ``auto`` picks the GPU when torch sees a CUDA device and the CPU otherwise; ``gpu`` without a
    CUDA device is an error (rather than a silent fall-back to a much slower CPU run).
    """
    import torch

    if requested not in ("auto", "cpu", "gpu"):
        raise ValueError(f"integrate.accelerator: {requested!r} is not one of auto, cpu, gpu")
    if requested == "cpu":
        return "cpu"
    has_gpu = bool(torch.cuda.is_available())
    if requested == "gpu" and not has_gpu:
        raise RuntimeError(
            "integrate.accelerator is 'gpu' but torch sees no CUDA device "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda}); use 'auto' or 'cpu', "
            "or run on a GPU node with a CUDA build of torch"
        )
    return "gpu" if has_gpu else "cpu"


def accelerator_info(accelerator: str) -> dict[str, str]:
    """A record of the device scVI trained on (for ``uns["scvi"]``)."""
    import scvi
    import torch

    info = {"accelerator": accelerator, "torch": str(torch.__version__),
            "scvi_tools": str(scvi.__version__)}
    if accelerator == "gpu":
        info["device"] = torch.cuda.get_device_name(0)
        info["cuda"] = str(torch.version.cuda)
    else:
        info["device"] = "cpu"
        info["torch_threads"] = str(torch.get_num_threads())
    return info


# --- inputs ---------------------------------------------------------------------------------------


def check_input(adata: ad.AnnData, source: str, batch_key: str,
                categorical: Sequence[str] = (), continuous: Sequence[str] = ()) -> None:
    """Fail early when ``adata`` lacks raw counts or an obs column the integration needs."""
    if COUNTS not in adata.layers:
        raise IntegrationInputError(f"{source}: no layers['{COUNTS}'] (expected raw integer counts)")
    counts = adata.layers[COUNTS]
    sample = counts[: min(adata.n_obs, 200)]
    values = sample.data if sp.issparse(sample) else np.asarray(sample).ravel()
    if values.size and (np.any(values < 0) or not np.allclose(values, np.round(values))):
        raise IntegrationInputError(
            f"{source}: layers['{COUNTS}'] holds non-integer or negative values "
            "(expected raw integer counts, not normalised data)")
    needed = [batch_key, *categorical, *continuous]
    missing = [k for k in needed if k not in adata.obs]
    if missing:
        raise IntegrationInputError(
            f"{source}: obs lacks column(s) {missing} named in the integrate config "
            f"(batch_key / covariates); available: {sorted(adata.obs.columns)}")
    for key in continuous:
        if not pd.api.types.is_numeric_dtype(adata.obs[key]):
            raise IntegrationInputError(f"{source}: obs['{key}'] is a continuous covariate but is not numeric")


def merge_samples(parts: Mapping[str, ad.AnnData], join: str = "inner") -> ad.AnnData:
    """Concatenate per-sample AnnData objects (keys: sample ids) into one study object.

    ``join="inner"`` keeps the genes present in every sample (the default: a gene missing from a
    sample was not measured there, and filling it with zeros would read as true absence to scVI
    and the marker tests); ``join="outer"`` keeps the union and fills absent genes with 0.
    Cell names become ``<sample>:<barcode>`` when they clash across samples.
    """
    if join not in ("inner", "outer"):
        raise ValueError(f"integrate.join: {join!r} is not one of inner, outer")
    if not parts:
        raise IntegrationInputError("no samples to integrate")
    names = pd.Index(np.concatenate([a.obs_names.to_numpy() for a in parts.values()]))
    adatas = {}
    for sample, a in parts.items():
        a = a.copy()
        if not names.is_unique:
            a.obs_names = [f"{sample}:{bc}" for bc in a.obs_names]
        adatas[sample] = a
    n_union = len(set().union(*(set(a.var_names) for a in adatas.values())))
    merged = ad.concat(list(adatas.values()), join=join, merge="same", fill_value=0)
    if join == "inner" and merged.n_vars < n_union:
        log.info("inner join keeps %d of %d genes (genes absent from some sample dropped)",
                 merged.n_vars, n_union)
    for col in merged.obs.columns:  # sample-level text columns back to categoricals
        values = merged.obs[col]
        if values.dtype == object and values.nunique() <= max(len(adatas), merged.n_obs // 2):
            merged.obs[col] = values.astype("category")
    return merged


def read_samples(paths: Sequence[str | Path], join: str, batch_key: str,
                 categorical: Sequence[str] = (), continuous: Sequence[str] = ()) -> ad.AnnData:
    """Read and check every per-sample file, then merge them (see :func:`merge_samples`)."""
    parts = {}
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise IntegrationInputError(f"{path}: QC'd sample file not found")
        a = ad.read_h5ad(path)
        check_input(a, str(path), batch_key, categorical, continuous)
        parts[path.stem] = a
    return merge_samples(parts, join=join)


# --- preprocessing --------------------------------------------------------------------------------


def normalise(adata: ad.AnnData, target_sum: float | None = None) -> None:
    """Shifted-log normalisation into X (``normalize_total`` + ``log1p``) from the counts layer."""
    adata.X = adata.layers[COUNTS].copy()
    if sp.issparse(adata.X):
        adata.X = adata.X.astype(np.float32)
    else:
        adata.X = np.asarray(adata.X, dtype=np.float32)
    sc.pp.normalize_total(adata, target_sum=target_sum)
    sc.pp.log1p(adata)


def select_hvgs(adata: ad.AnnData, n_top_genes: int, batch_key: str | None) -> None:
    """Flag HVGs (``seurat_v3`` on raw counts, batch-aware) in ``var["highly_variable"]``.

    With ``n_top_genes`` at or above the number of genes, every gene is kept.
    """
    if n_top_genes >= adata.n_vars:
        log.info("n_top_genes (%d) >= genes (%d): every gene is used", n_top_genes, adata.n_vars)
        adata.var["highly_variable"] = True
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        sc.pp.highly_variable_genes(adata, n_top_genes=n_top_genes, flavor="seurat_v3",
                                    layer=COUNTS, batch_key=batch_key, subset=False)


def pca_baseline(adata: ad.AnnData, n_comps: int, seed: int) -> None:
    """Unintegrated baseline: PCA of the log-normalised HVGs into ``obsm["X_pca"]``."""
    n_hvg = int(adata.var["highly_variable"].sum())
    n = min(n_comps, adata.n_obs - 1, n_hvg - 1)
    sc.pp.pca(adata, n_comps=n, mask_var="highly_variable", random_state=seed)


# --- scVI -------------------------------------------------------------------------------------------


def train_scvi(adata: ad.AnnData, params: Mapping[str, Any], batch_key: str, seed: int,
               accelerator: str, threads: int = 1) -> Any:
    """Train scVI on the raw counts of ``adata`` (already subset to HVGs); return the model."""
    import scvi
    import torch

    torch.set_num_threads(max(int(threads), 1))
    scvi.settings.seed = seed
    scvi.settings.dl_num_workers = 0
    scvi.model.SCVI.setup_anndata(
        adata, layer=COUNTS, batch_key=batch_key,
        categorical_covariate_keys=list(params.get("categorical_covariates") or []) or None,
        continuous_covariate_keys=list(params.get("continuous_covariates") or []) or None,
    )
    model = scvi.model.SCVI(
        adata, n_latent=params["n_latent"], n_layers=params["n_layers"],
        n_hidden=params["n_hidden"], dropout_rate=params["dropout_rate"],
        dispersion=params["dispersion"], gene_likelihood=params["gene_likelihood"],
    )
    train_kwargs: dict[str, Any] = {
        "max_epochs": params["max_epochs"],
        "accelerator": accelerator,
        "devices": 1 if accelerator == "gpu" else "auto",
        "batch_size": params["batch_size"],
        "train_size": params["train_size"],
        "early_stopping": params["early_stopping"],
        "plan_kwargs": {"lr": params["learning_rate"]},
        "enable_progress_bar": False,
    }
    if params["early_stopping"]:
        train_kwargs["early_stopping_patience"] = params["early_stopping_patience"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train(**train_kwargs)
    return model


def integrate(adata: ad.AnnData, cfg: Mapping[str, Any], seed: int, threads: int = 1,
              model_dir: str | Path | None = None) -> ad.AnnData:
    """Normalise, select HVGs, compute the PCA baseline and the scVI latent space (in place).

    ``cfg`` is the validated ``integrate`` config section. Returns ``adata`` with ``X``
    log-normalised, ``var["highly_variable"]``, ``obsm["X_pca"]``, ``obsm["X_scVI"]`` and
    ``uns["scvi"]`` (settings, accelerator, epochs trained, final losses).
    """
    batch_key = cfg["batch_key"]
    sp_cfg = cfg["scvi"]
    check_input(adata, "integrate input", batch_key, sp_cfg["categorical_covariates"],
                sp_cfg["continuous_covariates"])
    if sp_cfg["early_stopping"] and sp_cfg["train_size"] >= 1:
        raise IntegrationInputError(
            "integrate.scvi: early_stopping needs a validation set (train_size < 1)")
    accelerator = choose_accelerator(cfg["accelerator"])  # before any heavy work
    for col in [batch_key, *sp_cfg["categorical_covariates"]]:
        adata.obs[col] = adata.obs[col].astype(str).astype("category")
    normalise(adata, cfg["target_sum"])
    n_batches = adata.obs[batch_key].nunique()
    select_hvgs(adata, cfg["n_top_genes"], batch_key if n_batches > 1 else None)
    pca_baseline(adata, cfg["n_pcs"], seed)
    hvg = adata[:, adata.var["highly_variable"].to_numpy()].copy()
    log.info("scVI on %d cells x %d HVGs, batch key %r (%d batches), accelerator %s",
             hvg.n_obs, hvg.n_vars, batch_key, n_batches, accelerator)
    model = train_scvi(hvg, sp_cfg, batch_key, seed, accelerator, threads)
    adata.obsm["X_scVI"] = np.asarray(model.get_latent_representation(), dtype=np.float32)
    history = model.history
    epochs = len(history["elbo_train"]) if "elbo_train" in history else None
    record = {
        **{k: v for k, v in sp_cfg.items() if v is not None and not isinstance(v, list)},
        "categorical_covariates": list(sp_cfg["categorical_covariates"]),
        "continuous_covariates": list(sp_cfg["continuous_covariates"]),
        "batch_key": batch_key,
        "seed": int(seed),
        "requested_accelerator": cfg["accelerator"],
        "n_hvg": int(hvg.n_vars),
        "epochs_trained": int(epochs) if epochs is not None else -1,
        "max_epochs_used": int(model.trainer.max_epochs) if getattr(model, "trainer", None) else -1,
        **accelerator_info(accelerator),
    }
    if "elbo_train" in history:
        record["elbo_train_final"] = float(history["elbo_train"].iloc[-1, 0])
    if "elbo_validation" in history:
        record["elbo_validation_final"] = float(history["elbo_validation"].iloc[-1, 0])
    if model_dir is not None:
        model.save(str(model_dir), overwrite=True, save_anndata=False)
        record["model_dir"] = str(model_dir)
    adata.uns["scvi"] = record
    return adata


def snakemake_entry(smk: Any) -> None:
    """Rule ``integrate``: merge the QC'd samples of a study and integrate them."""
    cfg = smk.params.cfg
    sp_cfg = cfg["scvi"]
    adata = read_samples(list(smk.input.samples), cfg["join"], cfg["batch_key"],
                         sp_cfg["categorical_covariates"], sp_cfg["continuous_covariates"])
    integrate(adata, cfg, seed=int(smk.params.seed), threads=smk.threads,
              model_dir=smk.output.model)
    adata.write_h5ad(smk.output.h5ad, compression="gzip")


# --- integration metrics (scib-metrics) --------------------------------------------------------------

#: metric id -> (group, description); computed with the scib-metrics function of that name
METRICS: dict[str, tuple[str, str]] = {
    "ilisi": ("batch_mixing", "integration LISI on a 90-NN graph (scaled 0-1; higher = better mixed)"),
    "kbet": ("batch_mixing", "kBET acceptance rate on a 50-NN graph, all cells"),
    "kbet_per_label": ("batch_mixing", "kBET within each label (scIB definition; slow)"),
    "graph_connectivity": ("batch_mixing", "connectivity of each label's 15-NN subgraph"),
    "silhouette_batch": ("batch_mixing", "1 - |batch silhouette| within labels"),
    "pcr_comparison": ("batch_mixing", "reduction of variance explained by batch vs the PCA baseline"),
    "silhouette_label": ("conservation", "label silhouette (rescaled 0-1)"),
    "clisi": ("conservation", "cell-type LISI on a 90-NN graph (scaled 0-1; higher = purer)"),
    "nmi": ("conservation", "NMI of k-means clusters vs labels"),
    "ari": ("conservation", "ARI of k-means clusters vs labels"),
    "isolated_labels": ("conservation", "silhouette of labels present in the fewest batches"),
}


def _knn(X: np.ndarray, k: int) -> Any:
    from scib_metrics.nearest_neighbors import NeighborsResults
    from sklearn.neighbors import NearestNeighbors

    k = min(k, X.shape[0] - 1)
    dist, idx = NearestNeighbors(n_neighbors=k).fit(X).kneighbors(X)
    return NeighborsResults(indices=idx, distances=dist)


def integration_metrics(adata: ad.AnnData, label_key: str, batch_key: str,
                        embeddings: Sequence[str] = ("X_pca", "X_scVI"),
                        metrics: Sequence[str] = ("ilisi", "kbet", "graph_connectivity",
                                                  "silhouette_batch", "silhouette_label", "clisi",
                                                  "nmi", "ari", "isolated_labels"),
                        baseline: str = "X_pca", max_cells: int | None = None,
                        seed: int = 0, exclude_labels: Sequence[str] = ("unassigned",)
                        ) -> pd.DataFrame:
    """Score each embedding with scib-metrics; return a long table.

    Columns: embedding, metric, group (batch_mixing / conservation), value, description.
    Cells whose label is in ``exclude_labels`` are left out; with ``max_cells`` a seeded random
    subset of that many cells is scored (the metrics grow quadratically with cells).
    Exact neighbours come from scikit-learn, shared by the graph-based metrics.
    """
    import scib_metrics as sm

    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"cluster.metrics.metrics: unknown metric(s) {unknown}; known: {list(METRICS)}")
    missing = [e for e in [*embeddings, baseline] if e not in adata.obsm]
    if missing:
        raise IntegrationInputError(f"obsm lacks embedding(s) {missing}; available: {sorted(adata.obsm)}")
    for key in (label_key, batch_key):
        if key not in adata.obs:
            raise IntegrationInputError(f"obs lacks column '{key}' needed for the integration metrics")
    keep = ~adata.obs[label_key].astype(str).isin(list(exclude_labels)).to_numpy()
    idx = np.flatnonzero(keep)
    if max_cells is not None and idx.size > max_cells:
        idx = np.sort(np.random.default_rng(seed).choice(idx, size=max_cells, replace=False))
    labels = adata.obs[label_key].astype(str).to_numpy()[idx]
    batch = adata.obs[batch_key].astype(str).to_numpy()[idx]
    if np.unique(labels).size < 2 or np.unique(batch).size < 2:
        raise IntegrationInputError(
            f"integration metrics need >= 2 labels ('{label_key}') and >= 2 batches ('{batch_key}')")
    rows = []
    for emb in embeddings:
        X = np.asarray(adata.obsm[emb], dtype=np.float32)[idx]
        nn = _knn(X, 90)
        values: dict[str, float] = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for m in metrics:
                if m == "ilisi":
                    values[m] = sm.ilisi_knn(nn, batch)
                elif m == "clisi":
                    values[m] = sm.clisi_knn(nn, labels)
                elif m == "kbet":
                    values[m] = sm.kbet(nn.subset_neighbors(min(50, nn.n_neighbors)), batch)[0]
                elif m == "kbet_per_label":
                    values[m] = sm.kbet_per_label(nn.subset_neighbors(min(50, nn.n_neighbors)),
                                                  batch, labels)
                elif m == "graph_connectivity":
                    values[m] = sm.graph_connectivity(
                        nn.subset_neighbors(min(15, nn.n_neighbors)), labels)
                elif m == "silhouette_batch":
                    values[m] = sm.silhouette_batch(X, labels, batch)
                elif m == "pcr_comparison":
                    values[m] = sm.pcr_comparison(
                        np.asarray(adata.obsm[baseline])[idx], X, batch, categorical=True)
                elif m == "silhouette_label":
                    values[m] = sm.silhouette_label(X, labels)
                elif m in ("nmi", "ari"):
                    if "nmi" not in values:
                        res = sm.nmi_ari_cluster_labels_kmeans(X, labels)
                        values["nmi"], values["ari"] = res["nmi"], res["ari"]
                elif m == "isolated_labels":
                    values[m] = sm.isolated_labels(X, labels, batch)
        for m in metrics:
            rows.append({"embedding": emb, "metric": m, "group": METRICS[m][0],
                         "value": float(values[m]), "description": METRICS[m][1]})
    out = pd.DataFrame(rows)
    out["n_cells"] = idx.size
    out["label_key"] = label_key
    out["batch_key"] = batch_key
    return out


def metrics_figure(table: pd.DataFrame) -> Any:
    """The integration-metrics dot plot (one colour per embedding), titled with the keys."""
    from livermsc.plotting import integration_metric_plot

    data = table.assign(metric=table["group"].str.replace("_", " ") + ": " + table["metric"])
    fig = integration_metric_plot(data, metric_col="metric", value_col="value",
                                  group_col="embedding")
    fig.axes[0].set_title(f"batch: {table['batch_key'].iat[0]}, labels: "
                          f"{table['label_key'].iat[0]} ({table['n_cells'].iat[0]} cells)",
                          fontsize=8)
    fig.axes[0].set_xlabel("score (higher is better)")
    return fig


def snakemake_metrics(smk: Any) -> None:
    """Rule ``integration_metrics``: scib-metrics table and figure, PCA baseline vs scVI."""
    cfg = smk.params.cfg
    adata = ad.read_h5ad(smk.input.h5ad)
    table = integration_metrics(adata, label_key="cell_type", batch_key=smk.params.batch_key,
                                embeddings=cfg["embeddings"], metrics=cfg["metrics"],
                                max_cells=cfg["max_cells"], seed=int(smk.params.seed))
    table.to_csv(smk.output.table, sep="\t", index=False)
    save_figure(metrics_figure(table), Path(smk.output.figures[0]), smk.params.formats)

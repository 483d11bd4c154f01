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
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp
from sklearn.neighbors import NearestNeighbors

from livermsc.plotting import integration_metric_plot, save_figure

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
    import torch  # heavy (torch, seconds): imported only where scVI runs

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
    # heavy (scvi-tools, torch): imported only where scVI runs
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
        if a.n_obs == 0:
            log.warning("%s: QC kept no cell of this sample; it is left out of the study", path)
            continue
        check_input(a, str(path), batch_key, categorical, continuous)
        parts[path.stem] = a
    if not parts:
        raise IntegrationInputError("QC kept no cell in any sample of the study "
                                    "(see the qc tables); nothing to integrate")
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


#: HVG methods tried in turn by :func:`select_hvgs`; each later one is the fallback of the former
HVG_STEPS = ("seurat_v3_batch", "seurat_v3", "seurat", "variance")


def _hvg_flags(adata: ad.AnnData, step: str, n_top_genes: int, batch_key: str | None
               ) -> np.ndarray:
    """Boolean HVG mask of one method of :data:`HVG_STEPS` (may raise on degenerate data)."""
    if step in ("seurat_v3_batch", "seurat_v3"):
        res = sc.pp.highly_variable_genes(
            adata, n_top_genes=n_top_genes, flavor="seurat_v3", layer=COUNTS,
            batch_key=batch_key if step == "seurat_v3_batch" else None, subset=False,
            inplace=False)
    elif step == "seurat":  # dispersion of the log-normalised data in X, binned by mean
        res = sc.pp.highly_variable_genes(adata, n_top_genes=n_top_genes, flavor="seurat",
                                          subset=False, inplace=False)
    else:  # variance of the log-normalised data: always defined
        X = adata.X
        if sp.issparse(X):
            mean = np.asarray(X.mean(axis=0)).ravel()
            var = np.asarray(X.multiply(X).mean(axis=0)).ravel() - mean ** 2
        else:
            var = np.asarray(X).var(axis=0)
        order = np.argsort(-var, kind="stable")[:n_top_genes]
        mask = np.zeros(adata.n_vars, dtype=bool)
        mask[order] = True
        return mask
    mask = res["highly_variable"].to_numpy(dtype=bool)
    if not mask.any():
        raise ValueError("no gene was flagged")
    return mask


def select_hvgs(adata: ad.AnnData, n_top_genes: int, batch_key: str | None,
                min_batch_cells: int = 100) -> dict[str, Any]:
    """Flag HVGs in ``var["highly_variable"]``; record what was done in ``uns["hvg"]``.

    The first method that succeeds is used (each failure is logged as a warning):

    1. ``seurat_v3`` on raw counts, batch-aware (genes ranked by their median rank over
       batches), on the batches with at least ``min_batch_cells`` cells. Smaller batches are left
       out of the ranking (their loess fit of variance on mean is degenerate: with tens of cells
       many genes share the same mean and variance, and the fit fails with "near
       singularities"); their cells still get the HVGs chosen on the others;
    2. ``seurat_v3`` on all cells as one batch (also the first step when fewer than two batches
       are large enough);
    3. ``seurat`` (mean-binned dispersion of the log-normalised data);
    4. the genes of highest variance of the log-normalised data (cannot fail).

    With ``n_top_genes`` at or above the number of genes, every gene is kept. Returns the record.
    """
    record: dict[str, Any] = {"n_top_genes": int(n_top_genes), "batch_key": batch_key or "",
                              "min_batch_cells": int(min_batch_cells), "failed": []}
    if n_top_genes >= adata.n_vars:
        log.info("n_top_genes (%d) >= genes (%d): every gene is used", n_top_genes, adata.n_vars)
        adata.var["highly_variable"] = True
        record.update(method="all_genes", n_hvg=int(adata.n_vars), batches_left_out=[])
        adata.uns["hvg"] = _uns_record(record)
        return record
    steps = list(HVG_STEPS)
    small: list[str] = []
    ranked = adata
    if batch_key:
        sizes = adata.obs[batch_key].astype(str).value_counts()
        small = sorted(sizes.index[sizes < min_batch_cells])
        if (sizes >= min_batch_cells).sum() >= 2:
            if small:
                log.warning("HVG selection: batch(es) %s have fewer than %d cells and are left "
                            "out of the batch-aware ranking", small, min_batch_cells)
                ranked = adata[~adata.obs[batch_key].astype(str).isin(small).to_numpy()].copy()
        else:
            steps.remove("seurat_v3_batch")
            small = []
            log.warning("HVG selection: fewer than two batches with >= %d cells; HVGs are chosen "
                        "on all cells as one batch", min_batch_cells)
    else:
        steps.remove("seurat_v3_batch")
    mask = None
    for step in steps:
        data = ranked if step == "seurat_v3_batch" else adata
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mask = _hvg_flags(data, step, n_top_genes, batch_key)
        except (ValueError, ArithmeticError, np.linalg.LinAlgError, IndexError) as err:
            why = f"{step}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            record["failed"].append(why)
            log.warning("HVG selection %s failed (%s); falling back to the next method", step, why)
            continue
        record["method"] = step
        break
    assert mask is not None  # the variance step cannot fail
    adata.var["highly_variable"] = mask
    record.update(n_hvg=int(mask.sum()),
                  batches_left_out=small if record["method"] == "seurat_v3_batch" else [])
    log.info("HVGs: %d genes by %s%s", record["n_hvg"], record["method"],
             f" (left out of the ranking: {small})" if record["batches_left_out"] else "")
    adata.uns["hvg"] = _uns_record(record)
    return record


def _uns_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """``record`` with its lists joined as "; "-separated text (h5ad-safe, also when empty)."""
    return {k: "; ".join(map(str, v)) if isinstance(v, list) else v for k, v in record.items()}


def pca_baseline(adata: ad.AnnData, n_comps: int, seed: int) -> None:
    """Unintegrated baseline: PCA of the log-normalised HVGs into ``obsm["X_pca"]``."""
    n_hvg = int(adata.var["highly_variable"].sum())
    n = min(n_comps, adata.n_obs - 1, n_hvg - 1)
    sc.pp.pca(adata, n_comps=n, mask_var="highly_variable", random_state=seed)


# --- scVI -------------------------------------------------------------------------------------------


def train_scvi(adata: ad.AnnData, params: Mapping[str, Any], batch_key: str, seed: int,
               accelerator: str, threads: int = 1) -> Any:
    """Train scVI on the raw counts of ``adata`` (already subset to HVGs); return the model."""
    # heavy (scvi-tools, torch): imported only where scVI runs
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
    # a last minibatch of 1-2 cells breaks batch normalisation ("Expected more than 1 value per
    # channel"); scvi-tools only warns, so drop that incomplete minibatch in each epoch instead
    n_train = math.ceil(float(params["train_size"]) * adata.n_obs)
    if n_train > int(params["batch_size"]) and 0 < n_train % int(params["batch_size"]) < 3:
        log.info("last minibatch would hold %d cell(s): dropped in each epoch",
                 n_train % int(params["batch_size"]))
        train_kwargs["datasplitter_kwargs"] = {"drop_last": True}
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
    select_hvgs(adata, cfg["n_top_genes"], batch_key if n_batches > 1 else None,
                min_batch_cells=cfg["hvg_min_batch_cells"])
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


def rule_integrate(smk: Any) -> None:
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
    # heavy (scib-metrics loads jax): imported only by the integration-metrics rule
    from scib_metrics.nearest_neighbors import NeighborsResults

    k = min(k, X.shape[0] - 1)
    dist, idx = NearestNeighbors(n_neighbors=k).fit(X).kneighbors(X)
    return NeighborsResults(indices=idx, distances=dist)


#: metrics that compare labels (need >= 2 labels) and that compare batches (need >= 2 batches)
NEEDS_LABELS = {"silhouette_label", "clisi", "nmi", "ari", "isolated_labels"}
NEEDS_BATCHES = {"ilisi", "kbet", "kbet_per_label", "graph_connectivity", "silhouette_batch",
                 "pcr_comparison"}


def _one_metric(m: str, X: np.ndarray, nn: Any, labels: np.ndarray, batch: np.ndarray,
                base: np.ndarray) -> dict[str, float]:
    """Value(s) of metric ``m`` (nmi and ari come together)."""
    import scib_metrics as sm  # heavy (jax): imported only by the integration-metrics rule

    if m == "ilisi":
        return {m: sm.ilisi_knn(nn, batch)}
    if m == "clisi":
        return {m: sm.clisi_knn(nn, labels)}
    if m == "kbet":
        return {m: sm.kbet(nn.subset_neighbors(min(50, nn.n_neighbors)), batch)[0]}
    if m == "kbet_per_label":
        return {m: sm.kbet_per_label(nn.subset_neighbors(min(50, nn.n_neighbors)), batch, labels)}
    if m == "graph_connectivity":
        return {m: sm.graph_connectivity(nn.subset_neighbors(min(15, nn.n_neighbors)), labels)}
    if m == "silhouette_batch":
        return {m: sm.silhouette_batch(X, labels, batch)}
    if m == "pcr_comparison":
        return {m: sm.pcr_comparison(base, X, batch, categorical=True)}
    if m == "silhouette_label":
        return {m: sm.silhouette_label(X, labels)}
    if m in ("nmi", "ari"):
        res = sm.nmi_ari_cluster_labels_kmeans(X, labels)
        return {"nmi": res["nmi"], "ari": res["ari"]}
    if m == "isolated_labels":
        return {m: sm.isolated_labels(X, labels, batch)}
    raise ValueError(f"unknown metric {m!r}")


def integration_metrics(adata: ad.AnnData, label_key: str, batch_key: str,
                        embeddings: Sequence[str] = ("X_pca", "X_scVI"),
                        metrics: Sequence[str] = ("ilisi", "kbet", "graph_connectivity",
                                                  "silhouette_batch", "silhouette_label", "clisi",
                                                  "nmi", "ari", "isolated_labels"),
                        baseline: str = "X_pca", max_cells: int | None = None,
                        seed: int = 0, exclude_labels: Sequence[str] = ("unassigned",)
                        ) -> pd.DataFrame:
    """Score each embedding with scib-metrics; return a long table.

    Columns: embedding, metric, group (batch_mixing / conservation), value, description, note.
    Cells whose label is in ``exclude_labels`` are left out; with ``max_cells`` a seeded random
    subset of that many cells is scored (the metrics grow quadratically with cells).
    Exact neighbours come from scikit-learn, shared by the graph-based metrics.

    A metric that cannot be computed on these data (label metrics with one label, batch
    metrics with one batch, or any failure inside scib-metrics) gets value NaN and a note
    ``not computed: <why>``; only a missing embedding or obs column and an unknown metric name
    raise.
    """
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
    n_labels, n_batches = np.unique(labels).size, np.unique(batch).size
    skip: dict[str, str] = {}
    for m in metrics:
        if idx.size < 10:
            skip[m] = f"not computed: {idx.size} labelled cells (< 10)"
        elif m in NEEDS_LABELS and n_labels < 2:
            skip[m] = f"not computed: needs >= 2 labels in '{label_key}', found {n_labels}"
        elif m in NEEDS_BATCHES and n_batches < 2:
            skip[m] = f"not computed: needs >= 2 batches in '{batch_key}', found {n_batches}"
    for m, why in skip.items():
        log.warning("integration metric %s %s", m, why)
    rows = []
    for emb in embeddings:
        X = np.asarray(adata.obsm[emb], dtype=np.float32)[idx]
        todo = [m for m in metrics if m not in skip]
        nn = _knn(X, 90) if todo else None
        base = np.asarray(adata.obsm[baseline])[idx]
        values: dict[str, float] = {}
        notes = dict(skip)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for m in todo:
                if m in values:
                    continue
                try:
                    values.update(_one_metric(m, X, nn, labels, batch, base))
                except Exception as err:  # a diagnostic: record why, never stop the run
                    notes[m] = f"not computed: {type(err).__name__}: {err}"
                    log.warning("integration metric %s on %s %s", m, emb, notes[m])
        for m in metrics:
            rows.append({"embedding": emb, "metric": m, "group": METRICS[m][0],
                         "value": float(values[m]) if m in values else float("nan"),
                         "description": METRICS[m][1], "note": notes.get(m, "")})
    out = pd.DataFrame(rows)
    out["n_cells"] = idx.size
    out["label_key"] = label_key
    out["batch_key"] = batch_key
    return out


def not_computed_table(why: str, label_key: str, batch_key: str,
                       embeddings: Sequence[str], metrics: Sequence[str]) -> pd.DataFrame:
    """The metrics table when none could be computed: every value NaN, the note says why."""
    rows = [{"embedding": e, "metric": m, "group": METRICS.get(m, ("", ""))[0],
             "value": float("nan"), "description": METRICS.get(m, ("", m))[1],
             "note": f"not computed: {why}"} for e in embeddings for m in metrics]
    out = pd.DataFrame(rows)
    out["n_cells"] = 0
    out["label_key"] = label_key
    out["batch_key"] = batch_key
    return out


def metrics_figure(table: pd.DataFrame) -> Any:
    """The integration-metrics dot plot (one colour per embedding), titled with the keys.

    Metrics that were not computed are listed under the plot with the reason; when none was,
    the figure holds only that text.
    """
    note = table["note"].fillna("").astype(str) if "note" in table else \
        pd.Series("", index=table.index)
    done = table[table["value"].notna() & (note == "")]
    title = (f"batch: {table['batch_key'].iat[0]}, labels: {table['label_key'].iat[0]} "
             f"({table['n_cells'].iat[0]} cells)")
    skipped = [f"{m}: {n}" for m, n in
               dict(zip(table["metric"][note != ""], note[note != ""], strict=True)).items()]
    if done.empty:
        fig, ax = plt.subplots(figsize=(7, 1.2 + 0.25 * max(len(skipped), 1)))
        ax.axis("off")
        ax.text(0.0, 1.0, "integration metrics not computed\n" + "\n".join(skipped[:20]),
                va="top", ha="left", fontsize=8, transform=ax.transAxes, wrap=True)
        ax.set_title(title, fontsize=8)
        return fig
    data = done.assign(metric=done["group"].str.replace("_", " ") + ": " + done["metric"])
    fig = integration_metric_plot(data, metric_col="metric", value_col="value",
                                  group_col="embedding")
    fig.axes[0].set_title(title, fontsize=8)
    fig.axes[0].set_xlabel("score (higher is better)" + "".join(f"\n{t}" for t in skipped[:8]))
    return fig


def rule_integration_metrics(smk: Any) -> None:
    """Rule ``integration_metrics``: scib-metrics table and figure, PCA baseline vs scVI.

    A diagnostic: whatever goes wrong, it writes a table and a figure saying "not computed:
    why" and exits 0, so that the verdicts downstream never depend on it.
    """
    cfg = smk.params.cfg
    label_key, batch_key = "cell_type", smk.params.batch_key
    try:
        adata = ad.read_h5ad(smk.input.h5ad, backed="r")  # obs and obsm only: X stays on disk
        table = integration_metrics(adata, label_key=label_key, batch_key=batch_key,
                                    embeddings=cfg["embeddings"], metrics=cfg["metrics"],
                                    max_cells=cfg["max_cells"], seed=int(smk.params.seed))
    except Exception as err:  # a diagnostic: record why, never stop the run
        why = f"{type(err).__name__}: {err}"
        log.warning("integration metrics not computed (%s)", why)
        table = not_computed_table(why, label_key, batch_key, cfg["embeddings"], cfg["metrics"])
    n_done = int(table["value"].notna().sum())
    log.info("integration metrics: %d of %d values computed", n_done, len(table))
    table.to_csv(smk.output.table, sep="\t", index=False)
    try:
        fig = metrics_figure(table)
    except Exception as err:  # a diagnostic figure must not stop the run either
        log.warning("integration metrics figure failed (%s: %s); writing a text figure",
                    type(err).__name__, err)
        fig = metrics_figure(table.assign(value=float("nan"),
                                          note=f"not computed: figure failed ({err})"))
    save_figure(fig, Path(smk.output.figures[0]), smk.params.formats, int(smk.params.dpi))

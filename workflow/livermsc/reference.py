"""Reference-based annotation: cell-type labels transferred from an annotated reference with scANVI.

Optional (``cluster.annotation.reference: {path, label_key, ...}``): when set, the workflow runs
the rule ``annotate_reference`` (scVI environment) instead of ``annotate``. The marker panel is
still applied (:func:`livermsc.annotate.annotate`; its calls go to ``obs["cell_type_panel"]``),
and ``obs["cell_type"]`` holds the transferred labels, ``unassigned`` where the label's
probability is below ``min_confidence`` (Xu et al. 2021, scANVI, Mol Syst Biol 17:e9620).
This module holds the scvi-tools / torch imports, so that the panel annotation, scoring and
claims never import them.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp
import scvi
import torch

from livermsc.annotate import AnnotationInputError, annotate
from livermsc.catalogue import load_panel
from livermsc.cluster import read_clustered
from livermsc.integrate import choose_accelerator
from livermsc.vocabulary import UNASSIGNED

log = logging.getLogger("livermsc.reference")

_UNLABELLED = "__unlabelled__"


def _counts(a: ad.AnnData, what: str) -> sp.csr_matrix:
    """Raw counts of ``a`` (``layers["counts"]`` or ``X``) as CSR; non-integer data is an error."""
    x = a.layers["counts"] if "counts" in a.layers else a.X
    x = sp.csr_matrix(x)
    data = x.data
    if data.size and (data.min() < 0 or not np.allclose(data, np.round(data))):
        raise AnnotationInputError(f"{what}: expected raw non-negative integer counts in "
                                   "layers['counts'] or X, found other values")
    return x.astype(np.float32)


def read_reference(path: str | Path, label_key: str) -> ad.AnnData:
    """Read an annotated reference h5ad; check its label column and counts."""
    path = Path(path)
    if not path.is_file():
        raise AnnotationInputError(f"{path}: reference file not found "
                                   "(cluster.annotation.reference.path)")
    try:
        ref = ad.read_h5ad(path)
    except (OSError, KeyError, ValueError) as err:
        raise AnnotationInputError(f"{path}: not a readable h5ad file ({err})") from None
    if label_key not in ref.obs:
        raise AnnotationInputError(
            f"{path}: obs has no column '{label_key}' (cluster.annotation.reference.label_key; "
            f"columns: {list(ref.obs.columns)})")
    if ref.obs[label_key].isna().all():
        raise AnnotationInputError(f"{path}: obs['{label_key}'] has no labels")
    return ref


def transfer_labels(adata: ad.AnnData, reference: ad.AnnData, settings: Mapping[str, Any],
                    seed: int, threads: int = 1, accelerator: str = "auto") -> pd.DataFrame:
    """Transfer ``settings["label_key"]`` from ``reference`` to ``adata`` with scANVI.

    scVI is trained on the raw counts of reference and query together (their shared genes,
    the ``n_top_genes`` most variable of them; batches: the reference's ``batch_key`` column or
    one reference batch, and the query's ``query_batch_key`` column or one query batch), then
    scANVI is initialised from it with the reference labels and the query cells unlabelled.
    Returns, per query cell, ``label`` (the most probable reference label, ``unassigned`` when
    its probability is below ``min_confidence``), ``predicted`` (the label before that rule) and
    ``confidence`` (that probability).
    """
    label_key = settings["label_key"]
    shared = [g for g in reference.var_names if g in set(adata.var_names)]
    if len(shared) < settings["min_shared_genes"]:
        raise AnnotationInputError(
            f"reference shares only {len(shared)} genes with the study (expected at least "
            f"{settings['min_shared_genes']}, cluster.annotation.reference.min_shared_genes): "
            "check species and gene symbols")
    labels = reference.obs[label_key].astype("string").fillna(_UNLABELLED).astype(str)
    if _UNLABELLED in set(reference.obs[label_key].astype(str)):
        raise AnnotationInputError(f"reference label '{_UNLABELLED}' is reserved")

    def batches(a: ad.AnnData, key: str | None, prefix: str) -> np.ndarray:
        if key and key in a.obs:
            return (prefix + ":" + a.obs[key].astype(str)).to_numpy()
        return np.full(a.n_obs, prefix)

    x = sp.vstack([_counts(reference[:, shared], "reference"),
                   _counts(adata[:, shared], "study")]).tocsr()
    obs = pd.DataFrame({
        "_batch": np.concatenate([batches(reference, settings["batch_key"], "reference"),
                                  batches(adata, settings["query_batch_key"], "query")]),
        "_label": np.concatenate([labels.to_numpy(), np.full(adata.n_obs, _UNLABELLED)]),
    }, index=[f"r{i}" for i in range(reference.n_obs)] + [f"q{i}" for i in range(adata.n_obs)])
    joint = ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=shared))
    joint.layers["counts"] = joint.X.copy()
    if len(shared) > settings["n_top_genes"]:
        logged = joint.copy()
        sc.pp.normalize_total(logged, target_sum=1e4)
        sc.pp.log1p(logged)
        sc.pp.highly_variable_genes(logged, n_top_genes=int(settings["n_top_genes"]),
                                    flavor="seurat")
        joint = joint[:, logged.var["highly_variable"].to_numpy()].copy()
    for col in ("_batch", "_label"):
        joint.obs[col] = joint.obs[col].astype("category")
    torch.set_num_threads(max(int(threads), 1))
    scvi.settings.seed = seed
    scvi.settings.dl_num_workers = 0
    train = {"accelerator": accelerator, "enable_progress_bar": False,
             "devices": 1 if accelerator == "gpu" else "auto",
             "batch_size": int(settings["batch_size"])}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scvi.model.SCVI.setup_anndata(joint, layer="counts", batch_key="_batch",
                                      labels_key="_label")
        vae = scvi.model.SCVI(joint, n_latent=int(settings["n_latent"]))
        vae.train(max_epochs=int(settings["scvi_epochs"]), **train)
        lvae = scvi.model.SCANVI.from_scvi_model(vae, unlabeled_category=_UNLABELLED)
        lvae.train(max_epochs=int(settings["scanvi_epochs"]), n_samples_per_label=100, **train)
        query = np.arange(reference.n_obs, joint.n_obs)
        probs = lvae.predict(joint, indices=query, soft=True)
    probs = probs.drop(columns=[c for c in probs.columns if c == _UNLABELLED])
    predicted = probs.idxmax(axis=1).to_numpy()
    confidence = probs.max(axis=1).to_numpy(dtype=float)
    label = np.where(confidence >= settings["min_confidence"], predicted, UNASSIGNED)
    log.info("reference labels transferred to %d cells (%d below confidence %.2f: unassigned)",
             adata.n_obs, int((label == UNASSIGNED).sum()), settings["min_confidence"])
    return pd.DataFrame({"label": label, "predicted": predicted, "confidence": confidence},
                        index=adata.obs_names)


# --- the whole annotation ------------------------------------------------------------------------------


def rule_annotate_reference(smk: Any) -> None:
    """Rule ``annotate_reference``: the panel annotation plus labels transferred from the
    reference, into annotated.h5ad and the cluster table."""
    cfg = smk.params.cfg
    ref_cfg = cfg["annotation"]["reference"]
    seed, threads = int(smk.params.seed), int(smk.threads)
    panel = load_panel(smk.input.celltypes, species=smk.params.species)
    reference = read_reference(smk.input.reference, ref_cfg["label_key"])
    accelerator = choose_accelerator(ref_cfg["accelerator"])
    adata = read_clustered(smk.input.integrated, smk.input.clustered)
    table = annotate(adata, panel, cfg, seed, threads, transfer=lambda a: transfer_labels(
        a, reference, ref_cfg, seed, threads, accelerator))
    table.to_csv(smk.output.table, sep="\t", index=False)
    adata.write_h5ad(smk.output.h5ad, compression="gzip")

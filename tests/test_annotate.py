"""Cell-type annotation: the marker panel, the calling rules, and agreement with known labels.

Known answers: the simulator's planted cell types and states; the published cell types of a
real mouse liver dataset (Tabula Muris Senis, Smart-seq2); a real all-hepatocyte dataset (Droin
2021, 10x, sub-sampled to 3,000 of its 18,378 cells here); real PBMCs thinned to ~1,300 UMIs per
cell. Real data are clustered with PCA + Leiden here (no scVI) to keep the tests fast.
"""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp
import yaml
from livermsc.annotate import (
    AnnotationInputError,
    annotate,
    assign_clusters,
    check_signature_overlap,
    claim_overlaps,
    cluster_profiles,
    marker_auc,
    population_markers,
    refine_states,
    signature_marker_overlap,
    smooth,
)
from livermsc.catalogue import Panel, load_panel
from livermsc.config import ConfigError
from livermsc.reference import read_reference, transfer_labels
from livermsc.vocabulary import UNASSIGNED
from test_cluster import cluster_config, clustered_sim

PANEL = "config/celltypes.yaml"
MAJOR = ["hepatocyte", "lsec", "hsc", "macrophage", "cholangiocyte", "cd4_t", "cd8_t", "b_cell",
         "plasma_cell", "nk", "neutrophil", "dendritic_cell"]
#: Tabula Muris Senis liver labels -> the types of ours they may legitimately be called.
TMS_TO_OURS = {
    "hepatocyte": {"hepatocyte"},
    "endothelial cell of hepatic sinusoid": {"lsec"},
    "B cell": {"b_cell"},
    "T cell": {"cd4_t", "cd8_t"},
    "myeloid leukocyte": {"macrophage", "neutrophil", "dendritic_cell", "pdc"},
}
_CACHE: dict[str, object] = {}


@pytest.fixture(scope="session")
def panel(repo_root) -> Panel:
    return load_panel(repo_root / PANEL, "mouse")


# --- the panel ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("species", ["mouse", "human"])
def test_panel_covers_every_type_in_both_species(repo_root, species):
    p = load_panel(repo_root / PANEL, species)
    assert set(MAJOR) <= set(p.types)
    assert p.types["macrophage"].states.keys() == {"kupffer", "momac"}
    assert p.types["cd4_t"].states.keys() == {"treg", "cd4_tconv"}
    assert p.parents == {"kupffer": "macrophage", "momac": "macrophage", "treg": "cd4_t",
                         "cd4_tconv": "cd4_t"}
    for t in p.types.values():
        genes = t.markers + [g for s in t.states.values() for g in s]
        assert len(t.source) > 20
        if species == "human":
            assert all(g == g.upper() for g in genes), t.name
        else:
            assert all(g != g.upper() or "-" in g for g in genes), t.name


def test_panel_errors_name_file_and_field(tmp_path, repo_root):
    doc = yaml.safe_load((repo_root / PANEL).read_text())
    del doc["cell_types"]["lsec"]["source"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=r"bad\.yaml: field 'cell_types\.lsec\b.*source"):
        load_panel(bad)
    doc = yaml.safe_load((repo_root / PANEL).read_text())
    doc["cell_types"]["cd4_t"]["states"]["hsc"] = doc["cell_types"]["cd4_t"]["states"]["treg"]
    bad.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match="'hsc' is used twice"):
        load_panel(bad)
    with pytest.raises(ConfigError, match="not mouse or human"):
        load_panel(repo_root / PANEL, "rat")


# --- the calling rules, hand-computed ---------------------------------------------------------------


def test_assign_clusters_hand_computed():
    scores = pd.DataFrame(
        {"a": [2.0, 2.0, 1.0, 0.05, 0.0, 1.0], "b": [0.0, 1.0, 1.5, 0.0, 0.02, 0.9]},
        index=[f"c{i}" for i in range(6)])
    clusters = pd.Series(["0", "0", "0", "1", "1", "2"], index=scores.index)
    auc = pd.DataFrame({"a": [0.9, 0.6, 0.95], "b": [0.7, 0.8, 0.5]}, index=["0", "1", "2"])
    t = assign_clusters(scores, clusters, auc, min_marker_auc=0.75,
                        min_confidence=0.7).set_index("cluster")
    # cluster 0: means a=5/3, b=2.5/3; cells' best: a, a, b -> confidence 2/3 < 0.7
    assert t.loc["0", "best_type"] == "a"
    assert t.loc["0", "margin"] == pytest.approx(2.5 / 3)
    assert t.loc["0", "confidence"] == pytest.approx(2 / 3)
    assert t.loc["0", "cell_type"] == UNASSIGNED and "confidence" in t.loc["0", "reason"]
    # cluster 1: best type a (mean 0.025 > 0.01), but a's markers are not enriched (AUC 0.6)
    assert t.loc["1", "best_type"] == "a" and t.loc["1", "marker_auc"] == 0.6
    assert t.loc["1", "cell_type"] == UNASSIGNED and "marker AUC" in t.loc["1", "reason"]
    # cluster 2: one cell, clear call; a low absolute score level is no reason to reject it
    assert t.loc["2", "cell_type"] == "a" and t.loc["2", "confidence"] == 1.0
    small = assign_clusters(scores / 100, clusters, auc, min_confidence=0.7).set_index("cluster")
    assert small["cell_type"].equals(t["cell_type"])
    relaxed = assign_clusters(scores, clusters, auc, min_marker_auc=0.55, min_confidence=0.5)
    assert relaxed.set_index("cluster")["cell_type"].tolist() == ["a", "a", "a"]
    strict = assign_clusters(scores, clusters, min_margin=1.0).set_index("cluster")
    assert strict.loc["0", "cell_type"] == UNASSIGNED and "margin" in strict.loc["0", "reason"]


def test_marker_auc_hand_computed():
    # one cluster, genes g0..g4 with mean expression 5, 4, 3, 2, 1
    profiles = pd.DataFrame([[5.0, 4.0, 3.0, 2.0, 1.0]], index=["0"],
                            columns=[f"g{i}" for i in range(5)])
    auc = marker_auc(profiles, {"top": ["g0", "g1"], "mid": ["g1", "g3"], "bottom": ["g3", "g4"],
                                "absent": ["g0", "x"], "tie": ["g0", "g2"]})
    assert auc.loc["0", "top"] == 1.0  # both markers above all 3 other genes
    assert auc.loc["0", "mid"] == pytest.approx(3 / 6)  # g1 beats g2,g4; g3 beats g4 -> 3 of 6
    assert auc.loc["0", "bottom"] == 0.0
    assert np.isnan(auc.loc["0", "absent"])  # fewer than min_genes=2 markers among the genes
    ties = pd.DataFrame([[1.0, 1.0, 0.0, 0.0]], index=["0"], columns=["a", "b", "c", "d"])
    assert marker_auc(ties, {"s": ["a", "c"]}).loc["0", "s"] == pytest.approx(0.5)
    # ranks only: any increasing transformation (e.g. lower depth) leaves the AUC unchanged
    np.testing.assert_allclose(marker_auc(np.log1p(profiles * 0.1), {"m": ["g1", "g3"]}),
                               marker_auc(profiles, {"m": ["g1", "g3"]}))


def test_cluster_profiles_are_cluster_means():
    x = sp.csr_matrix(np.array([[1.0, 0.0], [3.0, 2.0], [0.0, 4.0]]))
    a = ad.AnnData(x, var=pd.DataFrame(index=["u", "v"]))
    prof = cluster_profiles(a, pd.Series(["k", "k", "j"], index=a.obs_names))
    assert prof.loc["k"].tolist() == [2.0, 1.0] and prof.loc["j"].tolist() == [0.0, 4.0]


def test_smooth_hand_computed():
    graph = sp.csr_matrix(np.array([[0, 1, 0], [1, 0, 1], [0, 1, 0]], dtype=float))
    values = np.array([[3.0], [0.0], [6.0]])
    np.testing.assert_allclose(smooth(values, graph), [[1.5], [3.0], [3.0]])
    # among members 0 and 1 only: cell 1 no longer sees cell 2
    np.testing.assert_allclose(smooth(values[:2], graph, np.array([0, 1])), [[1.5], [1.5]])
    assert smooth(values, None) is values


def test_refine_states_per_cell(panel):
    cell_type = pd.Series(["cd4_t", "cd4_t", "cd4_t", "macrophage", "hsc"])
    scores = pd.DataFrame({"treg": [1.0, -0.5, -0.2, 0, 2], "cd4_tconv": [0.2, 0.8, -0.1, 0, 0],
                           "kupffer": [0, 0, 0, 0.4, 0], "momac": [0, 0, 0, 0.9, 0]})
    state = refine_states(cell_type, scores, panel)
    # the third CD4 cell has no positive state score: it keeps its type
    assert state.tolist() == ["treg", "cd4_tconv", "cd4_t", "momac", "hsc"]


def test_missing_cluster_key_is_explained(sim_adata, panel):
    a = sim_adata[:50].copy()
    with pytest.raises(AnnotationInputError, match="leiden_1"):
        annotate(a, panel, cluster_config(), seed=0)


# --- simulated study: planted truth -------------------------------------------------------------------


def annotated_sim(sim_adata, tmp_dir, panel: Panel) -> tuple[ad.AnnData, pd.DataFrame]:
    if "sim" not in _CACHE:
        a = clustered_sim(sim_adata, tmp_dir).copy()
        table = annotate(a, panel, cluster_config(), seed=0)
        _CACHE["sim"] = (a, table)
    return _CACHE["sim"]


def test_simulated_types_and_states_agree_with_truth(sim_adata, tmp_path_factory, panel):
    a, table = annotated_sim(sim_adata, tmp_path_factory.mktemp("annotate"), panel)
    obs = a.obs
    for col in ("cell_type", "cell_state"):
        assert isinstance(obs[col].dtype, pd.CategoricalDtype)
    assert obs["cell_type_confidence"].between(0, 1).all()
    per_type = (obs["cell_type"].astype(str) == obs["true_type"].astype(str)).groupby(
        obs["true_type"], observed=True).mean()
    states = {}
    for s in ("treg", "cd4_tconv", "kupffer", "momac"):
        cells = obs["true_state"] == s
        states[s] = float((obs.loc[cells, "cell_state"].astype(str) == s).mean())
    print("\nsimulated study, agreement with the planted cell type:\n", per_type.round(3))
    print("planted state agreement:", {k: round(v, 3) for k, v in states.items()})
    assert (per_type.reindex(MAJOR) >= 0.97).all(), per_type
    assert min(states.values()) >= 0.9, states
    assert set(table.columns) >= {"cluster", "n_cells", "cell_type", "confidence", "margin",
                                  "second_type", "states"}
    assert table["n_cells"].sum() == a.n_obs


def test_unscored_state_panel_leaves_parent_state(sim_adata, tmp_path_factory, panel):
    """Without the Kupffer markers, macrophages are not forced into the other state."""
    a, _ = annotated_sim(sim_adata, tmp_path_factory.mktemp("annotate"), panel)
    kupffer = panel.types["macrophage"].states["kupffer"]
    b = a[:, [g for g in a.var_names if g not in kupffer]].copy()
    annotate(b, panel, cluster_config(), seed=0)
    macs = b.obs["cell_type"] == "macrophage"
    assert (b.obs.loc[macs, "cell_state"] == "macrophage").all()
    assert b.uns["annotation"]["markers_missing"]["kupffer"] == kupffer


# --- circularity: markers that select a population vs signatures scored in it ---------------------


def test_population_markers_include_the_lineage(panel):
    mac = population_markers(panel, "cell_type", "macrophage")
    assert {"Cd68", "Clec4f", "Ccr2"} <= set(mac)  # the type's and its states' markers
    assert set(population_markers(panel, "cell_state", "kupffer")) == set(mac)
    assert population_markers(panel, "cell_type", "not_in_panel") == []
    with pytest.raises(ValueError, match="not cell_type or cell_state"):
        population_markers(panel, "tissue", "liver")


def test_signature_marker_overlap_finds_shared_genes(repo_root, panel):
    sigs = {"quiet": ["Lrat", "Dcn", "Ngfr"], "act": {"mouse": ["Acta2", "Il7r"], "human": []}}
    assert signature_marker_overlap(panel, sigs, "cell_type", "hsc", "quiet", "mouse") == ["Dcn"]
    # a state is selected by its parent's and its sibling states' markers too
    assert signature_marker_overlap(panel, sigs, "cell_state", "treg", "act", "mouse") == ["Il7r"]
    assert signature_marker_overlap(repo_root / PANEL, sigs, "cell_type", "hsc", "act",
                                    "human") == []
    with pytest.raises(ConfigError, match="'nope' is not in the signatures"):
        signature_marker_overlap(panel, sigs, "cell_type", "hsc", "nope", "mouse")


def shipped_config(repo_root) -> dict:
    """The shipped file paths of the three inputs of the overlap check."""
    return {"cluster": {"celltypes": str(repo_root / PANEL),
                        "annotation": {"signature_overlap": "error"}},
            "score": {"signatures": str(repo_root / "config" / "signatures.yaml")},
            "claims": {"catalogue": str(repo_root / "seeds" / "claims.yaml")}}


def test_shipped_panel_and_signatures_do_not_overlap_in_any_claim(repo_root):
    cfg = shipped_config(repo_root)
    assert check_signature_overlap(cfg, ["mouse", "human"]) == []
    shipped = yaml.safe_load((repo_root / "config" / "config.yaml").read_text())
    assert shipped["cluster"]["annotation"]["signature_overlap"] == "error"


def test_overlap_is_an_error_at_config_load_or_a_warning(repo_root, tmp_path, caplog):
    doc = yaml.safe_load((repo_root / PANEL).read_text())
    doc["cell_types"]["hsc"]["mouse"] += ["Lrat", "Rbp1"]  # both in hsc_quiescence
    bad = tmp_path / "celltypes.yaml"
    bad.write_text(yaml.safe_dump(doc))
    cfg = shipped_config(repo_root)
    cfg["cluster"]["celltypes"] = str(bad)
    with pytest.raises(ConfigError, match=r"claim 'hsc_quiescence_up' \(mouse\): signature "
                                          r"'hsc_quiescence' scored in cell_type 'hsc' shares "
                                          r"Lrat, Rbp1"):
        check_signature_overlap(cfg, ["mouse"])
    assert check_signature_overlap(cfg, ["human"]) == []  # only the mouse symbols were added
    cfg["cluster"]["annotation"]["signature_overlap"] = "warn"
    with caplog.at_level(logging.WARNING, logger="livermsc.annotate"):
        rows = check_signature_overlap(cfg, ["mouse"])
    assert {r["claim"] for r in rows} == {"hsc_quiescence_up", "ctl_injury_hsc_quiescence_down"}
    assert all(r["genes"] == ["Lrat", "Rbp1"] for r in rows)
    assert "hsc_quiescence_up" in caplog.text
    assert rows == claim_overlaps(bad, cfg["score"]["signatures"], cfg["claims"]["catalogue"],
                                  ["mouse"])


# --- real data --------------------------------------------------------------------------------------


def pca_leiden(a: ad.AnnData, seed: int = 0, n_pcs: int = 30, n_top_genes: int = 2000
               ) -> ad.AnnData:
    """Log-normalise, PCA (on the most variable genes of larger gene sets), kNN and Leiden at
    resolution 1 (``leiden_1``), with the cluster stage's Leiden settings; in place."""
    cfg = cluster_config()
    a.layers["counts"] = a.X.copy()
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    mask = None
    if a.n_vars > n_top_genes:
        sc.pp.highly_variable_genes(a, n_top_genes=n_top_genes, flavor="seurat")
        mask = "highly_variable"
    sc.pp.pca(a, n_comps=min(n_pcs, a.n_obs - 1, a.n_vars - 1), mask_var=mask,
              random_state=seed)
    sc.pp.neighbors(a, n_neighbors=cfg["n_neighbors"], use_rep="X_pca", random_state=seed)
    sc.tl.leiden(a, resolution=1.0, key_added="leiden_1", flavor=cfg["leiden_flavor"],
                 n_iterations=cfg["leiden_n_iterations"], directed=False, random_state=seed)
    return a


def read_tms(shared_data) -> ad.AnnData:
    a = ad.read_h5ad(shared_data / "liver_tabula_muris_senis_scDiffCom" /
                     "tms_liver_scDiffCom.h5ad")
    a.obs = a.obs.rename(columns={"cell_type": "published_type"})
    return a


def run_tms(shared_data, panel: Panel, seed: int = 0) -> ad.AnnData:
    """Cluster (PCA + Leiden) and annotate the TMS liver cells."""
    a = pca_leiden(read_tms(shared_data), seed)
    annotate(a, panel, cluster_config(resolutions=[1.0]), seed=seed)
    return a


def tms_once(shared_data, panel: Panel) -> ad.AnnData:
    if "tms" not in _CACHE:
        _CACHE["tms"] = run_tms(shared_data, panel)
    return _CACHE["tms"]


def tms_agreement(a: ad.AnnData, column: str = "cell_type") -> pd.Series:
    published = a.obs["published_type"].astype(str)
    ours = a.obs[column].astype(str)
    return pd.Series([o in TMS_TO_OURS[p] for p, o in zip(published, ours, strict=True)],
                     index=a.obs_names)


@pytest.mark.realdata
def test_tabula_muris_liver_agrees_with_published_types(shared_data, panel):
    a = tms_once(shared_data, panel)
    published = a.obs["published_type"].astype(str)
    ours = a.obs["cell_type"].astype(str)
    agree = tms_agreement(a)
    per_type = agree.groupby(published).mean()
    unassigned = float((ours == UNASSIGNED).mean())
    print("\nTabula Muris Senis liver: agreement with the published type\n", per_type.round(3),
          f"\noverall {agree.mean():.3f}; unassigned {unassigned:.3f}")
    print(pd.crosstab(published, ours))
    assert agree.mean() >= 0.95
    assert unassigned <= 0.03
    assert (per_type >= 0.85).all(), per_type
    # Clec4f is not among this dataset's 726 genes: no Kupffer/MoMac call is forced
    macs = ours == "macrophage"
    assert (a.obs.loc[macs, "cell_state"] == "macrophage").all()


@pytest.mark.realdata
def test_type_missing_from_the_panel_is_left_unassigned(shared_data, panel):
    """Without B-cell markers the B cells are not forced into another type."""
    a = tms_once(shared_data, panel).copy()
    no_b = Panel(panel.species, {k: t for k, t in panel.types.items() if k != "b_cell"})
    annotate(a, no_b, cluster_config(resolutions=[1.0]), seed=0)
    b_cells = a.obs["published_type"] == "B cell"
    called = a.obs.loc[b_cells, "cell_type"].astype(str)
    print("\nB cells without B-cell markers:", called.value_counts().to_dict())
    assert (called == UNASSIGNED).mean() >= 0.9
    others = tms_agreement(a)[~b_cells.to_numpy()]
    assert others.mean() >= 0.95


@pytest.mark.realdata
def test_same_config_and_seed_give_identical_results(shared_data, panel):
    first = tms_once(shared_data, panel)
    second = run_tms(shared_data, panel)
    for col in ("leiden_1", "annotation_cluster", "cell_type", "cell_state"):
        assert first.obs[col].astype(str).equals(second.obs[col].astype(str)), col
    np.testing.assert_array_equal(first.obs["cell_type_confidence"],
                                  second.obs["cell_type_confidence"])


@pytest.mark.realdata
def test_all_hepatocyte_study_is_called_hepatocyte(shared_data, panel):
    """Droin 2021: 18,378 real hepatocytes; 3,000 sampled (seeded) to keep the test short."""
    a = ad.read_h5ad(shared_data / "droin2021_liver_circadian" /
                     "droin2021_liver_hepatocytes_circadian.h5ad")
    rng = np.random.default_rng(0)
    a = a[np.sort(rng.choice(a.n_obs, 3000, replace=False))].copy()
    pca_leiden(a)
    table = annotate(a, panel, cluster_config(resolutions=[1.0]), seed=0)
    called = a.obs["cell_type"].astype(str).value_counts(normalize=True)
    print("\nDroin 2021 hepatocytes (3,000 of 18,378):", called.round(4).to_dict(),
          f"; {len(table)} clusters")
    assert called.get("hepatocyte", 0.0) >= 0.98
    assert set(called.index) <= {"hepatocyte", UNASSIGNED}  # no invented types
    assert len(table) >= 3  # several clusters, each called on its own


#: six blood immune types, canonical markers of the Seurat pbmc3k guided tutorial (Satija lab),
#: extended with common lineage genes; mouse symbols are our ortholog mapping
IMMUNE_PANEL = {"cell_types": {
    "t_cell": {"human": ["CD3D", "CD3E", "CD3G", "TRAC", "CD2", "LCK", "IL7R"],
               "mouse": ["Cd3d", "Cd3e", "Cd3g", "Trac", "Cd2", "Lck", "Il7r"]},
    "b_cell": {"human": ["MS4A1", "CD79A", "CD79B", "CD19", "TCL1A"],
               "mouse": ["Ms4a1", "Cd79a", "Cd79b", "Cd19", "Tcl1"]},
    "nk": {"human": ["GNLY", "NKG7", "PRF1", "GZMB", "KLRD1"],
           "mouse": ["Nkg7", "Prf1", "Gzmb", "Klrd1", "Ncr1"]},
    "cd14_monocyte": {"human": ["CD14", "LYZ", "S100A8", "S100A9", "FCN1"],
                      "mouse": ["Cd14", "Lyz2", "S100a8", "S100a9", "Fcnb"]},
    "fcgr3a_monocyte": {"human": ["FCGR3A", "MS4A7", "LST1", "IFITM3"],
                        "mouse": ["Fcgr3", "Ms4a7", "Lst1", "Ifitm3"]},
    "dendritic_cell": {"human": ["FCER1A", "CST3", "CD1C", "CLEC10A", "HLA-DQA1"],
                       "mouse": ["Fcer1a", "Cst3", "Cd209a", "Clec10a", "H2-Aa"]},
}}


def thin(x: sp.spmatrix, median_umis: float, rng: np.random.Generator) -> sp.csr_matrix:
    """Binomially down-sample integer counts so that the median cell has ``median_umis``."""
    x = sp.csr_matrix(x).astype(np.int64)
    p = median_umis / np.median(np.asarray(x.sum(axis=1)).ravel())
    out = x.copy()
    out.data = rng.binomial(out.data, min(p, 1.0))
    out.eliminate_zeros()
    return out.astype(np.float32)


@pytest.mark.realdata
def test_t_cells_at_low_depth_with_a_small_immune_panel(shared_data, tmp_path):
    """Real PBMCs (pbmc3k subset, 200 cells, 1,000 genes) thinned to ~1,300 UMIs per cell: the
    T cells, the largest population, keep their call (an absolute score threshold is what left
    them unassigned before)."""
    for spec in IMMUNE_PANEL["cell_types"].values():
        spec["source"] = "Seurat pbmc3k guided tutorial canonical markers; ours: lineage genes"
    (tmp_path / "immune.yaml").write_text(yaml.safe_dump(IMMUNE_PANEL))
    immune = load_panel(tmp_path / "immune.yaml", "human")
    raw = ad.read_h5ad(shared_data / "pbmc3k_partial_Dino" / "pbmcSmall_200cells_1000genes.h5ad")
    raw.var_names = raw.var["gene_symbol"].astype(str)
    raw.var_names_make_unique()
    cfg = cluster_config(resolutions=[1.0])
    full = pca_leiden(raw.copy(), n_pcs=20)
    annotate(full, immune, cfg, seed=0)
    low = raw.copy()
    low.X = thin(raw.X, 1300, np.random.default_rng(0))
    pca_leiden(low, n_pcs=20)
    table = annotate(low, immune, cfg, seed=0)
    t_full = full.obs["cell_type"].astype(str) == "t_cell"
    called = low.obs["cell_type"].astype(str)
    depth = float(np.median(np.asarray(low.layers["counts"].sum(axis=1)).ravel()))
    print(f"\nPBMC thinned to median {depth:.0f} UMIs:\n",
          pd.crosstab(full.obs["cell_type"], low.obs["cell_type"]))
    print(table[["cluster", "n_cells", "cell_type", "best_score", "marker_auc", "confidence"]])
    assert 1200 <= depth <= 1400
    assert full.obs["cell_type"].value_counts().index[0] == "t_cell"  # the largest population
    assert (called[t_full] == "t_cell").mean() >= 0.9
    assert (called[t_full] == UNASSIGNED).mean() <= 0.02
    assert (called == full.obs["cell_type"].astype(str)).mean() >= 0.9


# --- reference-based annotation (scANVI) ------------------------------------------------------------


def test_reference_input_errors(tmp_path):
    with pytest.raises(AnnotationInputError, match="reference file not found"):
        read_reference(tmp_path / "none.h5ad", "cell_type")
    a = ad.AnnData(np.ones((3, 2), dtype=np.float32),
                   obs=pd.DataFrame({"x": list("abc")}, index=["c1", "c2", "c3"]),
                   var=pd.DataFrame(index=["g1", "g2"]))
    a.write_h5ad(tmp_path / "ref.h5ad")
    with pytest.raises(AnnotationInputError, match=r"obs has no column 'label'"):
        read_reference(tmp_path / "ref.h5ad", "label")
    (tmp_path / "junk.h5ad").write_text("not hdf5")
    with pytest.raises(AnnotationInputError, match="not a readable h5ad"):
        read_reference(tmp_path / "junk.h5ad", "x")


#: published TMS labels renamed to the panel's types (T cells stay one label here)
TMS_AS_PANEL = {"hepatocyte": "hepatocyte", "endothelial cell of hepatic sinusoid": "lsec",
                "B cell": "b_cell", "T cell": "t_cell", "myeloid leukocyte": "myeloid"}


@pytest.mark.realdata
def test_reference_labels_transfer_between_plates(shared_data, panel, tmp_path):
    """TMS liver split by plate (half the plates of each age group as reference, seeded):
    scANVI transfers the published labels to the other plates (few epochs: CPU test)."""
    a = read_tms(shared_data)
    rng = np.random.default_rng(0)
    ref_plates = []
    for _, plates in a.obs.groupby("age_group", observed=True)["plate"]:
        names = sorted(plates.astype(str).unique())
        ref_plates += list(rng.choice(names, len(names) // 2, replace=False))
    is_ref = a.obs["plate"].astype(str).isin(ref_plates).to_numpy()
    ref = a[is_ref].copy()
    ref.obs["label"] = ref.obs["published_type"].map(TMS_AS_PANEL).astype(str)
    ref.write_h5ad(tmp_path / "reference.h5ad")
    query = pca_leiden(a[~is_ref].copy())
    cfg = cluster_config(resolutions=[1.0], annotation={"reference": {
        "path": str(tmp_path / "reference.h5ad"), "label_key": "label", "batch_key": "plate",
        "query_batch_key": "plate", "min_shared_genes": 100, "scvi_epochs": 20,
        "scanvi_epochs": 10, "batch_size": 32, "accelerator": "cpu"}})
    ref_cfg = cfg["annotation"]["reference"]
    reference = read_reference(ref_cfg["path"], ref_cfg["label_key"])
    annotate(query, panel, cfg, seed=0, threads=1,
             transfer=lambda a: transfer_labels(a, reference, ref_cfg, 0, 1, "cpu"))
    truth = query.obs["published_type"].map(TMS_AS_PANEL).astype(str)
    called = query.obs["cell_type"].astype(str)
    agree = float((called == truth).mean())
    print(f"\nscANVI, {is_ref.sum()} reference / {query.n_obs} query cells: agreement "
          f"{agree:.3f}, unassigned {(called == UNASSIGNED).mean():.3f}\n",
          pd.crosstab(truth, called))
    assert agree >= 0.9
    conf = query.obs["cell_type_confidence"]
    assert conf.between(0, 1).all()
    assert (conf[called == UNASSIGNED] < 0.5).all() and (conf[called != UNASSIGNED] >= 0.5).all()
    assert "cell_type_panel" in query.obs and "reference_prediction" in query.obs
    assert query.uns["annotation"]["reference"]["label_key"] == "label"
    query.write_h5ad(tmp_path / "annotated.h5ad")  # what the rule writes
    back = ad.read_h5ad(tmp_path / "annotated.h5ad")
    assert back.obs["cell_type"].astype(str).equals(called)

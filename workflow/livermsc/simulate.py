"""Simulate a mouse (or human) liver scRNA-seq study with planted, documented truth.

The model, per sample (one animal each):

* cell-type composition: a baseline share per cell type, perturbed per animal on the logit scale,
  optionally scaled per arm (``population_scale``: e.g. 15 stellate cells per sample in one arm
  and 200 in another); states within a type (Kupffer vs monocyte-derived macrophages, Tregs vs
  conventional CD4 T cells) are shares of their parent type (baselines overridable with
  ``state_baseline``) and can carry planted effects (``kind: share``);
* expression: per cell type, log-weights over genes (background genes, real marker genes,
  signature genes, mitochondrial, ribosomal and haemoglobin genes), plus an animal effect per
  gene (SD ``animal_sd``, scaled per arm by ``arm_sd``) made of a component shared by the genes
  of each signature (correlation ``programme_correlation``) and a per-gene part, a technical
  batch effect per batch and gene (SD ``batch_sd``) and the planted programme effects
  (``kind: program``): every gene of a signature is shifted, in one population, by
  ``size`` x the between-animal SD of the signature's mean log expression
  (``animal_sd * sqrt(rho + (1 - rho) / k)`` for ``k`` genes at correlation ``rho``);
* optional traps: signature genes held at a fixed mean of UMIs per cell in their home
  population (``signature_umi``), a non-signature programme taking a share of a population's
  UMIs in one arm (``background_programme``, a composition shift) and batch equal to arm
  (``batch_by_arm``);
* counts: negative binomial (gamma-Poisson) around library size x gene weights, with log-normal
  library sizes per cell type;
* low-quality cells (small libraries, high mitochondrial share) and heterotypic/homotypic
  doublets (two cells' counts summed), flagged in the truth table.

Programme effect sizes are therefore in units of the between-animal SD of the signature score
(score-level SD); share effects in between-animal SDs of the logit share (``share_sd``).
Arms form a tree (``arms: {arm: parent}``); an effect's contrast is ``[arm, parent]`` and an arm
inherits its parent's levels, so ``injury_msc`` carries the injury effects plus its own. The
traps (``population_scale``, ``arm_sd``, ``background_programme``) act on the arm named only.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.io
import scipy.sparse as sp
import yaml

from livermsc.schema import validate

# --- cell types, states and their markers (real mouse symbols) ---------------------------------

#: cell_type -> (baseline share, log mean library size, marker genes)
CELL_TYPES: dict[str, tuple[float, float, list[str]]] = {
    "hepatocyte": (0.18, 8.6, ["Alb", "Apoa1", "Apoc3", "Ttr", "Cyp2e1", "Cyp2f2", "Ass1", "Arg1",
                               "Serpina1a", "Fabp1", "Hamp", "Otc", "Hgd", "Pck1", "Acaa1b"]),
    "lsec": (0.14, 7.8, ["Stab2", "Clec4g", "Fcgr2b", "Lyve1", "Ptprb", "Dnase1l3", "Gpr182",
                         "Cdh5", "Oit3", "Bmp2"]),
    "hsc": (0.08, 7.9, ["Dcn", "Colec11", "Ecm1", "Des", "Rgs5", "Pth1r", "Ifitm1", "Cxcl12"]),
    "macrophage": (0.10, 7.8, ["Cd68", "Adgre1", "Csf1r", "Lyz2", "C1qa", "C1qb", "C1qc",
                               "Fcgr1", "Mafb"]),
    "cholangiocyte": (0.04, 7.6, ["Krt19", "Epcam", "Krt7", "Sox9", "Cldn4", "Tff2", "Cftr",
                                  "Onecut1"]),
    "cd4_t": (0.10, 7.3, ["Cd3e", "Cd3d", "Cd3g", "Cd4", "Trac", "Cd28", "Lck", "Cd5"]),
    "cd8_t": (0.07, 7.3, ["Cd3e", "Cd3d", "Cd3g", "Cd8a", "Cd8b1", "Trac", "Lck", "Gzmk"]),
    "b_cell": (0.09, 7.3, ["Cd79a", "Cd79b", "Ms4a1", "Cd19", "Ighd", "Ebf1", "Pax5", "Fcmr"]),
    "plasma_cell": (0.02, 8.0, ["Jchain", "Mzb1", "Xbp1", "Sdc1", "Igkc", "Prdm1", "Ighm"]),
    "nk": (0.06, 7.3, ["Nkg7", "Gzma", "Klrb1c", "Ncr1", "Klrd1", "Prf1", "Klre1"]),
    "neutrophil": (0.06, 7.0, ["S100a8", "S100a9", "Retnlg", "Csf3r", "Cxcr2", "Ly6g", "Ngp",
                               "Camp"]),
    "dendritic_cell": (0.04, 7.6, ["Xcr1", "Clec9a", "Flt3", "Itgax", "H2-Ab1", "H2-Aa", "Cd74",
                                   "Naaa"]),
}

#: cell_state -> (parent cell_type, baseline share within the parent, extra marker genes)
CELL_STATES: dict[str, tuple[str, float, list[str]]] = {
    "kupffer": ("macrophage", 0.7, ["Clec4f", "Vsig4", "Cd5l", "Marco", "Timd4", "Folr2"]),
    "momac": ("macrophage", 0.3, ["Ccr2", "Ly6c2", "Cx3cr1", "Ms4a7", "F13a1", "Ms4a4c"]),
    "treg": ("cd4_t", 0.10, ["Foxp3", "Il2ra", "Ctla4", "Ikzf2", "Tnfrsf18"]),
    "cd4_tconv": ("cd4_t", 0.90, ["Il7r", "Cd40lg", "Tcf7"]),
}

MITO_GENES = ["mt-Nd1", "mt-Nd2", "mt-Co1", "mt-Co2", "mt-Atp8", "mt-Atp6", "mt-Co3", "mt-Nd3",
              "mt-Nd4l", "mt-Nd4", "mt-Nd5", "mt-Nd6", "mt-Cytb"]
RIBO_GENES = [f"Rpl{i}" for i in (3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 18, 19, 23, 24,
                                   27, 28, 29, 30, 31, 32, 34, 35, 36, 37, 38, 39, 41)] + \
             [f"Rps{i}" for i in (2, 3, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19,
                                   20, 21, 23, 24, 25, 26, 27, 28, 29)]
HB_GENES = ["Hba-a1", "Hba-a2", "Hbb-bs", "Hbb-bt"]
HOUSEKEEPING = ["Actb", "Gapdh", "B2m", "Malat1", "Tmsb4x", "Ftl1", "Fth1", "Eef1a1", "Tpt1",
                "Ppia", "Cfl1", "Pfn1", "Myl6", "Uba52", "Ubb"]

#: where each signature has a baseline expression (population -> log-weight above background)
SIGNATURE_HOMES: dict[str, dict[str, float]] = {
    "hsc_activation": {"hsc": 2.0},
    "hsc_quiescence": {"hsc": 3.0},
    "m1_macrophage": {"macrophage": 1.5},
    "m2_macrophage": {"macrophage": 1.5},
    "treg_identity": {"treg": 3.0},
    "hepatocyte_proliferation": {"hepatocyte": 0.5},
    "dc_maturation": {"dendritic_cell": 2.0},
    "angiogenesis": {"lsec": 2.5},
}


@dataclass(frozen=True)
class Effect:
    """One planted effect (or planted null, size 0)."""

    id: str
    kind: str  # "program" or "share"
    population: str  # cell_type or cell_state the effect acts in
    contrast: tuple[str, str]  # (arm, reference arm = its parent)
    size: float  # in score-level (programme) or logit-share (share) between-animal SDs
    program: str | None = None  # signature id for kind=program

    def as_dict(self) -> dict[str, Any]:
        d = {"id": self.id, "kind": self.kind, "population": self.population,
             "contrast": list(self.contrast), "size": float(self.size)}
        if self.program:
            d["program"] = self.program
        return d


def _to_species(symbols: list[str], species: str) -> list[str]:
    return [s.upper() for s in symbols] if species == "human" else list(symbols)


def validated(params: dict | None) -> dict:
    """Simulation parameters checked against simulate.schema.yaml, with its defaults filled."""
    return validate(dict(params or {}), "simulate", "simulate parameters")


def design(params: dict, species: str = "mouse") -> pd.DataFrame:
    """The sample sheet of a simulated study: one animal per sample, batches alternating within
    each arm (or one batch per arm with ``batch_by_arm``)."""
    params = validated(params)
    rows = []
    n_batches = int(params["n_batches"])
    by_arm = bool(params["batch_by_arm"])
    for arm in params["arms"]:
        for i in range(int(params["animals_per_arm"])):
            sample = f"{arm}_{i + 1}"
            batch = f"batch_{arm}" if by_arm else f"batch{(i % n_batches) + 1}"
            rows.append({"sample": sample, "arm": arm, "animal": sample, "batch": batch,
                         "path": sample, "format": "10x_mtx", "species": species})
    return pd.DataFrame(rows)


def parse_effects(params: dict) -> list[Effect]:
    """Read and check the planted effects of a simulation config."""
    params = validated(params)
    arms: dict[str, str | None] = params["arms"]
    populations = set(CELL_TYPES) | set(CELL_STATES)
    effects = []
    for spec in params["effects"]:
        eff = Effect(id=spec["id"], kind=spec["kind"], population=spec["population"],
                     contrast=tuple(spec["contrast"]), size=float(spec["size"]),
                     program=spec.get("program"))
        arm, ref = eff.contrast
        if arm not in arms or arms[arm] != ref:
            raise ValueError(f"effect {eff.id}: contrast must be [arm, parent arm], got {eff.contrast}")
        if eff.population not in populations:
            raise ValueError(f"effect {eff.id}: unknown population {eff.population!r}")
        if eff.kind == "share" and eff.population not in CELL_STATES:
            raise ValueError(f"effect {eff.id}: share effects act on a cell state {sorted(CELL_STATES)}")
        if eff.kind == "program" and not eff.program:
            raise ValueError(f"effect {eff.id}: program effects need 'program' (a signature id)")
        effects.append(eff)
    _check_traps(params, populations)
    return effects


def _check_traps(params: dict, populations: set[str]) -> None:
    """Check that the trap settings name known arms, cell types and cell states."""
    arms = set(params["arms"])
    for field in ("arm_sd", "population_scale"):
        for arm in params.get(field, {}) or {}:
            if arm not in arms:
                raise ValueError(f"{field}: unknown arm {arm!r} (arms: {sorted(arms)})")
    for arm, scales in (params.get("population_scale") or {}).items():
        for pop in scales:
            if pop not in CELL_TYPES:
                raise ValueError(f"population_scale.{arm}: {pop!r} is not a cell type "
                                 f"{sorted(CELL_TYPES)}")
    for state, share in (params.get("state_baseline") or {}).items():
        if state not in CELL_STATES:
            raise ValueError(f"state_baseline: {state!r} is not a cell state {sorted(CELL_STATES)}")
        if not 0 < float(share) < 1:
            raise ValueError(f"state_baseline.{state}: {share} (expected: between 0 and 1)")
    for spec in params.get("background_programme") or []:
        if spec["arm"] not in arms:
            raise ValueError(f"background_programme: unknown arm {spec['arm']!r}")
        if spec["population"] not in populations:
            raise ValueError(f"background_programme: unknown population {spec['population']!r}")


def arm_levels(arms: dict[str, str | None], effects: list[Effect]) -> dict[str, dict[str, float]]:
    """Cumulative effect per arm and effect id, following the arm tree from its root."""
    levels: dict[str, dict[str, float]] = {}

    def level(arm: str) -> dict[str, float]:
        if arm not in levels:
            parent = arms[arm]
            base = dict(level(parent)) if parent else {e.id: 0.0 for e in effects}
            for e in effects:
                if e.contrast[0] == arm:
                    base[e.id] += e.size
            levels[arm] = base
        return levels[arm]

    for arm in arms:
        level(arm)
    return levels


class _Genome:
    """Gene universe and per-population baseline log-weights."""

    def __init__(self, signatures: dict[str, list[str]], n_background: int,
                 rng: np.random.Generator, params: dict | None = None) -> None:
        params = validated(params)
        named: list[str] = []
        for _, _, markers in CELL_TYPES.values():
            named += markers
        for _, _, markers in CELL_STATES.values():
            named += markers
        for genes in signatures.values():
            named += genes
        named += HOUSEKEEPING + MITO_GENES + RIBO_GENES + HB_GENES
        named = list(dict.fromkeys(named))
        background = [f"Gm{10000 + i}" for i in range(n_background)]
        self.genes = named + background
        self.index = {g: i for i, g in enumerate(self.genes)}
        n = len(self.genes)
        self.base = rng.normal(-1.0, 1.2, size=n)
        # named genes are silent unless a population expresses them
        for g in named:
            self.base[self.index[g]] = -4.0
        for g in HOUSEKEEPING:
            self.base[self.index[g]] = 3.0
        for g in RIBO_GENES:
            self.base[self.index[g]] = 2.2
        self.populations = list(CELL_TYPES) + list(CELL_STATES)
        self.weights: dict[str, np.ndarray] = {}
        for ct in CELL_TYPES:
            w = self.base.copy()
            # each type also differs on 10% of background genes
            bg = np.arange(len(named), n)
            pick = rng.choice(bg, size=len(bg) // 10, replace=False)
            w[pick] += rng.normal(0, 1.0, size=pick.size)
            for g in CELL_TYPES[ct][2]:
                w[self.index[g]] = rng.normal(4.0, 0.5)
            self.weights[ct] = w
        self.mito = np.array([self.index[g] for g in MITO_GENES])
        self.hb = np.array([self.index[g] for g in HB_GENES])
        self.signatures = {k: np.array([self.index[g] for g in v]) for k, v in signatures.items()}
        self.homes = {k: dict(v) for k, v in SIGNATURE_HOMES.items()}
        for sig, homes in (params.get("signature_homes") or {}).items():
            self.homes.setdefault(sig, {}).update(homes)
        self.signature_umi = {k: tuple(v) for k, v in (params.get("signature_umi") or {}).items()}
        self.rho = float(params["programme_correlation"])
        # non-signature genes that a background programme can take over (first background genes)
        self.background = np.arange(len(named), n)
        # each gene's signatures, for the shared animal component
        member: dict[int, list[str]] = {}
        for sig, idx in self.signatures.items():
            for i in idx:
                member.setdefault(int(i), []).append(sig)
        self.membership = member
        self._profiles: dict[tuple[str, str | None], np.ndarray] = {}

    def score_sd(self, signature: str, animal_sd: float) -> float:
        """Between-animal SD of the mean log expression of a signature's genes."""
        k = max(len(self.signatures.get(signature, ())), 1)
        return float(animal_sd * np.sqrt(self.rho + (1 - self.rho) / k))

    def animal_effect(self, animal_sd: float, rng: np.random.Generator) -> np.ndarray:
        """One animal's log-shift per gene: a component shared by each signature's genes
        (correlation ``rho``) plus a per-gene part; every gene's SD is ``animal_sd``."""
        n = len(self.genes)
        rho = self.rho
        shared = {sig: rng.normal() for sig in self.signatures} if rho > 0 else {}
        out = rng.normal(0, 1, n)
        if rho > 0:
            out[list(self.membership)] *= np.sqrt(1 - rho)
            for i, sigs in self.membership.items():
                out[i] += np.sqrt(rho) * sum(shared[s] for s in sigs) / np.sqrt(len(sigs))
        return animal_sd * out

    def profile(self, cell_type: str, state: str | None) -> np.ndarray:
        """Baseline log-weights of one population (a cell type, refined by its state)."""
        key = (cell_type, state)
        if key in self._profiles:
            return self._profiles[key].copy()
        w = self.weights[cell_type].copy()
        fixed: dict[int, float] = {}  # gene -> target share of the population's UMIs
        lib = float(np.exp(CELL_TYPES[cell_type][1]))
        for sig, homes in self.homes.items():
            if sig not in self.signatures:
                continue
            for pop, lift in homes.items():
                if pop in (cell_type, state):
                    idx = self.signatures[sig]
                    w[idx] = np.maximum(w[idx], lift)
                    if sig in self.signature_umi:
                        lo, hi = self.signature_umi[sig]
                        for i, umi in zip(idx, np.geomspace(lo, hi, idx.size), strict=True):
                            fixed[int(i)] = umi / lib
        if state is not None:
            for g in CELL_STATES[state][2]:
                w[self.index[g]] = 3.5
        # mitochondrial share ~6% (hepatocytes ~9%), as in liver 10x data
        w[self.mito] = 3.3 if cell_type == "hepatocyte" else 2.8
        if fixed:
            # signature genes at a fixed mean UMI per cell: set their weights against the rest
            idx = np.array(list(fixed))
            target = np.array(list(fixed.values()))
            rest = np.ones(w.size, bool)
            rest[idx] = False
            z = np.exp(w[rest] - w.max()).sum()
            w[idx] = np.log(target * z / (1 - target.sum())) + w.max()
        self._profiles[key] = w
        return w.copy()


def _load_signatures(path: str | Path) -> dict[str, list[str]]:
    """Mouse symbols of every signature (the simulator works in mouse symbols)."""
    with open(path) as fh:
        doc = yaml.safe_load(fh)
    return {k: list(v["mouse"]) for k, v in doc["signatures"].items()}


def _barcodes(n: int, rng: np.random.Generator) -> list[str]:
    seen: set[str] = set()
    out = []
    letters = np.array(list("ACGT"))
    while len(out) < n:
        bc = "".join(rng.choice(letters, 16)) + "-1"
        if bc not in seen:
            seen.add(bc)
            out.append(bc)
    return out


def _nb(mean: np.ndarray, theta: float, rng: np.random.Generator) -> np.ndarray:
    lam = mean * rng.gamma(theta, 1.0 / theta, size=mean.shape)
    return rng.poisson(lam)


def _state_baseline(params: dict, first: str, second: str) -> float:
    """Baseline share of the first state of a parent type (``state_baseline`` overrides)."""
    base = params.get("state_baseline") or {}
    if first in base:
        return float(base[first])
    if second in base:
        return 1.0 - float(base[second])
    return CELL_STATES[first][1]


def _take_over(p: np.ndarray, genes: np.ndarray, share: float) -> np.ndarray:
    """Rescale a probability vector so that ``genes`` take ``share`` of it (in place)."""
    cur = p[genes].sum()
    rest = np.ones(p.size, bool)
    rest[genes] = False
    p[genes] *= share / cur
    p[rest] *= (1 - share) / (1 - cur)
    return p


def simulate_sample(genome: _Genome, params: dict, arm_level: dict[str, float],
                    effects: list[Effect], animal_gene: np.ndarray, batch_gene: np.ndarray,
                    batch_lib: float, n_cells: int, rng: np.random.Generator, arm: str = ""
                    ) -> tuple[sp.csr_matrix, pd.DataFrame]:
    """Counts and truth of one sample (cells x genes) of arm ``arm``."""
    animal_sd = float(params["animal_sd"])
    # composition: per-animal logit noise around the baseline shares (scaled per arm)
    scale = (params.get("population_scale") or {}).get(arm, {})
    shares = np.array([CELL_TYPES[ct][0] * float(scale.get(ct, 1.0)) for ct in CELL_TYPES])
    logits = np.log(shares) + rng.normal(0, params["composition_sd"], size=shares.size)
    comp = np.exp(logits) / np.exp(logits).sum()
    counts_per_type = rng.multinomial(n_cells, comp)
    bursts = [b for b in params.get("background_programme") or [] if b["arm"] == arm]
    state_logit: dict[str, float] = {}
    for parent in dict.fromkeys(p for p, _, _ in CELL_STATES.values()):
        states = [s for s, (p, _, _) in CELL_STATES.items() if p == parent]
        first = states[0]
        p0 = _state_baseline(params, states[0], states[1])
        lg = np.log(p0 / (1 - p0)) + rng.normal(0, params["share_sd"])
        for e in effects:
            if e.kind == "share" and e.population in states:
                sign = 1.0 if e.population == first else -1.0
                lg += sign * arm_level[e.id] * params["share_sd"]
        state_logit[first] = lg
    blocks, truth = [], []
    for ct, n_ct in zip(CELL_TYPES, counts_per_type, strict=True):
        if n_ct == 0:
            continue
        states = [s for s, (p, _, _) in CELL_STATES.items() if p == ct]
        if states:
            p_first = 1 / (1 + np.exp(-state_logit[states[0]]))
            labels = np.where(rng.random(n_ct) < p_first, states[0], states[1])
        else:
            labels = np.array([ct] * n_ct)
        for state in np.unique(labels):
            n = int((labels == state).sum())
            st = state if state in CELL_STATES else None
            w = genome.profile(ct, st) + animal_gene + batch_gene
            for e in effects:
                if e.kind == "program" and e.population in (ct, st) and e.program in genome.signatures:
                    w[genome.signatures[e.program]] += (arm_level[e.id]
                                                        * genome.score_sd(e.program, animal_sd))
            p = np.exp(w - w.max())
            p /= p.sum()
            for b in bursts:
                if b["population"] in (ct, st):
                    _take_over(p, genome.background[:int(b["n_genes"])],
                               float(b["share"]))
            lib = np.exp(rng.normal(CELL_TYPES[ct][1], 0.3, size=n)) * batch_lib
            counts = _nb(lib[:, None] * p[None, :], params["theta"], rng)
            blocks.append(sp.csr_matrix(counts.astype(np.int32)))
            truth.append(pd.DataFrame({"cell_type": ct, "cell_state": state}, index=range(n)))
    X = sp.vstack(blocks).tocsr()
    obs = pd.concat(truth, ignore_index=True)
    obs["is_doublet"] = False
    obs["is_low_quality"] = False
    # low-quality cells: damaged, small libraries with a high mitochondrial share
    n_lq = round(params["low_quality_rate"] * X.shape[0])
    lq = rng.choice(X.shape[0], size=n_lq, replace=False)
    damaged = rng.binomial(X[lq].toarray().astype(np.int64), 0.15)
    mt_total = np.maximum((damaged.sum(axis=1) * rng.uniform(0.6, 1.5, size=n_lq)).astype(int), 20)
    damaged[:, genome.mito] += np.stack(
        [rng.multinomial(t, np.full(genome.mito.size, 1 / genome.mito.size)) for t in mt_total]
    ) if n_lq else damaged[:, genome.mito]
    X = X.tolil()
    X[lq] = damaged.astype(np.int32)
    X = X.tocsr()
    obs.loc[lq, "is_low_quality"] = True
    # doublets: sum two cells (excluding low-quality ones)
    n_db = round(params["doublet_rate"] * X.shape[0])
    good = np.setdiff1d(np.arange(X.shape[0]), lq)
    pairs = rng.choice(good, size=(n_db, 2), replace=False)
    db_rows = X[pairs[:, 0]] + X[pairs[:, 1]]
    db_obs = pd.DataFrame({
        "cell_type": obs["cell_type"].to_numpy()[pairs[:, 0]],
        "cell_state": obs["cell_state"].to_numpy()[pairs[:, 0]],
        "is_doublet": True, "is_low_quality": False,
        "doublet_of": [f"{obs['cell_state'].iat[a]}+{obs['cell_state'].iat[b]}" for a, b in pairs],
    })
    drop = np.zeros(X.shape[0], bool)
    drop[pairs.ravel()] = True  # the two source cells become the doublet
    X = sp.vstack([X[~drop], db_rows]).tocsr()
    obs = pd.concat([obs[~drop], db_obs], ignore_index=True)
    obs["doublet_of"] = obs["doublet_of"].fillna("")
    order = rng.permutation(X.shape[0])
    return X[order], obs.iloc[order].reset_index(drop=True)


def write_10x_mtx(X: sp.csr_matrix, genes: list[str], barcodes: list[str], outdir: Path) -> None:
    """Write a cells x genes matrix as a 10x v3 folder (genes x cells matrix.mtx.gz etc.)."""
    outdir.mkdir(parents=True, exist_ok=True)
    with gzip.open(outdir / "matrix.mtx.gz", "wb", compresslevel=3) as fh:
        scipy.io.mmwrite(fh, X.T.tocoo(), field="integer")
    ids = [f"SIMG{i:08d}" for i in range(len(genes))]
    pd.DataFrame({"id": ids, "symbol": genes, "type": "Gene Expression"}).to_csv(
        outdir / "features.tsv.gz", sep="\t", header=False, index=False)
    pd.Series(barcodes).to_csv(outdir / "barcodes.tsv.gz", sep="\t", header=False, index=False)


@dataclass(frozen=True)
class SimulatedSample:
    """One simulated sample: its sample-sheet row, counts (cells x genes) and per-cell truth."""

    row: Any  # a row of :func:`design` (sample, arm, animal, batch, path, ...)
    X: sp.csr_matrix
    obs: pd.DataFrame
    barcodes: list[str]


def iter_samples(params: dict, signatures: dict[str, list[str]], seed: int = 0,
                 species: str = "mouse") -> tuple[list[str], list[Effect], dict, Any]:
    """Set up a simulated study; return (gene symbols, effects, arm levels, sample generator).

    The generator yields one :class:`SimulatedSample` per row of :func:`design`. Writing to disk
    (:func:`simulate_study`) and simulating in memory both go through here, so the same
    parameters, signatures and seed give the same counts either way.
    """
    params = validated(params)
    rng = np.random.default_rng(seed)
    genome = _Genome(signatures, int(params["n_background_genes"]), rng, params)
    effects = parse_effects(params)
    levels = arm_levels(params["arms"], effects)
    sheet = design(params, species)
    n_genes = len(genome.genes)
    batches = sorted(sheet["batch"].unique())
    batch_gene = {b: rng.normal(0, params["batch_sd"], n_genes) for b in batches}
    batch_lib = {b: float(np.exp(rng.normal(0, 0.15))) for b in batches}
    per_sample = int(params["n_cells"]) // len(sheet)

    arm_sd = params.get("arm_sd") or {}

    def samples():
        for row in sheet.itertuples():
            sd = float(params["animal_sd"]) * float(arm_sd.get(row.arm, 1.0))
            animal_gene = genome.animal_effect(sd, rng)
            n = int(rng.integers(int(per_sample * 0.8), int(per_sample * 1.2)))
            X, obs = simulate_sample(genome, params, levels[row.arm], effects, animal_gene,
                                     batch_gene[row.batch], batch_lib[row.batch], n, rng,
                                     arm=row.arm)
            yield SimulatedSample(row, X, obs, _barcodes(X.shape[0], rng))

    return _to_species(genome.genes, species), effects, levels, samples()


def _genome_score_sd(params: dict, signatures: dict[str, list[str]], signature: str) -> float:
    """Score-level SD of a signature (the unit of its programme effects)."""
    k = max(len(signatures[signature]), 1)
    rho = float(params["programme_correlation"])
    return float(params["animal_sd"] * np.sqrt(rho + (1 - rho) / k))


def simulate_study(params: dict, species: str, signatures_path: str | Path, outdir: str | Path,
                   seed: int = 0) -> dict[str, Any]:
    """Simulate a whole study into ``outdir``; return the truth (also written to truth.yaml).

    Writes ``<sample>/`` 10x folders, ``samples.tsv``, ``cells.tsv.gz`` (per-cell truth) and
    ``truth.yaml`` (design, planted effects and the arm levels they imply).
    """
    params = validated(params)
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    signatures = _load_signatures(signatures_path)
    symbols, effects, levels, samples = iter_samples(params, signatures, seed, species)
    sheet = design(params, species)
    truth_tables = []
    for s in samples:
        row, obs, barcodes = s.row, s.obs, s.barcodes
        write_10x_mtx(s.X, symbols, barcodes, outdir / row.path)
        obs.insert(0, "barcode", barcodes)
        obs.insert(1, "sample", row.sample)
        obs.insert(2, "arm", row.arm)
        truth_tables.append(obs)
    cells = pd.concat(truth_tables, ignore_index=True)
    cells.to_csv(outdir / "cells.tsv.gz", sep="\t", index=False)
    sheet.to_csv(outdir / "samples.tsv", sep="\t", index=False)
    truth = {
        "seed": seed,
        "species": species,
        "effect_unit": "between-animal SD of the signature's mean log expression in the "
                       "population (program); of the logit share (share)",
        "score_sd": {sig: _genome_score_sd(params, signatures, sig) for sig in signatures},
        "params": {k: v for k, v in params.items() if k != "effects"},
        "effects": [e.as_dict() for e in effects],
        "arm_levels": levels,
        "signature_genes": signatures,
        "n_cells": len(cells),
        "n_doublets": int(cells["is_doublet"].sum()),
        "n_low_quality": int(cells["is_low_quality"].sum()),
    }
    with open(outdir / "truth.yaml", "w") as fh:
        yaml.safe_dump(truth, fh, sort_keys=False)
    return truth


def rule_simulate_study(smk: Any) -> None:
    """Rule ``simulate_study``: write the simulated study into ``output.data``."""
    spec = smk.params.spec
    simulate_study(spec["simulate"], spec["species"], smk.input.signatures, smk.output.data,
                   seed=int(smk.params.seed))

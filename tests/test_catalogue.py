"""The claims catalogue (seeds/claims.yaml) and the signature library (config/signatures.yaml)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from conftest import PLANTED_SIGNATURES
from livermsc.config import ConfigError, load_yaml, validate
from livermsc.simulate import CELL_STATES, CELL_TYPES

REPO = Path(__file__).resolve().parents[1]
CLAIMS = REPO / "seeds" / "claims.yaml"
SIGNATURES = REPO / "config" / "signatures.yaml"
DEMO = REPO / "config" / "studies" / "demo.yaml"
SEEDS_DIR = REPO.parent / "shared" / "seeds"

#: the shortest run of consecutive words that counts as copied from a seed article
COPY_RUN = 8


@pytest.fixture(scope="module")
def claims() -> list[dict]:
    """The validated catalogue (schema defaults filled in)."""
    return validate(load_yaml(CLAIMS), "claims", CLAIMS)["claims"]


@pytest.fixture(scope="module")
def signatures() -> dict[str, dict]:
    """The validated signature library."""
    return validate(load_yaml(SIGNATURES), "signatures", SIGNATURES)["signatures"]


@pytest.fixture(scope="module")
def seed_texts() -> dict[str, str]:
    """Seed article texts by file name (skips where the shared corpus is absent)."""
    if not SEEDS_DIR.is_dir():
        pytest.skip(f"seed articles not found at {SEEDS_DIR}")
    return {p.name: p.read_text(encoding="utf-8", errors="replace") for p in sorted(SEEDS_DIR.glob("*.txt"))}


def words(text: str) -> list[str]:
    """Lower-case word tokens (letters and digits, any script), punctuation dropped."""
    return re.findall(r"[^\W_]+", text.lower())


def ngrams(tokens: list[str], n: int) -> set[tuple[str, ...]]:
    """All runs of ``n`` consecutive tokens."""
    return {tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


def copied_runs(text: str, corpus: dict[str, str], n: int = COPY_RUN) -> list[tuple[str, str]]:
    """(seed file, run of n words) for every run of ``text`` that also occurs in a corpus text."""
    mine = ngrams(words(text), n)
    hits = []
    for name, seed in corpus.items():
        for run in sorted(mine & ngrams(words(seed), n)):
            hits.append((name, " ".join(run)))
    return hits


# --- schema and identifiers --------------------------------------------------------------------

def test_catalogue_validates_and_ids_unique(claims):
    ids = [c["id"] for c in claims]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    assert not dup, f"duplicated claim ids: {dup}"
    kinds = {c["kind"] for c in claims}
    assert kinds == {"claim", "control"}


def test_catalogue_keeps_its_claims_and_controls(claims):
    kinds = [c["kind"] for c in claims]
    assert kinds.count("claim") == 31 and kinds.count("control") == 5


def test_difference_claims_are_single_contrasts(claims):
    by_id = {c["id"]: c for c in claims}
    for cid in ("stage_hsc_activation_down", "stage_macrophage_inflammation_down"):
        types = {k["type"] for k in by_id[cid]["contrasts"]}
        assert types == {"interaction"}, cid
        assert all(k["levels"] == ["early", "advanced"] for k in by_id[cid]["contrasts"])
    for cid in ("synergy_hepatocyte_proliferation_up", "synergy_hsc_activation_down",
                "synergy_macrophage_inflammation_down"):
        syn = [k for k in by_id[cid]["contrasts"] if k["type"] == "synergy"]
        assert len(syn) == 1 and syn[0]["arm"] == "injury_msc_ev", cid
        assert syn[0]["reference"] == "injury"
        assert sorted(syn[0]["components"]) == ["injury_ev", "injury_msc"]
    ev = by_id["ev_vs_msc_hsc_activation_down"]["contrasts"]
    assert ev == [{"type": "simple", "arm": "injury_ev", "reference": "injury_msc"}]


def test_schema_rejects_incomplete_difference_contrasts():
    doc = load_yaml(CLAIMS)
    doc["claims"][0]["contrasts"] = [{"type": "interaction", "arm": "injury", "reference": "healthy"}]
    with pytest.raises(ConfigError, match=r"claims\[0\]\.contrasts\[0\]"):
        validate(doc, "claims", CLAIMS)
    doc["claims"][0]["contrasts"] = [{"type": "synergy", "arm": "injury", "reference": "healthy"}]
    with pytest.raises(ConfigError, match="components"):
        validate(doc, "claims", CLAIMS)


def test_schema_rejects_a_bad_claim():
    doc = load_yaml(CLAIMS)
    doc["claims"][0]["direction"] = "sideways"
    with pytest.raises(ConfigError, match=r"claims\[0\]\.direction"):
        validate(doc, "claims", CLAIMS)


def test_claims_name_seeds_and_controls_compare_with_healthy(claims):
    for c in claims:
        if c["kind"] == "claim":
            assert c["seeds"], f"claim {c['id']}: names no seed file"
            assert c["notes"].strip(), f"claim {c['id']}: notes are empty"
        else:
            assert not c["seeds"], f"control {c['id']}: controls come from no seed"
            assert all(k["reference"] == "healthy" for k in c["contrasts"]), c["id"]
        for k in c["contrasts"]:
            assert k["arm"] != k["reference"], f"claim {c['id']}: compares {k['arm']} with itself"


def test_seed_files_exist(claims):
    if not SEEDS_DIR.is_dir():
        pytest.skip(f"seed articles not found at {SEEDS_DIR}")
    present = {p.name for p in SEEDS_DIR.iterdir()}
    missing = {(c["id"], s) for c in claims for s in c["seeds"] if s not in present}
    assert not missing, f"seed files named by claims but absent from {SEEDS_DIR}: {sorted(missing)}"


def test_every_seed_file_is_used(claims):
    if not SEEDS_DIR.is_dir():
        pytest.skip(f"seed articles not found at {SEEDS_DIR}")
    used = {s for c in claims for s in c["seeds"]}
    unused = sorted(p.name for p in SEEDS_DIR.glob("*.txt") if p.name not in used)
    assert not unused, f"seed files no claim draws on: {unused}"


# --- populations and measures ------------------------------------------------------------------

def _check_population(pop: dict, where: str) -> None:
    known = set(CELL_TYPES) if pop["level"] == "cell_type" else set(CELL_TYPES) | set(CELL_STATES)
    assert pop["value"] in known, f"{where}: unknown {pop['level']} '{pop['value']}' (known: {sorted(known)})"


def test_populations_are_known(claims):
    for c in claims:
        _check_population(c["population"], f"claim {c['id']} population")
        if c["measure"]["type"] == "share":
            parent = c["measure"].get("parent")
            assert parent, f"claim {c['id']}: a share needs a parent population"
            _check_population(parent, f"claim {c['id']} parent")
            value = c["population"]["value"]
            if value in CELL_STATES:
                assert parent["value"] == CELL_STATES[value][0], (
                    f"claim {c['id']}: {value} is a state of {CELL_STATES[value][0]}, not of {parent['value']}")


def test_signatures_used_exist_with_both_species(claims, signatures):
    for c in claims:
        m = c["measure"]
        if m["type"] != "signature":
            assert "signature" not in m, f"claim {c['id']}: a share takes no signature"
            continue
        sig = m.get("signature")
        assert sig in signatures, f"claim {c['id']}: signature '{sig}' not in {SIGNATURES}"
        assert signatures[sig]["mouse"] and signatures[sig]["human"], f"signature {sig}: empty gene list"


def test_signature_library_validates_and_keeps_planted_genes(signatures):
    for sig, genes in PLANTED_SIGNATURES.items():
        assert sig in signatures, f"signature '{sig}' (planted by the simulator) is missing"
        lost = [g for g in genes if g not in signatures[sig]["mouse"]]
        assert not lost, f"signature '{sig}': planted mouse genes removed or renamed: {lost}"
    for sig, spec in signatures.items():
        assert all(g == g.upper() for g in spec["human"] if "orf" not in g), f"{sig}: human symbols not upper case"
        assert all(g[0].isupper() or g.startswith("mt-") for g in spec["mouse"]), f"{sig}: mouse symbols not title case"
        if "min_genes" in spec:
            assert spec["min_genes"] <= min(len(spec["mouse"]), len(spec["human"])), sig


def test_signature_schema_rejects_bad_sets():
    doc = yaml.safe_load(SIGNATURES.read_text())
    doc["signatures"]["hsc_activation"]["mouse"] = []
    with pytest.raises(ConfigError, match=r"signatures\.hsc_activation\.mouse"):
        validate(doc, "signatures", SIGNATURES)
    doc = yaml.safe_load(SIGNATURES.read_text())
    del doc["signatures"]["timp"]["source"]
    with pytest.raises(ConfigError, match="source"):
        validate(doc, "signatures", SIGNATURES)


# --- own words ---------------------------------------------------------------------------------

def test_copy_check_detects_a_copied_run(seed_texts):
    _, text = next(iter(seed_texts.items()))
    run = " ".join(words(text)[100:100 + COPY_RUN])
    assert copied_runs(f"As a reviewer put it, {run.upper()}!", seed_texts)
    assert not copied_runs("Stellate cells in treated livers are less activated than untreated ones.", seed_texts)


def test_statements_are_in_our_own_words(claims, seed_texts):
    copied = {}
    for c in claims:
        for field in ("statement", "notes"):
            hits = copied_runs(c[field], seed_texts)
            if hits:
                copied[f"{c['id']}.{field}"] = hits
    assert not copied, f"runs of {COPY_RUN}+ words copied from seed articles: {copied}"


# --- the demo's planted truth ------------------------------------------------------------------

def _matches(claim: dict, effect: dict) -> bool:
    arm, reference = effect["contrast"]
    if claim["population"]["value"] != effect["population"]:
        return False
    if not any(k["arm"] == arm and k["reference"] == reference and "stage" not in k for k in claim["contrasts"]):
        return False
    m = claim["measure"]
    if effect["kind"] == "program":
        return m["type"] == "signature" and m.get("signature") == effect["program"]
    parent = CELL_STATES[effect["population"]][0]
    return m["type"] == "share" and m.get("parent", {}).get("value") == parent


def test_every_planted_effect_has_a_claim_or_control(claims):
    effects = yaml.safe_load(DEMO.read_text())["simulate"]["effects"]
    assert effects
    unmatched = [e["id"] for e in effects if not any(_matches(c, e) for c in claims)]
    assert not unmatched, f"planted demo effects with no matching claim or control: {unmatched}"
    for e in effects:
        kinds = {c["kind"] for c in claims if _matches(c, e)}
        expected = "control" if e["contrast"][1] == "healthy" else "claim"
        assert expected in kinds, f"effect {e['id']}: expected a matching {expected}"

"""Report stage: per-claim figures, heat map, forest plot and the summary, from synthetic tables
shaped like the claims and score stages' outputs."""

from __future__ import annotations

import base64
import re
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from livermsc import report
from test_plotting import FORMATS, assert_valid_figure_files

ARMS = {"healthy": 0.0, "injury": 2.0, "injury_msc": 0.5}


def scores_table(study: str) -> pd.DataFrame:
    """Sample scores: HSC activation (two methods) and the Treg share, three animals per arm."""
    rng = np.random.default_rng(len(study))
    rows = []
    for arm, shift in ARMS.items():
        for i in range(3):
            sample = f"{arm}_{i + 1}"
            base = {"study": study, "sample": sample, "animal": sample, "arm": arm,
                    "batch": "b1", "n_cells": 100, "n_parent_cells": 400}
            for method, offset in (("pseudobulk_z", 0.0), ("pseudobulk_mean", 10.0)):
                rows.append({**base, "population_level": "cell_type", "population": "hsc",
                             "measure_type": "signature", "measure": "hsc_activation",
                             "method": method, "value": offset + shift + rng.normal(0, 0.3)})
            rows.append({**base, "population_level": "cell_state", "population": "treg",
                         "measure_type": "share", "measure": "share_of_cd4_t",
                         "method": "proportion", "value": 0.1 + 0.01 * i})
    return pd.DataFrame(rows)


def claim_row(study, claim_id, kind, arm, reference, population, mtype, measure, method,
              direction, g, verdict, reason="") -> dict:
    n = 0 if np.isnan(g) else 3
    return {"study": study, "claim_id": claim_id, "kind": kind, "statement": claim_id,
            "contrast": f"{arm} vs {reference}", "arm": arm, "reference": reference,
            "stage": np.nan, "population": population, "measure_type": mtype,
            "measure": measure, "method": method, "direction": direction, "n_arm": n,
            "n_reference": n, "mean_arm": np.nan, "mean_reference": np.nan, "effect": g,
            "hedges_g": g, "ci_low": g - 1.2, "ci_high": g + 1.2, "p_value": 0.01,
            "q_value": 0.02, "mde": 2.0, "paired": False, "verdict": verdict, "reason": reason}


def claims_table(study: str, msc_g: float, msc_verdict: str) -> pd.DataFrame:
    return pd.DataFrame([
        claim_row(study, "injury_hsc", "control", "injury", "healthy", "hsc", "signature",
                  "hsc_activation", "pseudobulk_z", "up", 2.5, "supported"),
        claim_row(study, "msc_hsc", "claim", "injury_msc", "injury", "hsc", "signature",
                  "hsc_activation", "pseudobulk_z", "down", msc_g, msc_verdict),
        claim_row(study, "msc_treg", "claim", "injury_msc", "injury", "treg", "share",
                  "share_of_cd4_t", "logit_proportion", "up", 0.1, "inconclusive",
                  "not significant"),
        claim_row(study, "msc_dc", "claim", "injury_msc", "injury", "dendritic_cell",
                  "signature", "dc_maturation", "pseudobulk_z", "down", np.nan,
                  "inconclusive", "population dendritic_cell absent"),
    ])


META = pd.DataFrame([
    {"claim_id": "msc_hsc", "kind": "claim", "contrast": "injury_msc vs injury",
     "arm": "injury_msc", "reference": "injury", "stage": "", "k": 2, "hedges_g": -0.4,
     "ci_low": -1.9, "ci_high": 1.1, "verdict": "inconclusive"},
    {"claim_id": "injury_hsc", "kind": "control", "contrast": "injury vs healthy",
     "arm": "injury", "reference": "healthy", "stage": "", "k": 2, "hedges_g": 2.5,
     "ci_low": 1.6, "ci_high": 3.4, "verdict": "supported"},
])


@pytest.fixture()
def tables(tmp_path) -> dict:
    """Two studies' claims and scores tables and the meta table, written as TSV."""
    paths: dict = {"claims": {}, "scores": {}}
    for study, g, verdict in (("s1", -1.8, "supported"), ("s2", 1.0, "contradicted")):
        paths["claims"][study] = tmp_path / study / "claims.tsv"
        paths["scores"][study] = tmp_path / study / "scores" / "sample_scores.tsv"
        paths["scores"][study].parent.mkdir(parents=True)
        claims_table(study, g, verdict).to_csv(paths["claims"][study], sep="\t", index=False,
                                               na_rep="NA")
        scores_table(study).to_csv(paths["scores"][study], sep="\t", index=False)
    paths["meta"] = tmp_path / "claims_meta.tsv"
    META.to_csv(paths["meta"], sep="\t", index=False)
    return paths


# --- selecting a claim's samples --------------------------------------------------------------

def test_claim_samples_selects_measure_method_and_arms():
    scores = scores_table("s1")
    claims = claims_table("s1", -1.8, "supported").to_dict("records")
    hsc = report.claim_samples(scores, claims[1])
    assert sorted(hsc["arm"].unique()) == ["injury", "injury_msc"]
    assert set(hsc["method"]) == {"pseudobulk_z"} and len(hsc) == 6
    # shares are tested on the logit scale of the proportion the scores hold
    treg = report.claim_samples(scores, claims[2])
    assert set(treg["method"]) == {"proportion"} and len(treg) == 6
    assert report.claim_samples(scores, claims[3]).empty


def test_claim_samples_by_stage():
    scores = scores_table("s1")
    claim = {**claims_table("s1", -1.8, "supported").iloc[1].to_dict(), "stage": "early"}
    stages = {"injury_1": "early", "injury_msc_1": "early", "injury_2": "late"}
    assert sorted(report.claim_samples(scores, claim, stages)["sample"]) == [
        "injury_1", "injury_msc_1"]
    with pytest.raises(ValueError, match="stage 'early'"):
        report.claim_samples(scores, claim, {})
    with_col = scores.assign(stage=np.where(scores["sample"].str.endswith("_2"), "early", "late"))
    assert sorted(report.claim_samples(with_col, claim)["sample"]) == [
        "injury_2", "injury_msc_2"]


def test_claim_samples_unknown_method_among_several_is_an_error():
    claim = {**claims_table("s1", -1.8, "supported").iloc[1].to_dict(), "method": "ssgsea"}
    with pytest.raises(ValueError, match="not under the claim's method 'ssgsea'"):
        report.claim_samples(scores_table("s1"), claim)


def test_figure_stem_is_a_safe_unique_name():
    row = {"claim_id": "a", "arm": "x y", "reference": "r/1", "stage": "d7"}
    assert report.figure_stem(row) == "a__x_y_vs_r_1__d7"
    assert report.figure_stem({**row, "stage": np.nan}) == "a__x_y_vs_r_1"


# --- figures ----------------------------------------------------------------------------------

def test_plot_claim_figures_one_per_contrast(tmp_path, tables):
    scores = report.read_table(tables["scores"]["s1"], report.SCORES_COLUMNS, "scores")
    claims = report.read_table(tables["claims"]["s1"], report.CLAIMS_COLUMNS, "claims")
    paths = report.plot_claim_figures(scores, claims, tmp_path / "figs", FORMATS, dpi=80)
    stems = sorted({p.with_suffix("").name for p in paths})
    assert stems == sorted(report.figure_stem(r) for r in claims.to_dict("records"))
    for stem in stems:
        assert_valid_figure_files([p for p in paths if p.with_suffix("").name == stem])
    # the untestable contrast still gets a figure, carrying its reason
    svg = (tmp_path / "figs" / "msc_dc__injury_msc_vs_injury.svg").read_text()
    assert "population dendritic_cell absent" in svg


def test_duplicate_contrasts_are_rejected(tmp_path):
    claims = claims_table("s1", -1.8, "supported")
    with pytest.raises(ValueError, match="several rows for the same claim contrast"):
        report.plot_claim_figures(scores_table("s1"), pd.concat([claims, claims.iloc[:1]]),
                                  tmp_path, ["png"])


def test_read_table_names_file_and_missing_columns(tmp_path):
    path = tmp_path / "claims.tsv"
    claims_table("s1", -1.8, "supported").drop(columns=["verdict"]).to_csv(path, sep="\t")
    with pytest.raises(ValueError, match=r"claims\.tsv: claims table lacks column\(s\) \['verdict'\]"):
        report.read_table(path, report.CLAIMS_COLUMNS, "claims table")
    with pytest.raises(FileNotFoundError, match=r"nothing\.tsv: claims table not found"):
        report.read_table(tmp_path / "nothing.tsv", [], "claims table")


def test_forest_tables_use_claim_cis_and_match_pooled(tables):
    claims = report.combine_claims([pd.read_csv(p, sep="\t")
                                    for p in tables["claims"].values()])
    studies, pooled = report.forest_tables(claims, META)
    row = studies[(studies["study"] == "s2")
                  & (studies["label"] == "msc_hsc (injury_msc vs injury)")].iloc[0]
    assert (row["effect"], row["ci_low"], row["ci_high"]) == pytest.approx((1.0, -0.2, 2.2))
    assert dict(zip(pooled["label"], pooled["effect"], strict=True)) == {
        "msc_hsc (injury_msc vs injury)": -0.4, "injury_hsc (injury vs healthy)": 2.5}
    # a meta table keyed by claim id only still matches
    _, by_id = report.forest_tables(claims, META.drop(columns=["arm", "reference", "stage"]))
    assert len(by_id) == 2
    with pytest.raises(ValueError, match="no pooled effect column"):
        report.forest_tables(claims, META.drop(columns=["hedges_g"]))
    # a contrast tested in one study only gets no "pooled" line repeating that study
    _, single = report.forest_tables(claims, META.assign(k=[1, 2]))
    assert list(single["label"]) == ["injury_hsc (injury vs healthy)"]


# --- summary ----------------------------------------------------------------------------------

class _Checker(HTMLParser):
    """Collects tags and checks that every opened element is closed in order."""

    VOID = frozenset({"meta", "img", "br", "hr", "link"})

    def __init__(self):
        super().__init__()
        self.stack: list[str] = []
        self.tags: list[str] = []
        self.images: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack.pop() == tag, f"unbalanced </{tag}>"


def test_write_summary_produces_every_file(tmp_path, tables):
    results = tmp_path / "results"
    figure_dirs = {}
    for study in ("s1", "s2"):
        scores = pd.read_csv(tables["scores"][study], sep="\t")
        claims = pd.read_csv(tables["claims"][study], sep="\t")
        figure_dirs[study] = results / "report" / study / "claims"
        report.plot_claim_figures(scores, claims, figure_dirs[study], FORMATS, dpi=60)
    qc = tmp_path / "qc_summary.tsv"
    pd.DataFrame({"sample": ["a", "b"], "cells_kept": [900, 850]}).to_csv(qc, sep="\t",
                                                                       index=False)
    metrics = tmp_path / "integration_metrics.tsv"
    pd.DataFrame({"embedding": ["X_scVI"], "metric": ["ilisi"], "value": [0.61]}).to_csv(
        metrics, sep="\t", index=False)
    smk = SimpleNamespace(
        input=SimpleNamespace(claims=[str(tables["claims"]["s1"]), str(tables["claims"]["s2"])],
                              meta=str(tables["meta"]),
                              figures=[str(figure_dirs["s1"]), str(figure_dirs["s2"])],
                              qc=[str(qc), str(qc)], metrics=[str(metrics), str(metrics)]),
        output=SimpleNamespace(
            heatmap=[str(results / "report" / f"claims_heatmap.{f}") for f in FORMATS],
            forest=[str(results / "report" / f"claims_forest.{f}") for f in FORMATS],
            verdicts=str(results / "report" / "verdicts.tsv"),
            md=str(results / "summary.md"), html=str(results / "summary.html")),
        params=SimpleNamespace(studies=["s1", "s2"], formats=list(FORMATS), dpi=60,
                               effect_limit=3.0, embed=True),
        config={"seed": 7})
    report.rule_report_summary(smk)

    assert_valid_figure_files([Path(p) for p in smk.output.heatmap])
    assert_valid_figure_files([Path(p) for p in smk.output.forest])

    md = Path(smk.output.md).read_text()
    headings = re.findall(r"^## (.*)$", md, flags=re.M)
    assert headings[0] == "Claims verdicts across studies"
    first_table = md.split("## Claims verdicts across studies\n\n")[1].split("\n\n")[0]
    lines = first_table.splitlines()
    assert lines[0] == ("| claim | kind | contrast | population | measure | predicted "
                        "| s1 | s2 | pooled |")
    msc = next(line for line in lines if line.startswith("| msc_hsc "))
    assert "✓ supported (g = -1.8, q = 0.02)" in msc
    assert "✗ contradicted (g = 1, q = 0.02)" in msc
    assert msc.endswith("| ? inconclusive (g = -0.4) |")
    # claims come before controls
    assert lines.index(msc) < lines.index(next(x for x in lines if x.startswith("| injury_hsc")))
    # every figure the summary links exists
    for link in re.findall(r"\]\(([^)]+)\)", md):
        assert (results / link).is_file(), link
    assert "Study s2" in headings and "cells_kept" in md and "ilisi" in md

    page = Path(smk.output.html).read_text()
    checker = _Checker()
    checker.feed(page)
    assert checker.stack == [] and checker.tags.count("table") == 8
    assert len(checker.images) == 2
    for src in checker.images:
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix)
        assert base64.b64decode(src[len(prefix):]).startswith(b"\x89PNG")
    assert "✗ contradicted" in page

    verdicts = pd.read_csv(smk.output.verdicts, sep="\t")
    assert list(verdicts["claim"]) == ["msc_hsc", "msc_treg", "msc_dc", "injury_hsc"]
    assert verdicts.loc[0, "s2"].startswith("✗ contradicted")


def test_summary_html_links_figures_when_not_embedded(tmp_path, tables):
    figure_dirs = {s: tmp_path / "report" / s / "claims" for s in ("s1", "s2")}
    report.write_summary(
        [tables["claims"]["s1"], tables["claims"]["s2"]], None, tmp_path / "summary.md",
        tmp_path / "summary.html", tmp_path / "report" / "verdicts.tsv",
        tmp_path / "report" / "heat", tmp_path / "report" / "forest", figure_dirs,
        formats=["svg"], dpi=60, embed=False)
    assert (tmp_path / "report" / "heat.svg").is_file()
    assert not (tmp_path / "report" / "forest.svg").exists()  # no meta table given
    page = (tmp_path / "summary.html").read_text()
    assert '<img src="report/heat.svg"' in page
    assert "report/s1/claims/msc_hsc__injury_msc_vs_injury.svg" in page

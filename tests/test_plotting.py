"""Figure style and the standard figures: right content, valid files in every format."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from livermsc import plotting
from matplotlib.patches import Polygon

FORMATS = ("pdf", "png", "svg")


def assert_valid_figure_files(paths: list[Path], formats=FORMATS) -> None:
    """Every file exists, is non-empty and is a valid file of its format."""
    assert sorted(p.suffix.lstrip(".") for p in paths) == sorted(formats)
    for path in paths:
        data = path.read_bytes()
        assert len(data) > 200, path
        if path.suffix == ".pdf":
            assert data.startswith(b"%PDF-") and b"%%EOF" in data[-1024:], path
        elif path.suffix == ".png":
            assert data.startswith(b"\x89PNG\r\n\x1a\n"), path
        elif path.suffix == ".svg":
            root = ET.fromstring(data)
            assert root.tag == "{http://www.w3.org/2000/svg}svg", path


def sample_table() -> pd.DataFrame:
    """Two samples per animal, known per-animal means (1, 2, 3 in injury; 5, 6, 7 in msc)."""
    rows = []
    for arm, means in {"injury": [1.0, 2.0, 3.0], "injury_msc": [5.0, 6.0, 7.0],
                       "healthy": [0.0, 0.0, 0.0]}.items():
        for i, mean in enumerate(means):
            for delta in (-0.5, 0.5):
                rows.append({"sample": f"{arm}_{i}_{delta}", "animal": f"{arm}_{i}", "arm": arm,
                             "value": mean + delta})
    return pd.DataFrame(rows)


CLAIM = {"claim_id": "msc_hsc", "arm": "injury_msc", "reference": "injury", "stage": np.nan,
         "measure": "hsc_activation", "population": "hsc", "hedges_g": 2.61, "ci_low": 0.9,
         "ci_high": 4.3, "q_value": 0.0123, "verdict": "contradicted"}


def claims_table() -> pd.DataFrame:
    rows = []
    for study, (g1, g2, v1, v2) in {"s1": (-1.5, 4.0, "supported", "supported"),
                                     "s2": (0.2, np.nan, "inconclusive", "inconclusive")}.items():
        rows.append({"study": study, "claim_id": "msc_hsc", "arm": "injury_msc",
                     "reference": "injury", "stage": np.nan, "hedges_g": g1,
                     "ci_low": g1 - 1, "ci_high": g1 + 1, "verdict": v1})
        rows.append({"study": study, "claim_id": "injury_hsc", "arm": "injury",
                     "reference": "healthy", "stage": np.nan, "hedges_g": g2,
                     "ci_low": g2 - 1, "ci_high": g2 + 1, "verdict": v2})
    return pd.DataFrame(rows)


# --- style ------------------------------------------------------------------------------------

def test_style_is_applied_on_import():
    assert plt.rcParams["axes.spines.top"] is False
    assert plt.rcParams["axes.spines.right"] is False
    assert plt.rcParams["font.size"] == 8
    assert plt.rcParams["pdf.fonttype"] == 42
    assert plt.rcParams["axes.prop_cycle"].by_key()["color"] == plotting.OKABE_ITO


def test_arm_colours_fixed_and_distinct():
    assert plotting.arm_colour("injury") == "#D55E00"
    assert plotting.arm_colour("healthy", ["x", "healthy"]) == "#0072B2"
    arms = ["healthy", "injury", "sham", "injury_hgf"]
    colours = [plotting.arm_colour(a, arms) for a in arms]
    assert len(set(colours)) == len(arms)
    assert colours == [plotting.arm_colour(a, arms) for a in arms]  # deterministic
    assert set(plotting.ARM_COLOURS.values()) <= set(plotting.OKABE_ITO)


def test_format_number():
    assert plotting.format_number(0.01234) == "0.012"
    assert plotting.format_number(-1.456) == "-1.5"
    assert plotting.format_number(123.4) == "123"
    assert plotting.format_number(3, 0) == "3"
    assert plotting.format_number(np.nan) == "NA"
    assert plotting.format_number(None) == "NA"
    assert plotting.format_number(0.0) == "0"
    assert plotting.format_number(2.3e-7) == "2.3e-07"


def test_verdict_marks():
    assert plotting.verdict_mark("supported") == "✓"
    assert plotting.verdict_mark("contradicted") == "✗"
    assert plotting.verdict_mark("inconclusive") == "?"
    assert plotting.verdict_mark("something new") == "·"
    assert plotting.verdict_mark(np.nan) == ""


# --- saving -----------------------------------------------------------------------------------

def test_save_figure_writes_valid_reproducible_files(tmp_path):
    def draw():
        fig, ax = plt.subplots()
        ax.plot([0, 1], [0, 1], label="x")
        ax.set_title("title")
        return fig

    paths = plotting.save_figure(draw(), tmp_path / "a" / "fig.v1", FORMATS, dpi=100)
    assert [p.name for p in paths] == ["fig.v1.pdf", "fig.v1.png", "fig.v1.svg"]
    assert_valid_figure_files(paths)
    again = plotting.save_figure(draw(), tmp_path / "b" / "fig.v1", FORMATS, dpi=100)
    for p, q in zip(paths, again, strict=True):
        assert p.read_bytes() == q.read_bytes(), f"{p.suffix} differs between identical runs"
    assert plotting.save_figure(draw(), tmp_path / "c.png", ["pdf"])[0].name == "c.pdf"
    assert plt.get_fignums() == []  # figures are closed


# --- figures ----------------------------------------------------------------------------------

def test_sample_level_plot_points_per_animal(tmp_path):
    fig = plotting.sample_level_plot(sample_table(), CLAIM)
    ax = fig.axes[0]
    points = [c.get_offsets() for c in ax.collections if len(c.get_offsets())]
    # reference arm first; one point per animal at the animal's mean
    assert [sorted(p[:, 1]) for p in points] == [[1.0, 2.0, 3.0], [5.0, 6.0, 7.0]]
    assert all(abs(p[:, 0] - i).max() < 0.2 for i, p in enumerate(points))
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["injury\n(n = 3)", "injury_msc\n(n = 3)"]
    title = ax.get_title(loc="left")
    assert "msc_hsc: injury_msc vs injury" in title
    assert "g = 2.6" in title and "q = 0.012" in title and "contradicted" in title
    assert_valid_figure_files(plotting.save_figure(fig, tmp_path / "claim", FORMATS, 100))


def test_sample_level_plot_all_arms_and_empty_arm():
    fig = plotting.sample_level_plot(sample_table(), arms=["healthy", "injury", "injury_ev"])
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels == ["healthy\n(n = 3)", "injury\n(n = 3)", "injury_ev\n(n = 0)"]
    fig = plotting.sample_level_plot(sample_table())
    labels = [t.get_text().split("\n")[0] for t in fig.axes[0].get_xticklabels()]
    assert labels == ["healthy", "injury", "injury_msc"]  # standard arm order
    plt.close("all")
    with pytest.raises(ValueError, match="missing column"):
        plotting.sample_level_plot(sample_table().drop(columns="value"))


def test_claims_heatmap_values_and_marks(tmp_path):
    fig = plotting.claims_heatmap(claims_table(), limit=3.0)
    ax = fig.axes[0]
    grid = ax.images[0].get_array()
    assert grid.shape == (2, 2)
    assert grid[0, 0] == -1.5 and grid[0, 1] == pytest.approx(0.2)
    assert grid[1, 0] == 3.0  # capped at the limit
    assert np.ma.is_masked(grid[1, 1])  # not measurable -> grey
    marks = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text()
             for t in ax.texts}
    assert marks == {(0, 0): "✓", (0, 1): "?", (1, 0): "✓", (1, 1): "?"}
    assert [t.get_text() for t in ax.get_yticklabels()] == [
        "msc_hsc (injury_msc vs injury)", "injury_hsc (injury vs healthy)"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["s1", "s2"]
    assert_valid_figure_files(plotting.save_figure(fig, tmp_path / "heat", FORMATS, 100))


def test_forest_plot_studies_and_pooled_diamond(tmp_path):
    data = claims_table().dropna(subset=["hedges_g"])
    data = data.assign(label=[plotting.claim_label(r) for r in data.to_dict("records")],
                       effect=data["hedges_g"])
    pooled = pd.DataFrame({"label": ["msc_hsc (injury_msc vs injury)"], "effect": [-0.6],
                           "ci_low": [-1.8], "ci_high": [0.6]})
    fig = plotting.forest_plot(data, pooled)
    ax = fig.axes[0]
    diamonds = [p for p in ax.patches if isinstance(p, Polygon)]
    assert len(diamonds) == 1
    xs = sorted(diamonds[0].get_xy()[:, 0])
    assert xs[0] == pytest.approx(-1.8) and xs[-1] == pytest.approx(0.6)
    squares = [line for line in ax.lines if line.get_marker() == "s"]
    assert sorted(float(s.get_xdata()[0]) for s in squares) == [-1.5, 0.2, 4.0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == ["msc_hsc (injury_msc vs injury)", "  s1", "  s2", "  pooled",
                      "injury_hsc (injury vs healthy)", "  s1"]
    assert_valid_figure_files(plotting.save_figure(fig, tmp_path / "forest", FORMATS, 100))


def test_integration_metric_plot_long_and_wide(tmp_path):
    long = pd.DataFrame({"embedding": ["X_pca", "X_pca", "X_scVI", "X_scVI"],
                         "metric": ["ilisi", "nmi", "ilisi", "nmi"],
                         "value": [0.2, 0.7, 0.6, 0.8]})
    wide = long.pivot(index="embedding", columns="metric", values="value").reset_index()
    for table in (long, wide):
        fig = plotting.integration_metric_plot(table)
        ax = fig.axes[0]
        xs = sorted(float(x) for c in ax.collections for x in c.get_offsets()[:, 0])
        assert xs == [0.2, 0.6, 0.7, 0.8]
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["X_pca", "X_scVI"]
        assert_valid_figure_files(plotting.save_figure(fig, tmp_path / "metrics", FORMATS, 100))
    with pytest.raises(ValueError, match="expected columns"):
        plotting.integration_metric_plot(pd.DataFrame({"a": ["x"]}))


def test_message_figure(tmp_path):
    fig = plotting.message_figure("no samples", title="x")
    assert_valid_figure_files(plotting.save_figure(fig, tmp_path / "msg", FORMATS, 100))

"""Config, study files and sample sheets are validated up front with clear, specific errors."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest
import yaml
from livermsc.config import ConfigError, load_config, load_study, validate, validate_sample_sheet


def test_default_config_is_valid(repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    cfg, studies = load_config(yaml.safe_load((repo_root / "config/config.yaml").read_text()))
    assert cfg["studies"] == ["demo"]
    demo = studies["demo"]
    assert demo.species == "mouse"
    per_arm = yaml.safe_load((repo_root / "config/studies/demo.yaml").read_text())[
        "simulate"]["animals_per_arm"]
    assert demo.samples["arm"].value_counts().to_dict() == {
        "healthy": per_arm, "injury": per_arm, "injury_ev": per_arm, "injury_msc": per_arm}
    assert demo.data_dir == "resources/demo/simulated"


def test_schema_defaults_are_filled():
    cfg = validate({"studies": ["demo"]}, "config", "x.yaml")
    assert cfg["seed"] == 0 and cfg["studies_dir"] == "config/studies"


def test_bad_field_names_file_field_and_expectation():
    with pytest.raises(ConfigError) as err:
        validate({"studies": ["demo"], "seed": "zero"}, "config", "my.yaml")
    msg = str(err.value)
    assert "my.yaml" in msg and "'seed'" in msg and "is not of type 'integer'" in msg
    assert "random seed" in msg  # the field's description says what is expected


def test_unknown_key_is_refused():
    with pytest.raises(ConfigError, match="Additional properties are not allowed"):
        validate({"studies": ["demo"], "sede": 1}, "config", "my.yaml")


@pytest.mark.parametrize(("section", "key", "new"), [
    ("qc", "figure_formats", "figures.formats"), ("qc", "figure_dpi", "figures.dpi"),
    ("cluster", "figure_formats", "figures.formats"),
    ("report", "formats", "figures.formats"), ("report", "dpi", "figures.dpi")])
def test_moved_figure_setting_names_its_new_place(section, key, new):
    """A figure setting of an older config is refused with one line saying where it lives now."""
    with pytest.raises(ConfigError) as err:
        validate({"studies": ["demo"], section: {key: ["png"]}}, "config", "my.yaml")
    assert str(err.value) == (f"my.yaml: field '{section}.{key}' has moved to '{new}' "
                              "(set it there instead)")
    figures = validate({"studies": ["demo"], "figures": {"formats": ["png"], "dpi": 72}},
                       "config", "my.yaml")["figures"]
    assert figures == {"formats": ["png"], "dpi": 72}


def test_sample_sheet_errors_name_row_and_field():
    sheet = pd.DataFrame({"sample": ["a", "b"], "arm": ["healthy", "bad arm!"], "path": ["a", "b"]})
    with pytest.raises(ConfigError, match=r"sheet.tsv: row 2, field 'arm'"):
        validate_sample_sheet(sheet, "sheet.tsv")
    missing = pd.DataFrame({"sample": ["a"], "arm": ["healthy"]})
    with pytest.raises(ConfigError, match="'path' is a required property"):
        validate_sample_sheet(missing, "sheet.tsv")
    dup = pd.DataFrame({"sample": ["a", "a"], "arm": ["x", "y"], "path": ["p", "q"]})
    with pytest.raises(ConfigError, match="duplicated sample names"):
        validate_sample_sheet(dup, "sheet.tsv")


def test_sample_sheet_defaults_animal_to_sample():
    sheet = pd.DataFrame({"sample": ["s1", "s2"], "arm": ["a", "b"], "path": ["p1", "p2"],
                          "animal": ["m1", None]})
    out = validate_sample_sheet(sheet, "sheet.tsv")
    assert out.loc["s1", "animal"] == "m1" and out.loc["s2", "animal"] == "s2"
    assert out.loc["s1", "orientation"] == "auto"


def test_missing_study_and_sheet(tmp_path):
    with pytest.raises(ConfigError, match="no study file for study 'nope'"):
        load_study("nope", tmp_path)
    (tmp_path / "x.yaml").write_text(yaml.safe_dump(
        {"id": "x", "title": "t", "species": "mouse", "source": "local", "sample_sheet": "x.tsv"}))
    with pytest.raises(ConfigError, match=r"x.tsv: sample sheet not found"):
        load_study("x", tmp_path)


def test_study_needing_accession_is_refused_with_instructions(tmp_path):
    (tmp_path / "y.yaml").write_text(yaml.safe_dump(
        {"id": "y", "title": "t", "species": "mouse", "source": "geo", "status": "needs_accession"}))
    with pytest.raises(ConfigError, match="accession"):
        load_study("y", tmp_path)


def test_snakemake_stops_before_any_job_with_one_message(repo_root):
    """A bad config stops the workflow with the message and no Python traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--config", "seed=-1"],
        capture_output=True, text=True, cwd=repo_root, check=False)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "field 'seed'" in out and "Traceback" not in out

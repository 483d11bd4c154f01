"""Bad input at the config, sample-sheet and workflow level: one test per case.

Each case asserts the specific message, that it names the file and the field, that no Python
traceback reaches the user and that nothing is left behind that a rerun would trust. Config-level
cases go through `snakemake -n` (or `livermsc validate`) in a scratch project folder holding
copies of `config/` and `seeds/`. The file-level cases (empty or corrupt files, wrong species, ...)
are in test_bad_input_ingest.py; the README's troubleshooting section lists them all.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import yaml
from _http_server import FileServer
from livermsc.claims import evaluate_study
from livermsc.integrate import read_samples
from livermsc.qc import QCSettings, run_qc
from livermsc.report import build_summary, render_markdown
from livermsc.score import score_study

REPO = Path(__file__).resolve().parents[1]
TRACEBACK = "Traceback (most recent call last)"


# --- helpers --------------------------------------------------------------------------------------

@pytest.fixture
def project(tmp_path) -> Path:
    """A scratch project folder: copies of config/ and seeds/, as a user's own checkout."""
    for folder in ("config", "seeds"):
        shutil.copytree(REPO / folder, tmp_path / folder)
    return tmp_path


def snakemake(work: Path, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    """Run the workflow in ``work``; returns the finished process (stdout + stderr in .out)."""
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
           "--directory", str(work), "--cores", "1", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    proc.out = proc.stdout + proc.stderr
    return proc


def validate_cli(work: Path, *config: str) -> subprocess.CompletedProcess:
    """``livermsc validate`` in ``work`` with ``--config`` overrides."""
    cmd = [sys.executable, "-m", "livermsc.cli", "validate", "--config", *config]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=work, timeout=120, check=False)
    proc.out = proc.stdout + proc.stderr
    return proc


def local_study(work: Path, rows: list[dict], study: str = "bad", touch: bool = True) -> Path:
    """Write a local study with a TSV sample sheet; touch each sample's file; return the sheet."""
    studies = work / "config" / "studies"
    sheet = studies / f"{study}_samples.tsv"
    pd.DataFrame(rows).to_csv(sheet, sep="\t", index=False)
    (studies / f"{study}.yaml").write_text(yaml.safe_dump({
        "id": study, "title": "bad input", "species": "mouse", "source": "local",
        "sample_sheet": sheet.name}))
    if touch:
        for row in rows:
            if "path" in row and not row["path"].startswith(("/", "..")):
                path = work / "resources" / study / row["path"]
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("placeholder")
    return sheet


def rows(arms: dict[str, int]) -> list[dict]:
    """Sample-sheet rows: ``n`` animals per arm, one h5ad each."""
    return [{"sample": f"{arm}_{i}", "arm": arm, "animal": f"{arm}_{i}",
             "path": f"{arm}_{i}.h5ad", "format": "h5ad"}
            for arm, n in arms.items() for i in range(1, n + 1)]


def refused(proc: subprocess.CompletedProcess, work: Path, *needles: str) -> None:
    """The run stopped, printed every needle, showed no traceback and wrote no results."""
    assert proc.returncode != 0, proc.out[-2000:]
    for needle in needles:
        assert needle in proc.out, f"{needle!r} not in:\n{proc.out[-3000:]}"
    assert TRACEBACK not in proc.out, proc.out[-3000:]
    assert not (work / "results").exists()


# --- sample sheet ---------------------------------------------------------------------------------

def test_sample_sheet_missing_required_column(project):
    sheet = local_study(project, [{k: v for k, v in r.items() if k != "arm"}
                                  for r in rows({"healthy": 2})])
    proc = snakemake(project, "-n", "--config", "studies=[bad]")
    refused(proc, project, "nothing was run", str(sheet), "row 1, field 'arm'",
            "'arm' is a required property", "expected: Experimental arm")


def test_duplicate_sample_id(project):
    sheet_rows = rows({"healthy": 2, "injury": 2})
    sheet_rows[3]["sample"] = sheet_rows[0]["sample"]
    sheet = local_study(project, sheet_rows)
    proc = snakemake(project, "-n", "--config", "studies=[bad]")
    refused(proc, project, str(sheet), "field 'sample'", "duplicated sample names ['healthy_1']",
            "expected: unique ids")


def test_arm_that_no_claim_uses_is_allowed_and_reported(project):
    local_study(project, rows({"healthy": 3, "injury": 3, "sham_operated": 3}))
    proc = snakemake(project, "-n", "--config", "studies=[bad]")
    assert proc.returncode == 0, proc.out[-3000:]
    note = "arm(s) sham_operated are used by no claim in seeds/claims.yaml"  # that arm only
    assert note in proc.out and "bad.yaml" in proc.out
    assert "rule ingest" in proc.out  # its samples are still analysed
    cli = validate_cli(project, "studies=[bad]")
    assert cli.returncode == 0 and note in cli.out and "configuration valid" in cli.out


def test_sample_path_outside_the_study_folder_is_refused(project):
    sheet_rows = rows({"healthy": 2})
    sheet_rows[1]["path"] = "../../etc/passwd"
    sheet = local_study(project, sheet_rows)
    proc = snakemake(project, "-n", "--config", "studies=[bad]")
    refused(proc, project, str(sheet), "sample 'healthy_2', field 'path'",
            "'../../etc/passwd' points outside the study's data folder resources/bad/")
    sheet_rows[1]["path"] = "/etc/passwd"
    local_study(project, sheet_rows)
    refused(snakemake(project, "-n", "--config", "studies=[bad]"), project,
            "field 'path': '/etc/passwd' points outside")


def test_fetched_sample_path_outside_the_study_folder_is_refused(project):
    spec = {"id": "badgeo", "title": "t", "species": "mouse", "source": "geo",
            "accession": "GSE900001", "files": [{"name": "GSE900001_RAW.tar"}],
            "samples": [{"sample": "a", "arm": "healthy", "gsm": "GSM1", "format": "10x_mtx",
                         "path": "../../etc/passwd"}]}
    study_file = project / "config" / "studies" / "badgeo.yaml"
    study_file.write_text(yaml.safe_dump(spec))
    proc = snakemake(project, "-n", "--config", "studies=[badgeo]")
    refused(proc, project, "badgeo.yaml", "field 'path': '../../etc/passwd'")


# --- config values --------------------------------------------------------------------------------

CONFIG = "config (config/config.yaml with --config/--configfile overrides)"


def test_negative_n_mads_is_refused_with_the_value(project):
    """The command line gives '-1' as a string; it is read as the number the schema asks for."""
    proc = snakemake(project, "-n", "--config", 'qc={"n_mads": -1}')
    refused(proc, project, CONFIG, "field 'qc.n_mads': -1 is less than or equal to the minimum of 0")
    assert "is not of type" not in proc.out


def test_numeric_string_on_the_command_line_is_coerced(project):
    ok = snakemake(project, "-n", "--config", 'qc={"n_mads": 4.5, "min_genes": "150"}',
                   'integrate={"scvi": {"max_epochs": 10, "early_stopping": "true"}}', "seed=3")
    assert ok.returncode == 0, ok.out[-3000:]
    bad = snakemake(project, "-n", "--config", 'qc={"n_mads": "five"}')
    refused(bad, project, CONFIG, "field 'qc.n_mads': 'five' is not of type 'number'")
    fraction = snakemake(project, "-n", "--config", 'qc={"min_genes": 2.5}')
    refused(fraction, project, "field 'qc.min_genes': 2.5 is not of type 'integer'")


@pytest.mark.parametrize(("override", "message"), [
    ('integrate={"scvi": {"max_epochs": 0}}',
     "field 'integrate.scvi.max_epochs': 0 is less than the minimum of 1"),
    ('integrate={"accelerator": "tpu"}',
     "field 'integrate.accelerator': 'tpu' is not one of ['auto', 'cpu', 'gpu']"),
    ('qc={"n_mads_mt": -3}', "field 'qc.n_mads_mt': -3 is less than"),
    ('figures={"dpi": 0}', "field 'figures.dpi': 0 is less than the minimum of 50"),
    ('fetch={"timeout_s": 0}', "field 'fetch.timeout_s': 0 is less than or equal to the minimum"),
])
def test_out_of_range_config_value(project, override, message):
    proc = validate_cli(project, override)
    assert proc.returncode == 2 and message in proc.out and "config/config.yaml" in proc.out
    assert TRACEBACK not in proc.out


def test_out_of_range_config_value_stops_the_workflow(project):
    proc = snakemake(project, "-n", "--config", 'integrate={"scvi": {"max_epochs": 0}}')
    refused(proc, project, CONFIG, "field 'integrate.scvi.max_epochs': 0 is less than the minimum")


# --- data-level cases: one animal per arm, all cells lost, signature absent -------------------------

def _scores(arms: dict[str, int], seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A score table (one signature in one population) and its coverage, for ``arms``."""
    rng = np.random.default_rng(seed)
    recs = []
    for arm, n in arms.items():
        for i in range(n):
            s = f"{arm}_{i}"
            recs.append({"study": "x", "sample": s, "animal": s, "arm": arm, "batch": "b1",
                         "stage": np.nan, "population_level": "cell_type", "population": "hsc",
                         "measure_type": "signature", "measure": "hsc_activation",
                         "method": "pseudobulk_z", "value": rng.normal(), "n_cells": 200,
                         "n_parent_cells": np.nan})
    coverage = pd.DataFrame([{"signature": "hsc_activation", "n_genes": 14, "n_found": 14,
                              "fraction": 1.0, "genes_missing": "", "genes_found": "",
                              "usable": True}])
    return pd.DataFrame(recs), coverage


CATALOGUE = {"claims": [{
    "id": "c1", "kind": "claim", "statement": "s", "direction": "down",
    "population": {"level": "cell_type", "value": "hsc"},
    "measure": {"type": "signature", "signature": "hsc_activation"},
    "contrasts": [{"arm": "injury_msc", "reference": "injury"},
                  {"arm": "injury", "reference": "healthy"}]}]}


def test_arm_with_one_animal_gives_inconclusive_claims_and_the_rest_is_tested():
    scores, coverage = _scores({"healthy": 3, "injury": 3, "injury_msc": 1})
    table, _ = evaluate_study(scores, coverage, CATALOGUE, "x",
                              {"method": "pseudobulk_z"}, {"methods": ["pseudobulk_z"]})
    one = table[table["arm"] == "injury_msc"].iloc[0]
    assert one["verdict"] == "inconclusive"
    assert one["reason"] == "too few samples per arm: 1 injury_msc vs 3 injury animals (min 3)"
    other = table[table["arm"] == "injury"].iloc[0]
    assert other["reason"] == "" or other["reason"].startswith("not significant"), other["reason"]
    assert np.isfinite(other["p_value"]) and other["n_arm"] == 3 and other["n_reference"] == 3


def _adata(n_samples: int = 6, n_cells: int = 80, seed: int = 0) -> ad.AnnData:
    """Raw counts of ``n_samples`` samples (2 arms) with two cell types, mouse symbols."""
    rng = np.random.default_rng(seed)
    genes = [f"Gene{i}" for i in range(60)] + ["Acta2", "Col1a1", "Col3a1", "Timp1",
                                               "mt-Co1", "mt-Nd1"]
    obs = pd.DataFrame({
        "sample": np.repeat([f"s{i}" for i in range(n_samples)], n_cells),
        "arm": np.repeat([("healthy", "injury")[i % 2] for i in range(n_samples)], n_cells),
        "cell_type": np.tile(["hsc", "hepatocyte"], n_samples * n_cells // 2)})
    obs["animal"] = obs["sample"]
    obs["cell_state"] = obs["cell_type"]
    obs.index = [f"c{i}" for i in range(len(obs))]
    counts = sp.csr_matrix(rng.poisson(3.0, (len(obs), len(genes))).astype(np.float32))
    adata = ad.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=genes))
    adata.layers["counts"] = counts.copy()
    return adata


def test_signature_with_no_gene_present_is_inconclusive_and_named():
    adata = _adata()
    signatures = {"present": ["Acta2", "Col1a1", "Col3a1", "Timp1"],
                  "absent": ["NotAGene1", "NotAGene2", "NotAGene3"]}
    res = score_study(adata, signatures, "x", {"methods": ["pseudobulk_z"], "min_genes": 3})
    cov = res.coverage.set_index("signature")
    assert cov.loc["absent", "n_found"] == 0 and not cov.loc["absent", "usable"]
    assert cov.loc["absent", "genes_missing"] == "NotAGene1,NotAGene2,NotAGene3"
    assert set(res.sample_scores.loc[res.sample_scores["measure_type"] == "signature",
                                     "measure"]) == {"present"}
    catalogue = {"claims": [{**CATALOGUE["claims"][0], "id": sid,
                             "measure": {"type": "signature", "signature": sid},
                             "contrasts": [{"arm": "injury", "reference": "healthy"}]}
                            for sid in signatures]}
    table, _ = evaluate_study(res.sample_scores, res.coverage, catalogue, "x",
                              {"method": "pseudobulk_z"}, {"methods": ["pseudobulk_z"],
                                                           "min_genes": 3})
    absent = table.set_index("claim_id").loc["absent"]
    assert absent["verdict"] == "inconclusive"
    assert absent["reason"] == ("signature coverage too low: 0 of 3 genes of 'absent' found "
                                "(min_genes 3)")
    assert np.isfinite(table.set_index("claim_id").loc["present", "p_value"])


def test_sample_that_loses_every_cell_in_qc_is_reported():
    """QC of a sample whose every cell fails (mitochondrial cap 0% from the sample sheet, every
    cell with mitochondrial counts): an empty sample and a table saying so, not a crash."""
    adata = _adata(n_samples=1, n_cells=150)
    counts = adata.X.toarray()
    counts[:, adata.var_names.str.startswith("mt-")] += 5
    adata.X = sp.csr_matrix(counts)
    adata.layers["counts"] = adata.X.copy()
    settings = QCSettings.from_config({"doublets": {"detect": False}}, {"qc_max_pct_mt": "0"},
                                      seed=0)
    _, kept, row = run_qc(adata, settings, species="mouse")
    assert kept.n_obs == 0
    assert row["n_cells_in"] == 150 and row["n_cells_out"] == 0


def test_study_continues_without_a_sample_that_lost_every_cell(tmp_path):
    empty = _adata(n_samples=1, n_cells=10)[:0].copy()
    full = _adata(n_samples=2, n_cells=50, seed=1)
    full.obs["sample"] = full.obs["sample"].map({"s0": "kept0", "s1": "kept1"})
    paths = []
    for name, a in (("emptied", empty), ("kept", full)):
        paths.append(tmp_path / f"{name}.h5ad")
        a.write_h5ad(paths[-1])
    merged = read_samples(paths, join="inner", batch_key="sample")
    assert merged.n_obs == full.n_obs
    assert set(merged.obs["sample"].astype(str)) == {"kept0", "kept1"}


def test_summary_says_which_sample_lost_every_cell():
    scores, coverage = _scores({"injury": 3, "injury_msc": 3})
    table, _ = evaluate_study(scores, coverage, CATALOGUE, "x",
                              {"method": "pseudobulk_z"}, {"methods": ["pseudobulk_z"]})
    qc = pd.DataFrame({"study": "x", "sample": ["injury_0", "injury_msc_9"],
                       "n_cells_in": [300, 250], "n_removed": [20, 250],
                       "n_cells_out": [280, 0]})
    text = render_markdown(build_summary(table, None, figures={}, claim_figure_dirs={"x": "d"},
                                         qc={"x": qc}))
    line = next((ln for ln in text.splitlines() if "injury_msc_9" in ln and "|" not in ln), "")
    assert "every cell" in line or "no cells" in line, text


# --- downloads ------------------------------------------------------------------------------------

def test_download_with_wrong_checksum_is_refused_and_removed(project):
    data = b"not the file the study file describes\n" * 100
    wrong = hashlib.sha256(b"something else").hexdigest()
    with FileServer() as server:
        server.add("/files/s1.h5ad", data)
        spec = {"id": "sums", "title": "t", "species": "mouse", "source": "url",
                "files": [{"name": "s1.h5ad", "url": f"{server.url}/files/s1.h5ad",
                           "layout": "sample_file", "sha256": wrong}],
                "samples": [{"sample": "s1", "arm": "healthy", "path": "s1.h5ad",
                             "format": "h5ad", "file": "s1.h5ad"}]}
        (project / "config" / "studies" / "sums.yaml").write_text(yaml.safe_dump(spec))
        args = ("fetch_all", "--config", "studies=[sums]", 'fetch={"retries": 0}')
        for _ in range(2):  # the rerun downloads again and fails again: nothing was trusted
            proc = snakemake(project, *args)
            assert proc.returncode != 0, proc.out[-3000:]
            assert "s1.h5ad" in proc.out and "sha256" in proc.out and wrong in proc.out
            assert "sums.yaml" in proc.out, proc.out[-3000:]
            assert TRACEBACK not in proc.out, proc.out[-3000:]
            downloads = project / "resources" / "sums" / "downloads"
            assert not any(downloads.glob("s1.h5ad*")) if downloads.exists() else True
            assert not (project / "resources" / "sums" / "s1.h5ad").exists()

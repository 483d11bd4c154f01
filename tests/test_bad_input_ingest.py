"""Bad input files at the ingest stage: one test per case.

Each case goes through the ingest rule's entry point (``livermsc.runner.run`` calling
``livermsc.ingest:rule_ingest``, as the rule does) and asserts the specific
:class:`IngestError`, that its message names the file and what was expected, that the rule's
output does not exist afterwards and that the log file holds the reason. Three cases also run
through ``snakemake`` on a one-sample local study, to show that the user sees the message and
no Python traceback, and that no output is left. Config-level cases are in test_bad_input.py.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import scipy.sparse as sp
import yaml
from _ingest_writers import write_10x_h5, write_dense, write_h5ad, write_mtx
from livermsc.ingest import IngestError
from livermsc.runner import run

REPO = Path(__file__).resolve().parents[1]
TRACEBACK = "Traceback (most recent call last)"
GENES = ["Actb", "Gapdh", "mt-Co1", "Alb", "Apoa1", "Cd68", "Dcn", "Stab2", "Krt19", "Cd3e",
         "Ptprc", "Lyz2"]
IDS = [f"ENSMUSG{i:011d}" for i in range(len(GENES))]
N_CELLS = 6
BARCODES = [f"AAACCTGAGAAGGC{i:02d}-1" for i in range(N_CELLS)]


def _counts() -> sp.csr_matrix:
    return sp.csr_matrix(np.arange(N_CELLS * len(GENES)).reshape(N_CELLS, len(GENES)) % 7)


class _Outputs(SimpleNamespace):
    """``smk.output``: named and iterable, as Snakemake's."""

    def __iter__(self):
        return iter(vars(self).values())


def ingest_rule(tmp_path: Path, data: Path, fmt: str, species: str = "mouse") -> SimpleNamespace:
    """The Snakemake object the ingest rule's script gets for one sample reading ``data``."""
    out = tmp_path / "results" / "bad" / "raw" / "s1.h5ad"
    return SimpleNamespace(
        input=SimpleNamespace(data=str(data)), output=_Outputs(h5ad=str(out)),
        log=[str(tmp_path / "logs" / "ingest.log")], rule="ingest",
        wildcards=SimpleNamespace(study="bad", sample="s1"),
        params=SimpleNamespace(entry="livermsc.ingest:rule_ingest", simulated=False,
                               species=species, combined={},
                               sample_row={"sample": "s1", "arm": "healthy", "path": data.name,
                                           "format": fmt}))


def refused(tmp_path: Path, data: Path, fmt: str, *needles: str, species: str = "mouse") -> str:
    """The ingest rule refuses ``data`` with every needle in the message (which starts with
    the file's path), logs it and leaves no output; returns the message."""
    smk = ingest_rule(tmp_path, data, fmt, species)
    with pytest.raises(IngestError) as err:
        run(smk)
    message = str(err.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    assert message.startswith(str(data)), message
    assert not Path(smk.output.h5ad).exists()
    log = Path(smk.log[0]).read_text()
    assert "rule ingest failed: IngestError" in log and needles[0] in log
    return message


# --- one test per case ---------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["h5ad", "10x_h5", "csv", "seurat"])
def test_empty_file(tmp_path, fmt):
    data = tmp_path / f"empty.{fmt}"
    data.write_bytes(b"")
    refused(tmp_path, data, fmt, "the file is empty (0 bytes", f"expected a {fmt} file")


def test_empty_file_inside_a_10x_folder(tmp_path):
    folder = write_mtx(tmp_path / "s1", _counts(), IDS, GENES, BARCODES)
    (folder / "matrix.mtx.gz").write_bytes(b"")
    msg = refused(tmp_path, folder, "10x_mtx", "matrix.mtx.gz: the file is empty (0 bytes",
                  "expected part of a 10x mtx folder")
    assert msg.startswith(str(folder / "matrix.mtx.gz"))


@pytest.mark.parametrize("member", ["matrix.mtx.gz", "features.tsv.gz", "barcodes.tsv.gz"])
def test_truncated_gzip_in_a_10x_folder(tmp_path, member):
    folder = write_mtx(tmp_path / "s1", _counts(), IDS, GENES, BARCODES)
    whole = (folder / member).read_bytes()
    (folder / member).write_bytes(whole[: len(whole) // 2])
    expected = "not a readable Matrix Market file" if member.startswith("matrix") else \
        "cannot be read as a tab-separated table"
    msg = refused(tmp_path, folder, "10x_mtx", member, expected,
                  "Compressed file ended before the end-of-stream marker was reached")
    assert msg.startswith(str(folder / member))


def test_truncated_gzip_table(tmp_path):
    data = write_dense(tmp_path / "s1.csv.gz", _counts(), GENES, BARCODES)
    whole = data.read_bytes()
    data.write_bytes(whole[: len(whole) // 2])
    refused(tmp_path, data, "csv", "cannot be read as a CSV table", "Compressed file ended")


@pytest.mark.parametrize("damage", ["truncated", "overwritten", "not_hdf5"])
def test_corrupt_h5ad(tmp_path, damage):
    data = write_h5ad(tmp_path / "s1.h5ad", _counts(), IDS, GENES, BARCODES)
    raw = bytearray(data.read_bytes())
    if damage == "truncated":  # a download cut short
        data.write_bytes(bytes(raw[: len(raw) // 2]))
        needle = "not a readable HDF5/h5ad file (Unable to synchronously open file (truncated"
    elif damage == "overwritten":  # header intact, internal structures damaged
        for i in range(3000, len(raw) - 200, 7):
            raw[i] = (raw[i] + 13) % 256
        data.write_bytes(bytes(raw))
        needle = "damaged h5ad file, cannot be read"
    else:  # some other file renamed .h5ad
        data.write_text("gene,cell_1\nActb,3\n")
        needle = "not a readable HDF5/h5ad file (Unable to synchronously open file (file " \
                 "signature not found"
    refused(tmp_path, data, "h5ad", needle)


def test_10x_folder_missing_barcodes(tmp_path):
    folder = write_mtx(tmp_path / "s1", _counts(), IDS, GENES, BARCODES)
    (folder / "barcodes.tsv.gz").unlink()
    refused(tmp_path, folder, "10x_mtx", "file not found: barcodes.tsv[.gz] (10x mtx folder)")


def test_matrix_and_barcode_dimensions_disagree(tmp_path):
    folder = write_mtx(tmp_path / "s1", _counts(), IDS, GENES, BARCODES[:-1])
    msg = refused(tmp_path, folder, "10x_mtx",
                  f"shape ({len(GENES)}, {N_CELLS}) does not match {len(GENES)} features x "
                  f"{N_CELLS - 1} barcodes listed in features.tsv.gz, barcodes.tsv.gz")
    assert msg.startswith(str(folder / "matrix.mtx.gz"))
    h5 = write_10x_h5(tmp_path / "s1.h5", _counts(), IDS, GENES, BARCODES)
    with h5py.File(h5, "a") as fh:
        del fh["matrix/barcodes"]
        fh["matrix/barcodes"] = np.array(BARCODES[:-1], dtype="S")
    refused(tmp_path, h5, "10x_h5", f"shape ({len(GENES)}, {N_CELLS}) does not match "
            f"{len(GENES)} features x {N_CELLS - 1} barcodes")


def test_non_integer_counts(tmp_path):
    data = write_h5ad(tmp_path / "s1.h5ad", _counts() * 0.5, IDS, GENES, BARCODES)
    refused(tmp_path, data, "h5ad", "of the non-zero values are not integers (e.g. 0.5",
            "normalised or log-transformed", "ingest needs raw counts")


def test_negative_counts(tmp_path):
    X = _counts().toarray().astype(float)
    X[2, 3] = -4
    data = write_h5ad(tmp_path / "s1.h5ad", sp.csr_matrix(X), IDS, GENES, BARCODES)
    refused(tmp_path, data, "h5ad", "the matrix holds negative values (e.g. -4.0)",
            "expected raw counts")


def test_all_zero_sample(tmp_path):
    data = write_10x_h5(tmp_path / "s1.h5", sp.csr_matrix((N_CELLS, len(GENES))), IDS, GENES,
                        BARCODES)
    refused(tmp_path, data, "10x_h5",
            f"the count matrix is empty ({N_CELLS} cells x {len(GENES)} genes, 0 non-zero values)")


def test_gene_symbols_of_the_wrong_species(tmp_path):
    folder = write_mtx(tmp_path / "s1", _counts(), IDS, [g.upper() for g in GENES], BARCODES)
    refused(tmp_path, folder, "10x_mtx", "the gene symbols do not fit the declared species "
            "'mouse'", "the others look human (e.g. ACTB, GAPDH", "Check 'species' in the study")


def test_unknown_file_format(tmp_path):
    data = write_h5ad(tmp_path / "s1.loom", _counts(), IDS, GENES, BARCODES)
    refused(tmp_path, data, "loom", "unknown format 'loom' (expected one of ['10x_mtx', "
            "'10x_h5', 'h5ad', 'seurat', 'csv', 'tsv'])")
    text = tmp_path / "s1.rds"
    text.write_text("not an R file\n")
    refused(tmp_path, text, "seurat", "not a readable R data file (.rds, .rda or .RData")


# --- through snakemake: what a user sees ----------------------------------------------------------

@pytest.fixture
def project(tmp_path) -> Path:
    """A scratch project folder: copies of config/ and seeds/."""
    for folder in ("config", "seeds"):
        shutil.copytree(REPO / folder, tmp_path / folder)
    return tmp_path


def _one_sample_study(work: Path, path: str, fmt: str) -> Path:
    """A local study 'bad' with one sample reading resources/bad/<path>."""
    (work / "config" / "studies" / "bad.yaml").write_text(yaml.safe_dump({
        "id": "bad", "title": "bad input", "species": "mouse", "source": "local",
        "samples": [{"sample": "s1", "arm": "healthy", "path": path, "format": fmt}]}))
    folder = work / "resources" / "bad"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _snakemake_refuses(work: Path, *needles: str) -> str:
    target = "results/bad/raw/s1.h5ad"
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
           "--directory", str(work), "--cores", "1", target, "--config", "studies=[bad]"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    for needle in needles:
        assert needle in out, f"{needle!r} not in:\n{out[-3000:]}"
    assert TRACEBACK not in out, out[-4000:]
    assert not (work / target).exists()
    assert "IngestError" in (work / "logs" / "ingest" / "bad" / "s1.log").read_text()
    return out


@pytest.mark.slow
def test_snakemake_empty_file(project):
    folder = _one_sample_study(project, "s1.h5ad", "h5ad")
    (folder / "s1.h5ad").write_bytes(b"")
    _snakemake_refuses(project, "resources/bad/s1.h5ad: the file is empty (0 bytes; expected a "
                       "h5ad file)", "rule ingest failed")


@pytest.mark.slow
def test_snakemake_truncated_gzip(project):
    folder = _one_sample_study(project, "s1", "10x_mtx")
    write_mtx(folder / "s1", _counts(), IDS, GENES, BARCODES)
    whole = (folder / "s1" / "matrix.mtx.gz").read_bytes()
    (folder / "s1" / "matrix.mtx.gz").write_bytes(whole[: len(whole) // 2])
    _snakemake_refuses(project, "resources/bad/s1/matrix.mtx.gz: not a readable Matrix Market "
                       "file (Compressed file ended before the end-of-stream marker")


@pytest.mark.slow
def test_snakemake_wrong_species(project):
    folder = _one_sample_study(project, "s1.h5", "10x_h5")
    write_10x_h5(folder / "s1.h5", _counts(), IDS, [g.upper() for g in GENES], BARCODES)
    _snakemake_refuses(project, "resources/bad/s1.h5: the gene symbols do not fit the declared "
                       "species 'mouse'")


"""Fetch: downloads against a local HTTP server (faults injected), GEO unpacking, study registry.

GEO-shaped files are built from real counts (the glioblastoma explant data in ../shared/data:
10 samples = 5 patients x DMSO / panobinostat) and served on 127.0.0.1; nothing leaves loopback.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp
import yaml
from _http_server import FileServer
from livermsc.cli import main
from livermsc.config import ConfigError, load_study
from livermsc.fetch import (
    FetchConfigError,
    FileSpec,
    StudyPlan,
    fetch_file,
    plan_study,
    unpack_study,
)
from livermsc.geo import geo_stem, geo_url
from livermsc.transfer import ChecksumMismatch, FetchError, FetchSettings, download
from livermsc.unpack import draft_sample_sheet

GSE = "GSE900001"
RAW = f"{GSE}_RAW.tar"
FAST = {"retries": 3, "backoff_s": 0.01, "backoff_max_s": 0.05, "progress_mb": 0.05}


def fetch_settings(**kw) -> FetchSettings:
    """Fetch settings: the schema's defaults, with ``kw`` replacing some."""
    return FetchSettings.from_config(kw)


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    """Requests to 127.0.0.1 must not go through a proxy configured in the environment."""
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


# --- real test data, GEO-shaped ------------------------------------------------------------------


@pytest.fixture(scope="module")
def gbm(shared_data) -> dict:
    """Per sample: counts (cells x genes, int), barcodes, gene ids and symbols, donor, condition."""
    import anndata as ad

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # barcodes repeat across samples
        a = ad.read_h5ad(shared_data / "glioblastoma_panobinostat_lemur" /
                         "glioblastoma_panobinostat_lemur.h5ad")
    out = {}
    for i, (sid, idx) in enumerate(a.obs.groupby("sample_id", observed=True).indices.items()):
        sub = a[idx]
        out[sid] = {
            "X": sp.csr_matrix(sub.X).astype(np.int64),
            "barcodes": [f"{bc}-{j}" for j, bc in enumerate(sub.obs_names)],
            "ids": sub.var["gene_id"].astype(str).tolist(),
            "genes": sub.var["symbol"].astype(str).tolist(),
            "donor": str(sub.obs["patient_id"].iloc[0]),
            "condition": str(sub.obs["condition"].iloc[0]),
            "gsm": f"GSM9000{i + 1:02d}",
        }
    assert len(out) == 10
    return out


def _gz(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=1, mtime=0)


def _mtx(X: sp.csr_matrix) -> bytes:
    buf = io.BytesIO()
    scipy.io.mmwrite(buf, X.T.tocoo(), field="integer")
    return buf.getvalue()


def _lines(rows) -> bytes:
    return "".join("\t".join(r) + "\n" for r in rows).encode()


def _triplet(s: dict, v3: bool = True) -> dict[str, bytes]:
    feats = [(i, g, "Gene Expression") if v3 else (i, g) for i, g in zip(s["ids"], s["genes"], strict=True)]
    return {"barcodes.tsv": _lines([(b,) for b in s["barcodes"]]),
            ("features.tsv" if v3 else "genes.tsv"): _lines(feats), "matrix.mtx": _mtx(s["X"])}


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _title(sid: str, s: dict, i: int) -> str:
    """Sample titles with GEO-like mixed case: PW030_Ctrl, PW030_PANOBINOSTAT, ..."""
    cond = s["condition"]
    return f"{s['donor']}_{cond.capitalize() if i % 2 == 0 else cond.upper()}"


def build_raw_tar(gbm: dict) -> bytes:
    """A GEO RAW.tar of per-GSM 10x files in every variant seen on GEO."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i, (sid, s) in enumerate(gbm.items()):
            prefix = f"{s['gsm']}_{_title(sid, s, i)}"
            if i == 0:  # 10x v2: genes.tsv, gzipped
                for n, d in _triplet(s, v3=False).items():
                    _add(tar, f"{prefix}_{n}.gz", _gz(d))
            elif i == 1:  # not gzipped at all
                for n, d in _triplet(s, v3=False).items():
                    _add(tar, f"{prefix}_{n}", d)
            elif i == 2:  # a nested tar.gz holding a cellranger folder
                inner = io.BytesIO()
                with tarfile.open(fileobj=inner, mode="w:gz") as t2:
                    for n, d in _triplet(s).items():
                        _add(t2, f"filtered_feature_bc_matrix/{n}.gz", _gz(d))
                _add(tar, f"{prefix}_filtered_feature_bc_matrix.tar.gz", inner.getvalue())
            elif i == 3:  # filtered and raw sets side by side: the filtered one is used
                for n, d in _triplet(s).items():
                    _add(tar, f"{prefix}_filtered_{n}.gz", _gz(d))
                raw = dict(s, X=sp.vstack([s["X"], sp.csr_matrix((5, s["X"].shape[1]), dtype=np.int64)]),
                           barcodes=s["barcodes"] + [f"EMPTY{j}" for j in range(5)])
                for n, d in _triplet(raw).items():
                    _add(tar, f"{prefix}_raw_{n}.gz", _gz(d))
            else:  # 10x v3, gzipped
                for n, d in _triplet(s).items():
                    _add(tar, f"{prefix}_{n}.gz", _gz(d))
        # a decoy whose GSM id starts with the first sample's id (GSM900001 vs GSM9000011)
        first = next(iter(gbm.values()))
        for n, d in _triplet(first).items():
            _add(tar, f"GSM9000011_blood_{n}.gz", _gz(d))
    return buf.getvalue()


def dense_csv(s: dict, cells_as_rows: bool = False) -> bytes:
    df = pd.DataFrame(s["X"].T.toarray(), index=s["genes"], columns=s["barcodes"])
    if cells_as_rows:
        df = df.T
    return _gz(df.to_csv().encode())


def combined_csv(gbm: dict) -> tuple[bytes, bytes]:
    """One genes x cells CSV of all samples (cells named <sample>_<barcode>) + a cell table."""
    blocks, cells, owner = [], [], []
    for sid, s in gbm.items():
        blocks.append(s["X"].T.toarray())
        cells += [f"{sid}_{b}" for b in s["barcodes"]]
        owner += [sid] * len(s["barcodes"])
    genes = next(iter(gbm.values()))["genes"]
    df = pd.DataFrame(np.hstack(blocks), index=genes, columns=cells)
    table = pd.DataFrame({"CellName": cells, "Sample": owner, "Cluster#": 1})
    return _gz(df.to_csv().encode()), _gz(table.to_csv(sep="\t", index=False).encode())


def read_10x(folder: Path) -> tuple[sp.csr_matrix, list[str], list[str]]:
    """(cells x genes counts, barcodes, gene symbols) of a 10x folder written by unpack."""
    names = {p.name.split(".")[0]: p for p in folder.iterdir()}
    with gzip.open(names["matrix"]) as fh:
        X = sp.csr_matrix(scipy.io.mmread(fh)).T.tocsr()
    feats = pd.read_csv(names.get("features", names.get("genes")), sep="\t", header=None)
    bcs = pd.read_csv(names["barcodes"], sep="\t", header=None)[0].astype(str).tolist()
    return X, bcs, feats[1].astype(str).tolist()


def write_study(studies_dir: Path, spec: dict) -> None:
    studies_dir.mkdir(parents=True, exist_ok=True)
    (studies_dir / f"{spec['id']}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))


def tar_study(gbm: dict, sid: str = "gbmtar") -> dict:
    rows = []
    for sample, s in gbm.items():
        rows.append({"sample": sample.replace("-", "_"),
                     "arm": "healthy" if s["condition"] == "ctrl" else "injury",
                     "animal": s["donor"], "gsm": s["gsm"], "path": sample.replace("-", "_"),
                     "format": "10x_mtx"})
    return {"id": sid, "title": "GEO-shaped test study", "species": "human", "source": "geo",
            "accession": GSE, "files": [{"name": RAW}], "samples": rows}


def ftp_path(name: str, acc: str = GSE) -> str:
    kind = "series" if acc.startswith("GSE") else "samples"
    return f"/geo/{kind}/{geo_stem(acc)}/{acc}/suppl/{name}"


@pytest.fixture(scope="module")
def raw_tar(gbm) -> bytes:
    return build_raw_tar(gbm)


@pytest.fixture()
def server():
    with FileServer() as srv:
        yield srv


def settings_for(srv: FileServer, **kw) -> FetchSettings:
    return fetch_settings(base_url=srv.url + "/geo", **{**FAST, **kw})


# --- URLs --------------------------------------------------------------------------------------


def test_geo_urls_follow_geo_layout():
    assert geo_stem("GSE136103") == "GSE136nnn"
    assert geo_stem("GSE1234") == "GSE1nnn" and geo_stem("GSE12") == "GSEnnn"
    ftp = fetch_settings()
    assert geo_url("GSE136103", "GSE136103_RAW.tar", ftp) == (
        "https://ftp.ncbi.nlm.nih.gov/geo/series/GSE136nnn/GSE136103/suppl/GSE136103_RAW.tar")
    assert geo_url("GSM3885177", "GSM3885177_CD45nCD31n_rep1.csv.gz", ftp) == (
        "https://ftp.ncbi.nlm.nih.gov/geo/samples/GSM3885nnn/GSM3885177/suppl/"
        "GSM3885177_CD45nCD31n_rep1.csv.gz")
    cgi = fetch_settings(geo_url_style="cgi")
    assert geo_url("GSE136103", "GSE136103_RAW.tar", cgi) == (
        "https://www.ncbi.nlm.nih.gov/geo/download/?acc=GSE136103&format=file")
    assert geo_url("GSE115469", "GSE115469_Data.csv.gz", cgi).endswith(
        "/geo/download/?acc=GSE115469&format=file&file=GSE115469_Data.csv.gz")
    with pytest.raises(ValueError, match="not a GEO"):
        geo_stem("E-MTAB-1")


def test_fetch_settings_take_every_default_from_the_schema():
    """FetchSettings repeats no default: each field is a schema property and takes its default."""
    schema = yaml.safe_load((Path(__file__).resolve().parents[1] / "workflow" / "schemas" /
                             "fetch.schema.yaml").read_text())
    props = schema["properties"]
    fields = dataclasses.fields(FetchSettings)
    assert {f.name for f in fields} == set(props)
    assert all(f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
               for f in fields)
    defaults = fetch_settings()
    assert {f.name: getattr(defaults, f.name) for f in fields} == {
        name: prop["default"] for name, prop in props.items()}
    assert fetch_settings(retries=1).retries == 1 and FetchSettings.from_config(None) == defaults
    with pytest.raises(ConfigError, match=r"field 'retries'.*minimum"):
        fetch_settings(retries=-1)


# --- full fetch -> unpack ------------------------------------------------------------------------


@pytest.mark.realdata
def test_full_fetch_and_unpack_regroups_every_geo_variant(gbm, raw_tar, server, tmp_path,
                                                          monkeypatch, caplog):
    """RAW.tar -> one 10x folder per GSM, counts identical to the source, whatever the variant."""
    monkeypatch.chdir(tmp_path)
    server.add(ftp_path(RAW), raw_tar)
    write_study(tmp_path / "studies", tar_study(gbm))
    study = load_study("gbmtar", tmp_path / "studies")
    settings = settings_for(server, cache_dir=str(tmp_path / "cache"))
    plan = plan_study(study, settings)
    assert plan.download_paths() == [f"resources/gbmtar/downloads/{RAW}"]
    dest = Path(plan.download_paths()[0])
    with caplog.at_level(logging.INFO, logger="livermsc.fetch"):
        result = fetch_file(plan.files[RAW], dest, settings, study="gbmtar",
                            study_file=str(study.path), checksums="resources/gbmtar/checksums.tsv")
    assert dest.read_bytes() == raw_tar
    assert result["status"] == "recorded"
    assert result["sha256"] == hashlib.sha256(raw_tar).hexdigest()
    assert "no checksum is known" in caplog.text and "MB (" in caplog.text  # progress lines
    sums = pd.read_csv("resources/gbmtar/checksums.tsv", sep="\t")
    assert sums.loc[0, "file"] == RAW and sums.loc[0, "status"] == "recorded"
    assert sums.loc[0, "sha256"] == result["sha256"]
    assert not list(dest.parent.glob("*.part"))

    manifest = unpack_study(StudyPlan.from_dict(plan.as_dict(for_unpack=True)), "resources/gbmtar/manifest.tsv")
    assert len(manifest) == 10
    for sample, s in gbm.items():
        folder = Path("resources/gbmtar") / sample.replace("-", "_")
        X, bcs, genes = read_10x(folder)
        assert bcs == s["barcodes"] and genes == s["genes"]
        assert (X != s["X"]).nnz == 0
        assert sorted(p.name for p in folder.iterdir())[0] == "barcodes.tsv.gz"
    first = manifest.set_index("sample").loc["PW030_701"]
    assert "genes.tsv.gz" in first["members"] and first["n_barcodes"] == 500
    third = manifest.set_index("sample").iloc[2]
    assert "filtered_feature_bc_matrix.tar.gz" in third["members"]
    fourth = manifest.set_index("sample").iloc[3]
    assert "_filtered_" in fourth["members"] and fourth["n_barcodes"] == 500  # not the raw set
    assert (Path("resources/gbmtar") / "PW030_701" / "genes.tsv.gz").exists()  # v2 kept as v2

    # a second checkout with the same cache: no request, verified against the recorded checksum
    n_requests = len(server.requests())
    other = tmp_path / "other" / RAW
    again = fetch_file(plan.files[RAW], other, settings, study="gbmtar")
    assert len(server.requests()) == n_requests and other.read_bytes() == raw_tar
    assert os.stat(other).st_ino == os.stat(tmp_path / "cache" / GSE / RAW).st_ino  # hard link
    assert again["sha256"] == result["sha256"]


@pytest.mark.realdata
def test_sample_files_and_combined_matrix_are_split_per_sample(gbm, server, tmp_path, monkeypatch):
    """Per-GSM dense CSVs are placed as they are; one combined CSV is split by barcode or table."""
    monkeypatch.chdir(tmp_path)
    items = list(gbm.items())
    combined, table = combined_csv(dict(items[:6]))  # samples 6-10 absent, 1-2 dropped by split
    server.add(ftp_path("GSE900001_combined.csv.gz"), combined)
    server.add(ftp_path("GSE900001_cells.tsv.gz"), table)
    files = [
        {"name": "GSE900001_combined.csv.gz", "layout": "combined", "format": "csv",
         "split": {"by": "barcode", "pattern": r"^(PW\d+-\d+)_"}},
        {"name": "GSE900001_combined_copy.csv.gz", "layout": "combined", "format": "csv",
         "url": "{base_url}/series/GSE900nnn/GSE900001/suppl/GSE900001_combined.csv.gz",
         "split": {"by": "table", "table": "GSE900001_cells.tsv.gz", "cell_column": "CellName",
                   "sample_column": "Sample"}},
        {"name": "GSE900001_cells.tsv.gz", "layout": "annotation"},
    ]
    rows = []
    for sid, s in items[:2]:  # per-sample CSVs, one genes x cells and one cells x genes
        name = f"{s['gsm']}_{sid}.csv.gz"
        server.add(ftp_path(name, s["gsm"]), dense_csv(s, cells_as_rows=sid == items[1][0]))
        files.append({"name": name, "layout": "sample_file", "acc": s["gsm"]})
        rows.append({"sample": f"file_{sid}", "arm": "healthy", "file": name,
                     "path": f"file_{sid}.csv.gz", "format": "csv",
                     "orientation": "cells_x_genes" if sid == items[1][0] else "genes_x_cells"})
    for sid, _ in items[2:5]:
        rows.append({"sample": f"bc_{sid}", "arm": "injury", "split_value": sid,
                     "file": "GSE900001_combined.csv.gz", "path": f"bc_{sid}", "format": "10x_mtx"})
        rows.append({"sample": f"tab_{sid}", "arm": "injury", "split_value": sid,
                     "file": "GSE900001_combined_copy.csv.gz", "path": f"tab/{sid}",
                     "format": "10x_mtx"})
    write_study(tmp_path / "studies", {"id": "mixed", "title": "t", "species": "human",
                                       "source": "geo", "accession": GSE, "files": files,
                                       "samples": rows})
    settings = settings_for(server)
    plan = plan_study(load_study("mixed", tmp_path / "studies"), settings)
    for name, fs in plan.files.items():
        fetch_file(fs, Path(plan.downloads_dir) / name, settings, study="mixed")
    unpack_study(plan, "resources/mixed/manifest.tsv")

    sid0, s0 = items[0]
    back = pd.read_csv(f"resources/mixed/file_{sid0}.csv.gz", index_col=0)
    assert back.shape == (len(s0["genes"]), 500) and int(back.to_numpy().sum()) == s0["X"].sum()
    for sid, s in items[2:5]:
        for folder in (Path(f"resources/mixed/bc_{sid}"), Path(f"resources/mixed/tab/{sid}")):
            X, bcs, genes = read_10x(folder)
            assert bcs == [f"{sid}_{b}" for b in s["barcodes"]] and genes == s["genes"]
            assert (X != s["X"]).nnz == 0


# --- download faults ---------------------------------------------------------------------------


DATA = bytes(range(256)) * 4096  # 1 MiB of known bytes
SHA = hashlib.sha256(DATA).hexdigest()


def test_server_error_is_retried_with_exponential_backoff(server, tmp_path):
    server.add("/f.bin", DATA)
    server.fault("/f.bin", "500", "503")
    waits: list[float] = []
    out = download(server.url + "/f.bin", tmp_path / "f.bin", sha256=SHA,
                   settings=fetch_settings(retries=3, backoff_s=1.0, backoff_max_s=10),
                   sleep=waits.append)
    assert (tmp_path / "f.bin").read_bytes() == DATA and out["status"] == "verified"
    assert [r[2] for r in server.requests()] == [500, 503, 200]
    assert waits == [1.0, 2.0] and out["attempts"] == 3


def test_not_found_is_a_clear_error_without_retry(server, tmp_path):
    spec = FileSpec(name="GSE1_missing.tar", url=server.url + "/geo/GSE1_missing.tar",
                    cache_key="GSE1")
    with pytest.raises(FetchError, match=r"x/GSE1_missing.tar: HTTP 404 .* for http://127\.0\.0\.1"):
        fetch_file(spec, tmp_path / "GSE1_missing.tar", fetch_settings(**FAST), study="x",
                   sleep=lambda s: None)
    assert len(server.requests()) == 1
    assert not list(tmp_path.iterdir())


def test_truncated_body_is_detected_and_resumed_with_range(server, tmp_path):
    server.add("/f.bin", DATA)
    server.fault("/f.bin", "truncate")
    out = download(server.url + "/f.bin", tmp_path / "f.bin", sha256=SHA,
                   settings=fetch_settings(**FAST), sleep=lambda s: None)
    assert (tmp_path / "f.bin").read_bytes() == DATA and out["status"] == "verified"
    (_, r1, c1), (_, r2, c2) = server.requests()
    assert (r1, c1) == (None, 200) and c2 == 206 and r2 == f"bytes={len(DATA) // 2}-"


def test_truncated_forever_gives_up_and_keeps_only_the_part_file(server, tmp_path):
    server.add("/f.bin", DATA)
    server.fault("/f.bin", *["truncate"] * 10)
    with pytest.raises(FetchError, match=r"giving up after 4 attempts.*truncated body.*kept"):
        download(server.url + "/f.bin", tmp_path / "f.bin", settings=fetch_settings(**FAST),
                 sleep=lambda s: None)
    assert not (tmp_path / "f.bin").exists()
    assert 0 < (tmp_path / "f.bin.part").stat().st_size < len(DATA)


def test_checksum_mismatch_is_an_error_and_leaves_no_file(server, tmp_path):
    server.add("/f.bin", DATA)
    with pytest.raises(ChecksumMismatch, match=r"got sha256 [0-9a-f]{64}, expected 0{64}.*deleted"):
        download(server.url + "/f.bin", tmp_path / "f.bin", sha256="0" * 64,
                 settings=fetch_settings(**FAST), sleep=lambda s: None)
    assert not list(tmp_path.iterdir())
    with pytest.raises(ChecksumMismatch, match="md5"):
        download(server.url + "/f.bin", tmp_path / "f.bin", md5="0" * 32,
                 settings=fetch_settings(**FAST), sleep=lambda s: None)
    assert not list(tmp_path.iterdir())


def test_interrupted_download_is_resumed_from_the_part_file(server, tmp_path):
    server.add("/f.bin", DATA)
    (tmp_path / "f.bin.part").write_bytes(DATA[:300_000])  # left by an interrupted run
    out = download(server.url + "/f.bin", tmp_path / "f.bin", sha256=SHA,
                   settings=fetch_settings(**FAST), sleep=lambda s: None)
    assert (tmp_path / "f.bin").read_bytes() == DATA and out["status"] == "verified"
    assert server.requests() == [("/f.bin", "bytes=300000-", 206)]
    assert not (tmp_path / "f.bin.part").exists()


def test_resume_edge_cases(server, tmp_path):
    """Range ignored (200): restart; part already complete (416): done; stale part: redo once."""
    server.add("/f.bin", DATA)
    server.fault("/f.bin", "ignore_range")
    (tmp_path / "a.part").write_bytes(DATA[:1000])
    download(server.url + "/f.bin", tmp_path / "a", sha256=SHA, settings=fetch_settings(**FAST))
    assert (tmp_path / "a").read_bytes() == DATA

    (tmp_path / "b.part").write_bytes(DATA)
    download(server.url + "/f.bin", tmp_path / "b", sha256=SHA, settings=fetch_settings(**FAST))
    assert (tmp_path / "b").read_bytes() == DATA and server.requests()[-1][2] == 416

    (tmp_path / "c.part").write_bytes(b"x" * 1000)  # stale bytes from another version
    download(server.url + "/f.bin", tmp_path / "c", sha256=SHA, settings=fetch_settings(**FAST))
    assert (tmp_path / "c").read_bytes() == DATA
    assert [r[1:] for r in server.requests()[-2:]] == [("bytes=1000-", 206), (None, 200)]


def test_offline_mode_uses_placed_files_or_names_the_missing_one(server, tmp_path):
    server.add("/geo/series/GSEnnn/GSE1/suppl/GSE1_RAW.tar", DATA)
    spec = FileSpec(name="GSE1_RAW.tar", url=server.url + "/geo/series/GSEnnn/GSE1/suppl/GSE1_RAW.tar",
                    sha256=SHA, cache_key="GSE1")
    offline = fetch_settings(offline=True, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(FetchError) as err:
        fetch_file(spec, tmp_path / "res" / "GSE1_RAW.tar", offline, study="s1")
    msg = str(err.value)
    assert "offline" in msg and str(tmp_path / "res" / "GSE1_RAW.tar") in msg
    assert str(tmp_path / "cache" / "GSE1" / "GSE1_RAW.tar") in msg and spec.url in msg
    assert SHA in msg and not server.requests()
    (tmp_path / "cache" / "GSE1").mkdir(parents=True, exist_ok=True)
    (tmp_path / "cache" / "GSE1" / "GSE1_RAW.tar").write_bytes(DATA)  # placed by the user
    out = fetch_file(spec, tmp_path / "res" / "GSE1_RAW.tar", offline, study="s1")
    assert out["status"] == "verified" and (tmp_path / "res" / "GSE1_RAW.tar").read_bytes() == DATA
    assert not server.requests()
    (tmp_path / "cache" / "GSE1" / "GSE1_RAW.tar").write_bytes(DATA[:-1] + b"!")
    with pytest.raises(ChecksumMismatch, match="cached copy"):
        fetch_file(spec, tmp_path / "res2" / "GSE1_RAW.tar", offline, study="s1")


def test_cgi_style_urls_are_served(server, tmp_path):
    server.add(f"/geo/download/?acc={GSE}&format=file", DATA)
    settings = fetch_settings(base_url=server.url + "/geo", geo_url_style="cgi", **FAST)
    out = download(geo_url(GSE, RAW, settings), tmp_path / RAW, settings=settings)
    assert out["sha256"] == SHA


# --- validation and unpack errors ---------------------------------------------------------------


def _study(tmp_path: Path, files: list[dict], rows: list[dict], **extra) -> object:
    spec = {"id": "v", "title": "t", "species": "mouse", "source": "geo", "files": files,
            "samples": rows, **extra}
    write_study(tmp_path, spec)
    return load_study("v", tmp_path)


@pytest.mark.parametrize(("files", "row", "extra", "message"), [
    ([{"name": RAW}], {"gsm": "GSM1", "path": "a"}, {"accession": GSE},
     r"sample 'a': field 'format' is required"),
    ([{"name": RAW}, {"name": "GSE900001_other.tar"}], {"path": "a", "format": "10x_mtx"},
     {"accession": GSE}, r"cannot tell which file holds this sample"),
    ([{"name": RAW}], {"path": "a", "format": "10x_mtx"}, {"accession": GSE},
     r"needs 'gsm' \(GEO sample accession\) or 'member'"),
    ([{"name": RAW}, {"name": "x.csv", "layout": "sample_file"}],
     {"path": "a", "format": "10x_mtx", "file": RAW}, {"accession": GSE},
     r"needs 'gsm' \(GEO sample accession\) or 'member'"),
    ([{"name": RAW}], {"gsm": "GSM1", "path": "a", "format": "10x_mtx", "file": "nope"},
     {"accession": GSE}, r"'nope' is not one of the study's files"),
    ([{"name": RAW}], {"gsm": "GSM1", "path": "../a", "format": "10x_mtx"}, {"accession": GSE},
     r"field 'path': '\.\./a'"),
    ([{"name": RAW}], {"gsm": "GSM1", "path": "a", "format": "10x_mtx"}, {},
     r"no URL for 'GSE900001_RAW.tar': give 'url', or a GEO 'accession'"),
    ([{"name": "c.csv", "layout": "combined", "format": "csv",
       "split": {"by": "barcode", "pattern": "^(x)"}}],
     {"path": "a", "format": "10x_mtx"}, {"accession": GSE}, r"needs 'split_value'"),
    ([{"name": "c.csv", "layout": "combined", "format": "csv", "split": {"by": "barcode"}}],
     {"path": "a", "format": "10x_mtx", "split_value": "x"}, {"accession": GSE},
     r"needs 'format' and 'split' with \['pattern'\]"),
    ([{"name": "c.csv", "layout": "combined", "format": "csv",
       "split": {"by": "table", "table": "t.tsv", "cell_column": "c", "sample_column": "s"}}],
     {"path": "a", "format": "10x_mtx", "split_value": "x"}, {"accession": GSE},
     r"split table 't.tsv' must be another entry of 'files' with layout annotation"),
    ([{"name": RAW}], {"member": "(", "path": "a", "format": "10x_mtx"}, {"accession": GSE},
     r"field 'member': '\(' is not a valid regex"),
])
def test_plan_errors_name_study_sample_and_field(tmp_path, files, row, extra, message):
    study = _study(tmp_path, files, [{"sample": "a", "arm": "healthy", **row}], **extra)
    with pytest.raises(FetchConfigError, match=message) as err:
        plan_study(study, fetch_settings())
    assert "v.yaml" in str(err.value)


@pytest.mark.realdata
def test_unpack_errors_are_specific(gbm, raw_tar, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("resources/v/downloads").mkdir(parents=True)
    Path(f"resources/v/downloads/{RAW}").write_bytes(raw_tar)
    files = [{"name": RAW}]
    missing = _study(tmp_path, files, [{"sample": "a", "arm": "x", "gsm": "GSM123",
                                        "path": "a", "format": "10x_mtx"}], accession=GSE)
    with pytest.raises(FetchError, match=r"no member of GSE900001_RAW.tar starts with 'GSM123' "
                                         r"\(it holds: GSM900001, GSM9000011, GSM900002"):
        unpack_study(plan_study(missing, fetch_settings()))
    both = _study(tmp_path, files, [{"sample": "a", "arm": "x", "gsm": "GSM900004",
                                     "member": "GSM900004.*(filtered|raw)_(barcodes|features|matrix)",
                                     "path": "a", "format": "10x_mtx"}], accession=GSE)
    tar_names = tarfile.open(f"resources/v/downloads/{RAW}").getnames()
    assert any("GSM900004" in n and "_raw_" in n for n in tar_names)
    plan = plan_study(both, fetch_settings())
    assert unpack_study(plan).loc[0, "n_barcodes"] == 500  # filtered preferred
    wrong_format = _study(tmp_path, files, [{"sample": "a", "arm": "x", "gsm": "GSM900005",
                                             "path": "a.h5", "format": "10x_h5"}], accession=GSE)
    with pytest.raises(FetchError, match=r"no 10x_h5 file among"):
        unpack_study(plan_study(wrong_format, fetch_settings()))
    # a triplet whose files do not belong together: nothing is put in place
    bad = io.BytesIO()
    first = next(iter(gbm.values()))
    with tarfile.open(fileobj=bad, mode="w") as tar:
        for n, d in _triplet(first).items():
            _add(tar, f"GSM7_x_{n}.gz", _gz(d + b"EXTRA\n" if n == "barcodes.tsv" else d))
    Path("resources/v/downloads/GSE900007_RAW.tar").write_bytes(bad.getvalue())
    mismatched = _study(tmp_path, [{"name": "GSE900007_RAW.tar"}],
                        [{"sample": "a7", "arm": "x", "gsm": "GSM7", "path": "a7",
                          "format": "10x_mtx"}], accession="GSE900007")
    with pytest.raises(FetchError, match=r"matrix is 300 x 500 but there are 300 features and "
                                         r"501 barcodes"):
        unpack_study(plan_study(mismatched, fetch_settings()))
    assert not Path("resources/v/a7").exists()
    # a hand-placed download that does not match the pinned checksum
    pinned = _study(tmp_path, [{"name": RAW, "sha256": "1" * 64}],
                    [{"sample": "a", "arm": "x", "gsm": "GSM900005", "path": "a",
                      "format": "10x_mtx"}], accession=GSE)
    with pytest.raises(ChecksumMismatch, match="does not match the checksum"):
        unpack_study(plan_study(pinned, fetch_settings()))


@pytest.mark.realdata
def test_draft_sample_sheet_lists_each_gsm_once(raw_tar, tmp_path):
    (tmp_path / RAW).write_bytes(raw_tar)
    sheet = draft_sample_sheet(tmp_path / RAW)
    assert sheet["gsm"].tolist() == [f"GSM9000{i:02d}" for i in range(1, 11)] + ["GSM9000011"]
    assert set(sheet["format"]) == {"10x_mtx"} and sheet["sample"].is_unique
    assert sheet.loc[0, "title"] == "PW030_Ctrl" and sheet.loc[0, "sample"] == "pw030_ctrl"


# --- the registry --------------------------------------------------------------------------------


REPO = Path(__file__).resolve().parents[1]
READY = ["GSE136103", "GSE171904", "GSE129516", "GSE132662", "GSE115469"]
PENDING = ["GSE137720", "chen2024_mensc", "zheng2025_msc_fstl1", "takeuchi2021_msc_sev",
           "msc_ccl4_ali"]


def test_registry_studies_validate_and_plan():
    counts = {"GSE136103": (20, {"healthy": 11, "injury": 9}, "human"),
              "GSE171904": (3, {"healthy": 1, "injury": 1, "injury_bdl": 1}, "mouse"),
              "GSE129516": (6, {"healthy": 3, "injury": 3}, "mouse"),
              "GSE132662": (6, {"cd45neg_cd31neg": 4, "hsc_culture_d0": 2}, "mouse"),
              "GSE115469": (5, {"healthy": 5}, "human")}
    for sid in READY:
        study = load_study(sid, REPO / "config" / "studies")
        plan = plan_study(study, fetch_settings())
        n, arms, species = counts[sid]
        assert len(plan.samples) == n and study.species == species
        assert study.samples["arm"].value_counts().to_dict() == arms
        assert all(fs.url.startswith("https://ftp.ncbi.nlm.nih.gov/geo/") for fs in plan.files.values())
    ram = load_study("GSE136103", REPO / "config" / "studies").samples
    assert ram["animal"].nunique() == 10 and set(ram["fraction"]) == {"cd45pos", "cd45neg"}
    for sid in PENDING:
        with pytest.raises(ConfigError, match=r"field 'status'.*(accession|mapped to arms)"):
            load_study(sid, REPO / "config" / "studies")


def _workflow_copy(dest: Path) -> Path:
    """A copy of the workflow (Snakefile, workflow/, config/, envs/, seeds/) to run Snakemake in."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "Snakefile", dest / "Snakefile")
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for sub in ("workflow", "config", "envs", "seeds"):
        if (REPO / sub).exists():
            shutil.copytree(REPO / sub, dest / sub, ignore=ignore)
    return dest


def _snakemake(workdir: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "no_proxy": "127.0.0.1,localhost"}
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        env.pop(var, None)
    return subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def _job_counts(output: str) -> dict[str, int]:
    lines = output.split("Job stats:")[1].splitlines()[3:]
    counts = {}
    for line in lines:
        parts = line.split()
        if len(parts) != 2 or parts[0] == "total":
            break
        counts[parts[0]] = int(parts[1])
    return counts


def test_dry_run_plans_downloads_and_unpacks_of_every_registered_study(tmp_path):
    """All ready studies, mouse and human, in one invocation; pending ones stop with the reason."""
    work = _workflow_copy(tmp_path / "wf")
    targets = [f"results/{sid}/qc/qc_summary.tsv" for sid in READY]
    proc = _snakemake(work, "-n", "--cores", "1", "--config", f"studies=[{','.join(READY)}]",
                      "--", "fetch_all", *targets)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    counts = _job_counts(proc.stdout)
    assert counts["fetch_file"] == 6  # one RAW.tar each, plus the MacParland matrix + cell table
    assert all(counts[f"unpack_{sid}"] == 1 for sid in READY)
    n_samples = 20 + 3 + 6 + 6 + 5
    assert counts["ingest"] == counts["qc"] == n_samples and counts["qc_summary"] == len(READY)
    assert "resources/GSE136103/healthy1_cd45neg_a" in proc.stdout  # where ingest reads
    proc = _snakemake(work, "-n", "--cores", "1", "--config", "studies=[GSE137720]")
    assert proc.returncode != 0 and "mapped to arms" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


@pytest.mark.slow
@pytest.mark.realdata
def test_snakemake_fetches_unpacks_ingests_and_qcs_a_geo_study(gbm, raw_tar, tmp_path):
    """End to end in a copy of the workflow: local GEO server -> fetch -> unpack -> ingest -> qc."""
    work = _workflow_copy(tmp_path / "wf")
    spec = tar_study(gbm, sid="gbm_e2e")
    keep = {r["sample"] for r in spec["samples"] if r["animal"] == "PW030"}  # ctrl + treated
    spec["samples"] = [r for r in spec["samples"] if r["sample"] in keep]
    write_study(tmp_path / "studies", spec)
    with FileServer() as srv:
        srv.add(ftp_path(RAW), raw_tar)
        srv.fault(ftp_path(RAW), "500", "truncate")  # retried, then resumed
        (tmp_path / "run.yaml").write_text(yaml.safe_dump({
            "studies": ["gbm_e2e"], "studies_dir": str(tmp_path / "studies"),
            "fetch": {"base_url": f"{srv.url}/geo", "retries": 3, "backoff_s": 0.01,
                      "cache_dir": str(tmp_path / "cache")}}))
        proc = _snakemake(work, "--cores", "2", "--configfile", str(tmp_path / "run.yaml"),
                          "--", "results/gbm_e2e/qc/qc_summary.tsv")
        requests = srv.requests(ftp_path(RAW))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert [r[2] for r in requests] == [500, 200, 206]
    log = (work / f"logs/fetch_file/gbm_e2e/{RAW}.log").read_text()
    assert "retrying" in log and "resuming" in log and "recorded sha256" in log
    sums = pd.read_csv(work / "resources/gbm_e2e/checksums.tsv", sep="\t")
    assert sums.loc[0, "sha256"] == hashlib.sha256(raw_tar).hexdigest()
    summary = pd.read_csv(work / "results/gbm_e2e/qc/qc_summary.tsv", sep="\t")
    assert sorted(summary["sample"]) == sorted(keep)
    import anndata as ad

    arms = set()
    for sample in keep:
        raw = ad.read_h5ad(work / f"results/gbm_e2e/raw/{sample}.h5ad")
        arms |= set(raw.obs["arm"].astype(str))
        assert raw.n_obs == 500 and set(raw.obs["sample"].astype(str)) == {sample}
    assert arms == {"healthy", "injury"}


def test_command_line_downloads_a_study_and_drafts_a_sheet(server, tmp_path, monkeypatch, capsys):
    """`livermsc download/draft-sheet`: the path a needs_sample_sheet study points to."""
    monkeypatch.chdir(tmp_path)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in ("GSM100_Healthy1_Cd45+_barcodes.tsv.gz", "GSM100_Healthy1_Cd45+_genes.tsv.gz",
                     "GSM100_Healthy1_Cd45+_matrix.mtx.gz", "GSM101_Cirrhotic2_CD45-_matrix.mtx.gz",
                     "GSM102_sample3.csv.gz"):
            _add(tar, name, b"x")
    server.add(ftp_path("GSE900002_RAW.tar", "GSE900002"), buf.getvalue())
    spec = {"id": "pending", "title": "t", "species": "human", "source": "geo",
            "status": "needs_sample_sheet", "accession": "GSE900002",
            "files": [{"name": "GSE900002_RAW.tar"}]}
    write_study(tmp_path, spec)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump({"fetch": {"base_url": server.url + "/geo"}}))
    assert main(["download", "pending.yaml", "--configfile", "cfg.yaml"]) == 0
    tar_path = tmp_path / "resources/pending/downloads/GSE900002_RAW.tar"
    assert tar_path.read_bytes() == buf.getvalue()
    assert (tmp_path / "resources/pending/checksums.tsv").exists()
    capsys.readouterr()
    assert main(["draft-sheet", str(tar_path)]) == 0
    sheet = pd.read_csv(io.StringIO(capsys.readouterr().out), sep="\t")
    assert sheet["gsm"].tolist() == ["GSM100", "GSM101", "GSM102"]
    assert sheet["sample"].tolist() == ["healthy1_cd45pos", "cirrhotic2_cd45neg", "sample3"]
    assert sheet["format"].tolist() == ["10x_mtx", "10x_mtx", "csv"]
    assert sheet["path"].tolist()[2] == "sample3.csv.gz"
    assert main(["download", "missing.yaml"]) == 2


@pytest.mark.realdata
def test_h5_and_h5ad_inputs_are_extracted_decompressed_or_split_by_obs(shared_data, tmp_path,
                                                                        monkeypatch):
    """10x h5 / h5ad(.gz) members of a RAW.tar, and an h5ad.gz holding several samples."""
    import anndata as ad

    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        a = ad.read_h5ad(shared_data / "glioblastoma_panobinostat_lemur" /
                         "glioblastoma_panobinostat_lemur.h5ad")
    a.obs_names_make_unique()
    buf = io.BytesIO()
    a[:50].write_h5ad(tmp_path / "one.h5ad")
    h5ad_bytes = (tmp_path / "one.h5ad").read_bytes()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        _add(tar, "GSM1_liverA.h5ad.gz", _gz(h5ad_bytes))
        _add(tar, "GSM2_liverB_raw_feature_bc_matrix.h5", b"HDF-raw")
        _add(tar, "GSM2_liverB_filtered_feature_bc_matrix.h5", b"HDF-filtered")
    a.write_h5ad(tmp_path / "all.h5ad")
    downloads = Path("resources/h/downloads")
    downloads.mkdir(parents=True)
    (downloads / RAW).write_bytes(buf.getvalue())
    (downloads / "GSE900001_all.h5ad.gz").write_bytes(_gz((tmp_path / "all.h5ad").read_bytes()))
    files = [{"name": RAW},
             {"name": "GSE900001_all.h5ad.gz", "layout": "combined", "format": "h5ad",
              "split": {"by": "obs", "column": "sample_id"}}]
    rows = [{"sample": "a", "arm": "healthy", "gsm": "GSM1", "path": "a.h5ad", "format": "h5ad"},
            {"sample": "b", "arm": "healthy", "gsm": "GSM2", "path": "b.h5", "format": "10x_h5"},
            {"sample": "c", "arm": "injury", "split_value": "PW034-702", "path": "c.h5ad",
             "format": "h5ad"}]
    write_study(tmp_path, {"id": "h", "title": "t", "species": "human", "source": "geo",
                           "accession": GSE, "files": files, "samples": rows})
    unpack_study(plan_study(load_study("h", tmp_path), fetch_settings()))
    assert Path("resources/h/a.h5ad").read_bytes() == h5ad_bytes  # decompressed
    assert Path("resources/h/b.h5").read_bytes() == b"HDF-filtered"  # filtered preferred
    c = ad.read_h5ad("resources/h/c.h5ad")
    assert c.n_obs == 500 and set(c.obs["sample_id"]) == {"PW034-702"}
    ref = a[a.obs["sample_id"] == "PW034-702"]
    assert (sp.csr_matrix(c.X) != sp.csr_matrix(ref.X)).nnz == 0

"""`livermsc draft-study`: GEO SOFT / series-matrix metadata -> a study file marked for review.

The GEO files are written here in GEO's documented formats
(https://www.ncbi.nlm.nih.gov/geo/info/soft.html): a SOFT family file of ^SERIES / ^PLATFORM /
^SAMPLE blocks with ``!Attribute = value`` lines, and a series matrix whose ``!Sample_*`` rows
hold one tab-separated, quoted value per sample. Downloads go to a local HTTP server.
"""

from __future__ import annotations

import gzip
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from _http_server import FileServer
from livermsc.cli import main
from livermsc.config import ConfigError, load_study
from livermsc.draft import (
    GeoSample,
    draft_study,
    guess_arm,
    parse_series_matrix,
    parse_soft,
    read_series,
)
from livermsc.fetch import plan_study
from livermsc.transfer import FetchSettings

REPO = Path(__file__).resolve().parents[1]
ACC = "GSE900123"
FTP = "ftp://ftp.ncbi.nlm.nih.gov/geo"

#: (title, source, characteristics, arm expected): a CCl4 study with MSC and MSC-EV arms
SAMPLES = [
    ("Olive oil control, mouse 1", "liver", ["treatment: olive oil", "mouse id: O1"], "healthy"),
    ("Olive oil control, mouse 2", "liver", ["treatment: olive oil", "mouse id: O2"], "healthy"),
    ("CCl4 + PBS, mouse 3", "liver", ["treatment: CCl4 4 weeks + PBS", "mouse id: P3"],
     "injury"),
    ("CCl4 + PBS, mouse 4", "liver", ["treatment: CCl4 4 weeks + PBS", "mouse id: P4"],
     "injury"),
    ("CCl4 + UC-MSC, mouse 5", "liver", ["treatment: CCl4 4 weeks + hUC-MSC iv",
                                         "mouse id: M5"], "injury_msc"),
    ("CCl4 + UC-MSC, mouse 6", "liver", ["treatment: CCl4 4 weeks + hUC-MSC iv",
                                         "mouse id: M6"], "injury_msc"),
    ("CCl4 + MSC-EV, mouse 7", "liver", ["treatment: CCl4 4 weeks + MSC-derived exosomes",
                                         "mouse id: E7"], "injury_ev"),
    ("CCl4 + MSC-EV, mouse 8", "liver", ["treatment: CCl4 4 weeks + MSC-derived exosomes",
                                         "mouse id: E8"], "injury_ev"),
]
GSMS = [f"GSM99000{i + 1}" for i in range(len(SAMPLES))]


def _suppl(gsm: str) -> list[str]:
    stem = f"{FTP}/samples/GSM990nnn/{gsm}/suppl/{gsm}"
    return [f"{stem}_barcodes.tsv.gz", f"{stem}_features.tsv.gz", f"{stem}_matrix.mtx.gz"]


SERIES_FILES = [f"{FTP}/series/GSE900nnn/{ACC}/suppl/{ACC}_RAW.tar"]


def write_soft(path: Path, samples=SAMPLES, series_files=SERIES_FILES, per_sample=True,
               organism: str = "Mus musculus") -> Path:
    """A GEO SOFT family file (gzipped), as GEO serves GSE..._family.soft.gz."""
    lines = ["^DATABASE = GeoMiame", "!Database_name = Gene Expression Omnibus (GEO)",
             f"^SERIES = {ACC}", "!Series_title = Single-cell atlas of CCl4 liver fibrosis "
             "treated with MSC or MSC-EV", f"!Series_geo_accession = {ACC}",
             "!Series_status = Public on Jan 01 2024",
             "!Series_summary = Mice received CCl4 for 4 weeks and then MSC, MSC-derived "
             "exosomes or PBS.", "!Series_summary = Livers were profiled by scRNA-seq.",
             "!Series_overall_design = 8 mice, 2 per group, one 10x library each.",
             "!Series_type = Expression profiling by high throughput sequencing",
             "!Series_pubmed_id = 39999999"]
    lines += [f"!Series_sample_id = {g}" for g in GSMS[:len(samples)]]
    lines += [f"!Series_supplementary_file = {u}" for u in series_files]
    lines += ["!Series_platform_id = GPL24247", "^PLATFORM = GPL24247",
              "!Platform_title = Illumina NovaSeq 6000 (Mus musculus)",
              f"!Platform_organism = {organism}"]
    for gsm, (title, source, chars, _) in zip(GSMS, samples, strict=False):
        lines += [f"^SAMPLE = {gsm}", f"!Sample_title = {title}",
                  f"!Sample_geo_accession = {gsm}", "!Sample_status = Public on Jan 01 2024",
                  "!Sample_type = SRA", "!Sample_channel_count = 1",
                  f"!Sample_source_name_ch1 = {source}", f"!Sample_organism_ch1 = {organism}"]
        lines += [f"!Sample_characteristics_ch1 = {c}" for c in chars]
        lines += ["!Sample_molecule_ch1 = polyA RNA",
                  "!Sample_description = 10x Genomics 3' v3 library",
                  "!Sample_library_strategy = RNA-Seq"]
        suppl = _suppl(gsm) if per_sample else ["NONE"]
        lines += [f"!Sample_supplementary_file_{i + 1} = {u}" for i, u in enumerate(suppl)]
        lines += ["!Sample_table_begin", "ID_REF\tVALUE", "x\t1", "!Sample_table_end"]
    with gzip.open(path, "wt") as fh:
        fh.write("\n".join(lines) + "\n")
    return path


def write_series_matrix(path: Path, samples=SAMPLES) -> Path:
    """A GEO series matrix (gzipped), as GEO serves GSE..._series_matrix.txt.gz."""

    def row(key: str, values: list[str]) -> str:
        return "\t".join([f"!{key}", *(f'"{v}"' for v in values)])

    n = len(samples)
    lines = [row("Series_title", ["Single-cell atlas of CCl4 liver fibrosis treated with MSC or "
                                  "MSC-EV"]),
             row("Series_geo_accession", [ACC]),
             row("Series_summary", ["Mice received CCl4 for 4 weeks and then MSC, MSC-derived "
                                    "exosomes or PBS."]),
             row("Series_summary", ["Livers were profiled by scRNA-seq."]),
             row("Series_overall_design", ["8 mice, 2 per group, one 10x library each."]),
             row("Series_pubmed_id", ["39999999"]),
             row("Series_sample_id", [" ".join(GSMS[:n])]),
             *(row("Series_supplementary_file", [u]) for u in SERIES_FILES),
             "",
             row("Sample_title", [s[0] for s in samples]),
             row("Sample_geo_accession", GSMS[:n]),
             row("Sample_status", ["Public on Jan 01 2024"] * n),
             row("Sample_source_name_ch1", [s[1] for s in samples]),
             row("Sample_organism_ch1", ["Mus musculus"] * n)]
    for k in range(max(len(s[2]) for s in samples)):
        lines.append(row("Sample_characteristics_ch1", [s[2][k] for s in samples]))
    for k in range(3):
        lines.append(row(f"Sample_supplementary_file_{k + 1}", [_suppl(g)[k] for g in GSMS[:n]]))
    lines += ["!series_matrix_table_begin", "\t".join(['"ID_REF"', *(f'"{g}"' for g in GSMS)]),
              "!series_matrix_table_end"]
    with gzip.open(path, "wt") as fh:
        fh.write("\n".join(lines) + "\n")
    return path


def _summary(series) -> list[tuple]:
    return [(s.gsm, s.title, s.source, s.organism, s.characteristics, s.supplementary)
            for s in series.samples]


def test_soft_and_series_matrix_give_the_same_samples(tmp_path):
    soft = parse_soft(write_soft(tmp_path / "f.soft.gz"))
    matrix = parse_series_matrix(write_series_matrix(tmp_path / "m.txt.gz"))
    assert soft.accession == matrix.accession == ACC
    assert [s.gsm for s in soft.samples] == GSMS
    assert soft.samples[4].title == "CCl4 + UC-MSC, mouse 5"
    assert soft.samples[4].characteristics == [("treatment", "CCl4 4 weeks + hUC-MSC iv"),
                                               ("mouse id", "M5")]
    assert soft.samples[0].supplementary == _suppl(GSMS[0])
    assert soft.supplementary == matrix.supplementary == SERIES_FILES
    assert soft.summary == matrix.summary and soft.pubmed == matrix.pubmed == ["39999999"]
    assert _summary(soft) == _summary(matrix)
    assert read_series(tmp_path / "m.txt.gz").accession == ACC


def test_draft_guesses_arms_and_marks_every_guess_for_review(tmp_path):
    series = parse_soft(write_soft(tmp_path / "f.soft.gz"))
    draft = draft_study(series, source_file="f.soft.gz")
    assert [r["arm"] for r in draft.rows] == [s[3] for s in SAMPLES]
    assert [r["animal"] for r in draft.rows] == ["O1", "O2", "P3", "P4", "M5", "M6", "E7", "E8"]
    assert all(r["format"] == "10x_mtx" and r["gsm"] == r["sample"] == r["path"]
               for r in draft.rows)
    assert draft.rows[4]["treatment"] == "CCl4 4 weeks + hUC-MSC iv"
    assert draft.rows[4]["mouse_id"] == "M5" and draft.rows[4]["title"] == SAMPLES[4][0]
    spec = yaml.safe_load(draft.text)
    assert spec["status"] == "needs_review" and spec["source"] == "geo"
    assert spec["species"] == "mouse" and spec["model"] == "CCl4"
    assert spec["files"] == [{"name": f"{ACC}_RAW.tar"}]
    row_lines = [ln for ln in draft.text.splitlines() if ln.startswith("  - {sample:")]
    assert len(row_lines) == len(SAMPLES)
    assert all("# REVIEW arm guessed from" in ln for ln in row_lines)
    assert "from 'MSC', 'CCl4'" in row_lines[4] and "'exosom'" in row_lines[6]
    assert "39999999" in draft.text and "Overall design: 8 mice" in draft.text


def test_draft_is_refused_until_reviewed_then_valid(tmp_path):
    series = parse_soft(write_soft(tmp_path / "f.soft.gz"))
    studies = tmp_path / "studies"
    studies.mkdir()
    text = draft_study(series).text
    (studies / f"{ACC}.yaml").write_text(text)
    with pytest.raises(ConfigError, match=rf"{ACC}\.yaml: field 'status': this study was drafted "
                       r"from GEO metadata .*REVIEW.*'status: ready'"):
        load_study(ACC, studies)
    (studies / f"{ACC}.yaml").write_text(text.replace("status: needs_review", "status: ready"))
    study = load_study(ACC, studies)
    assert study.samples["arm"].value_counts().to_dict() == {
        "healthy": 2, "injury": 2, "injury_msc": 2, "injury_ev": 2}
    plan = plan_study(study, FetchSettings.from_config({}))  # the fetch stage accepts it as it stands
    assert [s.gsm for s in plan.samples] == sorted(GSMS)


def test_workflow_refuses_a_draft_with_a_clear_message(tmp_path):
    for folder in ("config", "seeds"):
        shutil.copytree(REPO / folder, tmp_path / folder)
    series = parse_soft(write_soft(tmp_path / "f.soft.gz"))
    (tmp_path / "config" / "studies" / f"{ACC}.yaml").write_text(draft_study(series).text)
    proc = subprocess.run([sys.executable, "-m", "livermsc.cli", "validate", "--config",
                           f"studies=[{ACC}]"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert f"config/studies/{ACC}.yaml: field 'status': this study was drafted" in out
    assert "Traceback" not in out


@pytest.mark.parametrize(("title", "chars", "injured", "arm"), [
    ("Sham operated", ["surgery: sham"], True, "healthy"),
    ("BDL day 14", ["surgery: bile duct ligation"], True, "injury"),
    ("BDL + BM-MSC", [], True, "injury_msc"),
    ("CCl4 + MSC-derived exosomes", [], True, "injury_ev"),
    ("EV treated", ["agent: sEV"], True, "injury_ev"),
    ("MSC infusion", ["treatment: mesenchymal stem cells"], False, "healthy_msc"),
    ("Vehicle", ["treatment: PBS"], False, "healthy"),
    ("liver sample 3", ["tissue: liver"], True, "unknown"),
])
def test_guess_arm(title, chars, injured, arm):
    s = GeoSample(gsm="GSM1", title=title, characteristics=[tuple(c.split(": ")) for c in chars])
    assert guess_arm(s, injured)[0] == arm


def test_series_with_one_seurat_object_drafts_a_local_combined_study(tmp_path):
    rds = f"{FTP}/series/GSE900nnn/{ACC}/suppl/{ACC}_seurat_object.rds.gz"
    series = parse_soft(write_soft(tmp_path / "f.soft.gz", series_files=[rds], per_sample=False))
    draft = draft_study(series)
    spec = yaml.safe_load(draft.text)
    assert spec["source"] == "local"
    assert spec["files"] == [{"name": f"{ACC}_seurat_object.rds.gz", "layout": "combined",
                              "format": "seurat",
                              "split": {"by": "obs", "column": "REVIEW_meta_data_column"}}]
    assert draft.rows[0]["split_value"] == "Olive_oil_control,_mouse_1"
    assert f"download {rds} into resources/{ACC}/" in draft.text
    studies = tmp_path / "studies"
    studies.mkdir()
    reviewed = draft.text.replace("status: needs_review", "status: ready").replace(
        "REVIEW_meta_data_column", "orig.ident")
    (studies / f"{ACC}.yaml").write_text(reviewed)
    assert len(load_study(ACC, studies).samples) == len(SAMPLES)


def test_cli_downloads_the_soft_file_and_writes_the_draft(tmp_path, capsys):
    soft = write_soft(tmp_path / "served.soft.gz").read_bytes()
    path = f"/series/GSE900nnn/{ACC}/soft/{ACC}_family.soft.gz"
    out = tmp_path / "config" / "studies" / f"{ACC}.yaml"
    args = ["draft-study", ACC, "--base-url", "", "--out", str(out), "--download-dir",
            str(tmp_path / "meta"), "--configfile", str(tmp_path / "none.yaml")]
    with FileServer() as srv:
        srv.add(path, soft)
        args[3] = srv.url
        assert main(args) == 0
        assert srv.requests(path) == [(path, None, 200)]
        printed = capsys.readouterr().out
        assert f"{GSMS[4]}  arm=injury_msc" in printed and "CCl4 + UC-MSC, mouse 5" in printed
        assert f"wrote {out}: 8 samples, status needs_review" in printed
        assert yaml.safe_load(out.read_text())["samples"][6]["arm"] == "injury_ev"
        assert (tmp_path / "meta" / f"{ACC}_family.soft.gz").read_bytes() == soft
        assert main(args) == 2  # no overwrite without --force
        assert "exists already (expected a new file; pass --force" in capsys.readouterr().err
        assert main([*args, "--force"]) == 0
        missing = ["draft-study", "GSE900124", "--base-url", srv.url, "--out",
                   str(tmp_path / "x.yaml"), "--download-dir", str(tmp_path / "meta"),
                   "--configfile", str(tmp_path / "none.yaml")]
        assert main(missing) == 2
        err = capsys.readouterr().err
        assert "GSE900124: cannot download the soft file" in err and "404" in err


def test_cli_reads_a_local_series_matrix(tmp_path, capsys):
    matrix = write_series_matrix(tmp_path / f"{ACC}_series_matrix.txt.gz")
    out = tmp_path / "draft.yaml"
    assert main(["draft-study", ACC, "--series-matrix", str(matrix), "--out", str(out)]) == 0
    assert [r["arm"] for r in yaml.safe_load(out.read_text())["samples"]] == \
        [s[3] for s in SAMPLES]
    capsys.readouterr()
    assert main(["draft-study", "GSE1", "--series-matrix", str(matrix), "--out",
                 str(tmp_path / "y.yaml")]) == 2
    assert f"holds series {ACC}, not GSE1" in capsys.readouterr().err
    bad = tmp_path / "notes.txt"
    bad.write_text("just some notes\n")
    assert main(["draft-study", ACC, "--soft", str(bad), "--out", str(tmp_path / "z.yaml")]) == 2
    assert "notes.txt: neither a GEO SOFT family file" in capsys.readouterr().err


def test_series_with_one_count_table_drafts_a_combined_geo_file(tmp_path):
    csv = f"{FTP}/series/GSE900nnn/{ACC}/suppl/{ACC}_counts.csv.gz"
    series = parse_soft(write_soft(tmp_path / "f.soft.gz", series_files=[csv], per_sample=False))
    draft = draft_study(series)
    spec = yaml.safe_load(draft.text)
    assert spec["source"] == "geo"
    assert spec["files"] == [{"name": f"{ACC}_counts.csv.gz", "layout": "combined",
                              "format": "csv", "split": {"by": "barcode",
                                                         "pattern": "^(REVIEW)_"}}]
    assert all(r["format"] == "10x_mtx" and r["path"] == r["sample"] for r in draft.rows)
    assert "REVIEW: GSE900123_counts.csv.gz holds every sample" in draft.text

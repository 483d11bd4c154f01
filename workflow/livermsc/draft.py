"""Draft a study file from a GEO series' metadata (SOFT family file or series matrix).

``livermsc draft-study GSE123456`` downloads the series' SOFT family file (or reads a local one
with ``--soft``, or a series matrix with ``--series-matrix``), lists every sample (GSM title,
characteristics, supplementary files) and writes ``config/studies/<id>.yaml``: the series'
files, one sample-sheet row per GSM with the characteristics as columns, and guesses of each
sample's arm (healthy, injury, injury_msc, injury_ev, ...) from keywords such as control, sham,
PBS, CCl4, BDL, MSC, exosome or EV. Every guess is marked ``# REVIEW`` and the draft carries
``status: needs_review``, which the workflow refuses to run until a person has checked the
guesses against the paper and set ``status: ready``.

GEO formats (https://www.ncbi.nlm.nih.gov/geo/info/soft.html): a SOFT family file holds
``^SERIES`` / ``^PLATFORM`` / ``^SAMPLE`` blocks of ``!Attribute = value`` lines; a series
matrix holds ``!Series_*`` lines (one value) and ``!Sample_*`` lines (one tab-separated, quoted
value per sample) before its ``!series_matrix_table_begin`` data table.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import gzip
import json
import re
import textwrap
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

import yaml

from livermsc.config import ConfigError, load_yaml, validate
from livermsc.geo import GEO_BASE, geo_stem
from livermsc.transfer import FetchError, FetchSettings, download

#: characteristics column names that would clash with sample-sheet columns of the workflow
RESERVED = {"sample", "arm", "animal", "path", "format", "orientation", "batch", "stage", "gsm",
            "member", "file", "split_value", "title", "qc_n_mads", "qc_n_mads_mt",
            "qc_max_pct_mt", "study", "species", "barcode"}
#: keyword classes (case-insensitive regexes) used to guess a sample's arm
EV_WORDS = re.compile(r"exosom|\bexos?\b|\bs?evs?\b|extracellular vesicle|microvesicle|"
                      r"secretome|\bmsc-?ev|\bmsc-?exo", re.IGNORECASE)
MSC_WORDS = re.compile(r"msc|mensc|adsc|mesenchymal|stromal cell|stem cell", re.IGNORECASE)
INJURY_WORDS = re.compile(
    r"ccl4|ccl₄|carbon tetrachloride|\bbdl\b|bile duct ligation|\bddc\b|\bmcd\b|"
    r"methionine.choline|\bnash\b|\bnafld\b|\bmasld\b|\bmash\b|high.fat|\bhfd\b|\bcde\b|"
    r"\bapap\b|acetaminophen|paracetamol|fibros|fibrotic|cirrho|injur|\blps\b|concanavalin|"
    r"\bcon ?a\b|ischemi|ischaemi|\bi/r\b|hepatectomy|\btaa\b|thioacetamide|alcohol|ethanol|"
    r"\bden\b|diethylnitrosamine|liver failure|hepatitis", re.IGNORECASE)
CONTROL_WORDS = re.compile(
    r"control|\bctrl\b|\bsham\b|\bpbs\b|vehicle|healthy|normal|na[iï]ve|untreated|\boil\b|"
    r"saline|\bwt\b|wild.?type|\bnc\b|\bmock\b", re.IGNORECASE)
POOLED_WORDS = re.compile(r"\bpool", re.IGNORECASE)
ANIMAL_KEYS = re.compile(r"^(mouse|mice|animal|individual|donor|patient|subject|rat|replicate)"
                         r"([ _]?(id|number|no))?$", re.IGNORECASE)
ORGANISMS = {"mus musculus": "mouse", "homo sapiens": "human"}


class DraftError(ConfigError):
    """The GEO metadata cannot be read or drafted; the message names the file and the problem."""


@dataclass
class GeoSample:
    """One GSM of a series."""

    gsm: str
    title: str = ""
    source: str = ""
    organism: str = ""
    characteristics: list[tuple[str, str]] = field(default_factory=list)
    description: list[str] = field(default_factory=list)
    supplementary: list[str] = field(default_factory=list)


@dataclass
class GeoSeries:
    """A series' metadata: its own fields and its samples, in the file's order."""

    accession: str
    title: str = ""
    summary: str = ""
    design: str = ""
    pubmed: list[str] = field(default_factory=list)
    supplementary: list[str] = field(default_factory=list)
    samples: list[GeoSample] = field(default_factory=list)

    @property
    def organisms(self) -> list[str]:
        return sorted({s.organism for s in self.samples if s.organism})


# --- reading GEO metadata ------------------------------------------------------------------------

def _lines(path: Path) -> list[str]:
    if not path.is_file():
        raise DraftError(f"{path}: file not found")
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        return raw.decode("utf-8", errors="replace").splitlines()
    except (OSError, EOFError) as err:
        raise DraftError(f"{path}: cannot be read ({err})") from err


def _set_sample_field(s: GeoSample, key: str, value: str) -> None:
    key = key.lower()
    if key == "sample_title":
        s.title = value
    elif key.startswith("sample_source_name"):
        s.source = s.source or value
    elif key.startswith("sample_organism"):
        s.organism = s.organism or value
    elif key.startswith("sample_characteristics"):
        if value:
            k, sep, v = value.partition(":")
            s.characteristics.append((k.strip(), v.strip()) if sep else ("characteristics",
                                                                          value.strip()))
    elif key == "sample_description":
        if value:
            s.description.append(value)
    elif key.startswith("sample_supplementary_file"):
        if value and value.upper() != "NONE":
            s.supplementary.append(value)


def _set_series_field(series: GeoSeries, key: str, value: str) -> None:
    key = key.lower()
    if key == "series_title":
        series.title = value
    elif key == "series_summary":
        series.summary = f"{series.summary} {value}".strip()
    elif key == "series_overall_design":
        series.design = f"{series.design} {value}".strip()
    elif key == "series_pubmed_id":
        series.pubmed.append(value)
    elif key == "series_supplementary_file":
        if value and value.upper() != "NONE":
            series.supplementary.append(value)


def parse_soft(path: str | Path) -> GeoSeries:
    """A SOFT family file (``GSE..._family.soft[.gz]``): its ^SERIES and ^SAMPLE blocks."""
    path = Path(path)
    series: GeoSeries | None = None
    sample: GeoSample | None = None
    block = ""
    in_table = False
    for line in _lines(path):
        if in_table:
            in_table = not line.lower().startswith(("!sample_table_end", "!platform_table_end"))
            continue
        if line.lower().startswith(("!sample_table_begin", "!platform_table_begin")):
            in_table = True
            continue
        if line.startswith("^"):
            kind, _, acc = line[1:].partition("=")
            block, acc = kind.strip().upper(), acc.strip()
            sample = None
            if block == "SERIES":
                series = GeoSeries(accession=acc)
            elif block == "SAMPLE":
                sample = GeoSample(gsm=acc)
                if series is None:
                    raise DraftError(f"{path}: ^SAMPLE {acc} before any ^SERIES block (expected "
                                     f"a GEO SOFT family file)")
                series.samples.append(sample)
            continue
        if not line.startswith("!") or "=" not in line:
            continue
        key, _, value = line[1:].partition("=")
        key, value = key.strip(), value.strip()
        if block == "SERIES" and series is not None:
            _set_series_field(series, key, value)
        elif block == "SAMPLE" and sample is not None:
            _set_sample_field(sample, key, value)
    if series is None:
        raise DraftError(f"{path}: no ^SERIES block (expected a GEO SOFT family file, "
                         f"GSE..._family.soft.gz)")
    if not series.samples:
        raise DraftError(f"{path}: series {series.accession} lists no ^SAMPLE blocks")
    return series


def parse_series_matrix(path: str | Path) -> GeoSeries:
    """A series matrix (``GSE..._series_matrix.txt[.gz]``): its !Series_ and !Sample_ rows."""
    path = Path(path)
    series_fields: list[tuple[str, str]] = []
    sample_rows: list[tuple[str, list[str]]] = []
    for line in _lines(path):
        low = line.lower()
        if low.startswith("!series_matrix_table_begin"):
            break
        if not line.startswith("!"):
            continue
        cells = next(csv.reader([line], delimiter="\t", quotechar='"'))
        key, values = cells[0][1:], [c.strip() for c in cells[1:]]
        if low.startswith("!series_"):
            series_fields += [(key, v) for v in values]
        elif low.startswith("!sample_"):
            sample_rows.append((key, values))
    acc = next((v for k, v in series_fields if k.lower() == "series_geo_accession"), "")
    gsms = next((v for k, v in sample_rows if k.lower() == "sample_geo_accession"), [])
    if not acc or not gsms:
        raise DraftError(f"{path}: no !Series_geo_accession or !Sample_geo_accession row "
                         f"(expected a GEO series matrix, GSE..._series_matrix.txt.gz)")
    series = GeoSeries(accession=acc)
    for k, v in series_fields:
        _set_series_field(series, k, v)
    series.samples = [GeoSample(gsm=g) for g in gsms]
    for key, values in sample_rows:
        if len(values) != len(gsms):
            raise DraftError(f"{path}: row !{key} has {len(values)} values for {len(gsms)} "
                             f"samples (expected one per sample)")
        for s, v in zip(series.samples, values, strict=True):
            _set_sample_field(s, key, v)
    return series


def read_series(path: str | Path) -> GeoSeries:
    """A SOFT family file or a series matrix, told apart by their first lines."""
    path = Path(path)
    head = [ln for ln in _lines(path)[:50] if ln.strip()]
    if any(ln.startswith("^") for ln in head):
        return parse_soft(path)
    if any(ln.startswith("!Series_") and "\t" in ln for ln in head):
        return parse_series_matrix(path)
    raise DraftError(f"{path}: neither a GEO SOFT family file (^SERIES / ^SAMPLE blocks) nor a "
                     f"series matrix (!Series_ / !Sample_ rows)")


# --- guessing ------------------------------------------------------------------------------------

def _matches(rx: re.Pattern, text: str) -> list[str]:
    return sorted({m.group(0) for m in rx.finditer(text)}, key=str.lower)


def sample_text(s: GeoSample) -> str:
    """The text an arm is guessed from: title, source name and characteristics values."""
    return " | ".join([s.title, s.source, *(v for _, v in s.characteristics)])


def guess_arm(s: GeoSample, series_injured: bool) -> tuple[str, list[str]]:
    """(arm, the words it was guessed from): treatment arms are ``<injury|healthy>_<msc|ev>``."""
    text = sample_text(s)
    ev, msc = _matches(EV_WORDS, text), _matches(MSC_WORDS, text)
    injury, control = _matches(INJURY_WORDS, text), _matches(CONTROL_WORDS, text)
    if ev or msc:  # "MSC-derived exosomes" are an EV treatment
        base = "injury" if injury or series_injured else "healthy"
        return f"{base}_{'ev' if ev else 'msc'}", (ev or msc) + injury
    if injury:
        return "injury", injury + control
    if control:
        return "healthy", control
    return "unknown", []


def guess_model(series: GeoSeries) -> str:
    """The injury model named most often in the series' and samples' text, or 'unspecified'."""
    text = " ".join([series.title, series.summary, series.design,
                     *(sample_text(s) for s in series.samples)])
    words = [m.group(0) for m in INJURY_WORDS.finditer(text)]
    if not words:
        return "unspecified"
    counts: dict[str, int] = {}
    for w in words:
        counts[w.lower()] = counts.get(w.lower(), 0) + 1
    best = max(counts, key=lambda k: counts[k])
    return next(w for w in words if w.lower() == best)


def file_name(url: str) -> str:
    """The file name of a GEO supplementary URL (ftp/https)."""
    return PurePosixPath(urlparse(url).path).name or url


def sample_format(names: list[str]) -> tuple[str | None, list[str]]:
    """(format, the files it comes from) of one sample's supplementary files."""
    low = [n.lower() for n in names]
    roles = {r: [n for n, lo in zip(names, low, strict=True) if re.search(rf"{r}\.(tsv|mtx)", lo)]
             for r in ("matrix", "barcodes", "features", "genes")}
    if roles["matrix"] and roles["barcodes"] and (roles["features"] or roles["genes"]):
        return "10x_mtx", roles["matrix"] + roles["barcodes"] + (roles["features"] or
                                                                 roles["genes"])
    for fmt, rx in (("10x_h5", r"\.h5$"), ("h5ad", r"\.h5ad(\.gz)?$"),
                    ("seurat", r"\.(rds|rda|rdata)(\.gz)?$"), ("csv", r"\.csv(\.gz)?$"),
                    ("tsv", r"\.(tsv|txt)(\.gz)?$")):
        hits = [n for n, lo in zip(names, low, strict=True) if re.search(rx, lo)]
        if hits:
            return fmt, hits[:1]
    return None, []


def column_name(key: str) -> str:
    """A sample-sheet column for a characteristic ('Treatment group' -> treatment_group)."""
    col = re.sub(r"[^a-z0-9]+", "_", key.lower()).strip("_") or "characteristics"
    if col[0].isdigit() or col in RESERVED:
        col = f"geo_{col}"
    return col


# --- the draft -----------------------------------------------------------------------------------

def _q(value: str) -> str:
    """A YAML scalar (JSON strings are YAML double-quoted scalars)."""
    return json.dumps(str(value), ensure_ascii=False)


def _flow(row: dict[str, str]) -> str:
    return "{" + ", ".join(f"{k}: {_q(v)}" for k, v in row.items()) + "}"


def _comment(text: str, width: int = 96) -> list[str]:
    return [f"# {ln}" for ln in textwrap.wrap(" ".join(text.split()), width)] or ["#"]


@dataclass
class Draft:
    """A drafted study file: its YAML text and the rows it holds (for listing)."""

    text: str
    spec: dict
    rows: list[dict]


def draft_study(series: GeoSeries, study_id: str | None = None, source_file: str = "") -> Draft:
    """The study YAML drafted from ``series`` (valid against the study schema; needs_review)."""
    sid = study_id or series.accession
    species_of = [ORGANISMS.get(o.lower()) for o in series.organisms]
    species = next((s for s in species_of if s), None)
    injured = bool(INJURY_WORDS.search(" ".join([series.title, series.summary, series.design])))
    series_files = [file_name(u) for u in series.supplementary]
    raw_tar = next((n for n in series_files if n.upper().endswith("_RAW.TAR")), None)
    per_sample = {s.gsm: sample_format([file_name(u) for u in s.supplementary])
                  for s in series.samples}
    has_per_sample = any(fmt for fmt, _ in per_sample.values())
    combined = None
    if not has_per_sample:
        combined = next(((n, f) for n in series_files
                         for f in [sample_format([n])[0]] if f), None)

    source, files, notes = "geo", [], []
    if has_per_sample and any(f == "seurat" for f, _ in per_sample.values()):
        for s in series.samples:
            fmt, hits = per_sample[s.gsm]
            if fmt == "seurat":
                files.append({"name": hits[0], "acc": s.gsm, "layout": "sample_file"})
    if has_per_sample and any(f not in (None, "seurat") for f, _ in per_sample.values()):
        files.insert(0, {"name": raw_tar or f"{series.accession}_RAW.tar"})
        if raw_tar is None:
            notes.append(f"REVIEW: the series lists no {series.accession}_RAW.tar; name the "
                         f"archive holding the per-sample files")
    if combined is not None:
        name, fmt = combined
        if fmt == "seurat":  # split by ingest from a local copy
            source = "local"
            files.append({"name": name, "layout": "combined", "format": "seurat",
                          "split": {"by": "obs", "column": "REVIEW_meta_data_column"}})
            url = next(u for u in series.supplementary if file_name(u) == name)
            notes.append(f"REVIEW: download {url} into resources/{sid}/ and set files[0].split."
                         f"column to the meta.data column naming each sample; each row's "
                         f"split_value is its value there (the GSM title is a guess)")
        else:
            split = ({"by": "obs", "column": "REVIEW_obs_column"} if fmt == "h5ad" else
                     {"by": "barcode", "pattern": "^(REVIEW)_"})
            files.append({"name": name, "layout": "combined",
                          "format": fmt if fmt in ("csv", "tsv", "h5ad") else "tsv",
                          "split": split})
            notes.append(f"REVIEW: {name} holds every sample; set files[0].split (an obs column, "
                         f"a barcode regex with one group, or a cell table) and each row's "
                         f"split_value")
    if not files:
        files.append({"name": raw_tar or f"{series.accession}_RAW.tar"})
        notes.append("REVIEW: no count files recognised among the supplementary files; name "
                     "the file holding the counts and each sample's format")

    rows, row_notes = [], []
    for s in series.samples:
        arm, words = guess_arm(s, injured)
        row: dict[str, str] = {"sample": s.gsm, "arm": arm}
        animal_key = next((k for k, _ in s.characteristics if ANIMAL_KEYS.match(k)), None)
        row["animal"] = next(v for k, v in s.characteristics if k == animal_key) \
            if animal_key else s.gsm
        fmt, hits = per_sample[s.gsm]
        if combined is not None:
            row["split_value"] = re.sub(r"\s+", "_", s.title) or s.gsm
            if source == "geo":
                row |= {"path": s.gsm if combined[1] not in ("h5ad",) else f"{s.gsm}.h5ad",
                        "format": "h5ad" if combined[1] == "h5ad" else "10x_mtx"}
        elif fmt == "seurat":
            row |= {"file": hits[0], "path": hits[0], "format": "seurat"}
        else:  # a member of the RAW.tar, unpacked to <GSM>[.<suffix of the member>]
            suffix = ""
            if fmt not in (None, "10x_mtx"):
                suffix = "".join(PurePosixPath(hits[0]).suffixes[-2:])
            row |= {"gsm": s.gsm, "path": f"{s.gsm}{suffix}", "format": fmt or "10x_mtx"}
        row["title"] = s.title
        for key, value in s.characteristics:
            col = column_name(key)
            row[col] = f"{row[col]}; {value}" if col in row else value
        why = [f"arm guessed from {', '.join(repr(w) for w in words)}" if words else
               "arm: no keyword recognised"]
        why.append(f"animal from '{animal_key}'" if animal_key else "one animal per GSM assumed")
        if fmt is None and combined is None:
            why.append("format unknown")
        if POOLED_WORDS.search(sample_text(s)):
            why.append("POOLED sample: its animals are not separate replicates")
        rows.append(row)
        row_notes.append(f"REVIEW {'; '.join(why)}")

    spec = {"id": sid, "title": series.title or sid, "citation": "",
            "species": species or "mouse", "model": guess_model(series),
            "status": "needs_review", "source": source}
    if source == "geo":
        spec["accession"] = series.accession
    spec["files"] = files
    spec["samples"] = rows
    validate(spec, "study", f"draft of {series.accession}")
    for i, row in enumerate(rows):
        validate(row, "samples", f"draft of {series.accession}, sample {i + 1}")

    out = [f"# Drafted by `livermsc draft-study {series.accession}` on {date.today()} from "
           f"{source_file or 'GEO metadata'}.",
           "# Check every line marked REVIEW against the paper (arm, animal, files), then set",
           "# 'status: ready': the workflow refuses a study whose status is needs_review.",
           f"# Series {series.accession}: {series.title}"]
    if series.pubmed:
        out.append(f"# PubMed: {', '.join(series.pubmed)}")
    if series.summary:
        out += _comment(f"Summary: {series.summary}")
    if series.design:
        out += _comment(f"Overall design: {series.design}")
    if series.supplementary:
        out.append("# Supplementary files of the series:")
        out += [f"#   {u}" for u in series.supplementary]
    out += [f"# {n}" for n in notes]
    out.append(f"id: {_q(sid)}")
    out.append(f"title: {_q(spec['title'])}")
    out.append('citation: ""  # REVIEW: authors, title, journal, year, DOI')
    organisms = ", ".join(series.organisms) or "none listed"
    out.append(f"species: {spec['species']}  # {'from organism ' if species else 'REVIEW: '}"
               f"{organisms}")
    out.append(f"model: {_q(spec['model'])}  # REVIEW: guessed from the series' keywords")
    out.append("status: needs_review")
    out.append(f"source: {source}")
    if source == "geo":
        out.append(f"accession: {series.accession}")
    out.append("files:")
    out += [f"  - {yaml.safe_dump(f, default_flow_style=True, width=10**6).strip()}"
            for f in files]
    out.append("samples:")
    for s, row, note in zip(series.samples, rows, row_notes, strict=True):
        files_of = ", ".join(file_name(u) for u in s.supplementary) or "none"
        out += [f"  {c}" for c in _comment(f"{s.gsm} '{s.title}': {s.source}; "
                                            f"supplementary: {files_of}", 94)]
        out.append(f"  - {_flow(row)}  # {note}")
    text = "\n".join(out) + "\n"
    if yaml.safe_load(text) != spec:
        raise DraftError(f"draft of {series.accession}: the YAML written does not read back as "
                         f"drafted (a value needs quoting)")
    return Draft(text=text, spec=spec, rows=rows)


def listing(series: GeoSeries, draft: Draft) -> str:
    """A plain-text table of the samples: GSM, arm guess, title, characteristics, files."""
    lines = [f"{series.accession}: {series.title} ({len(series.samples)} samples; "
             f"{', '.join(series.organisms) or 'organism not listed'})"]
    for s, row in zip(series.samples, draft.rows, strict=True):
        chars = "; ".join(f"{k}: {v}" for k, v in s.characteristics) or "-"
        files = ", ".join(file_name(u) for u in s.supplementary) or "-"
        lines.append(f"  {s.gsm}  arm={row['arm']:<12} {s.title!r}  [{chars}]  files: {files}")
    if series.supplementary:
        lines.append("  series files: " + ", ".join(file_name(u) for u in series.supplementary))
    return "\n".join(lines)


# --- download and command line -------------------------------------------------------------------

def metadata_url(accession: str, kind: str, settings: FetchSettings) -> tuple[str, str]:
    """(file name, URL) of a series' SOFT family file (``soft``) or series matrix (``matrix``)."""
    base = (settings.base_url or GEO_BASE["ftp"]).rstrip("/")
    stem = geo_stem(accession)
    if kind == "soft":
        name = f"{accession}_family.soft.gz"
        return name, f"{base}/series/{stem}/{accession}/soft/{name}"
    name = f"{accession}_series_matrix.txt.gz"
    return name, f"{base}/series/{stem}/{accession}/matrix/{name}"


def fetch_metadata(accession: str, kind: str, dest_dir: Path, settings: FetchSettings) -> Path:
    """Download a series' SOFT family file or series matrix into ``dest_dir``."""
    name, url = metadata_url(accession, kind, settings)
    dest = dest_dir / name
    try:
        download(url, dest, settings=settings, label=name)
    except FetchError as err:
        raise DraftError(f"{accession}: cannot download the {kind} file: {err}") from err
    return dest


def draft_cli(args: argparse.Namespace) -> int:
    """``livermsc draft-study``: read or download the metadata, list it, write the draft."""
    acc = args.accession
    if not re.fullmatch(r"GSE\d+", acc):
        raise DraftError(f"'{acc}' is not a GEO series accession (expected GSE followed by digits)")
    sid = args.id or acc
    if args.soft:
        path = Path(args.soft)
    elif args.series_matrix:
        path = Path(args.series_matrix)
    else:
        cfg = load_yaml(args.configfile) if Path(args.configfile).is_file() else {}
        settings = FetchSettings.from_config((cfg or {}).get("fetch"))
        if args.base_url:
            settings = dataclasses.replace(settings, base_url=args.base_url)
        dest = Path(args.download_dir or f"resources/{sid}/metadata")
        path = fetch_metadata(acc, "matrix" if args.use_series_matrix else "soft", dest, settings)
    series = read_series(path)
    if series.accession != acc:
        raise DraftError(f"{path}: holds series {series.accession}, not {acc}")
    draft = draft_study(series, sid, source_file=str(path))
    print(listing(series, draft))
    out = Path(args.out or f"config/studies/{sid}.yaml")
    if out.exists() and not args.force:
        raise DraftError(f"{out}: exists already (expected a new file; pass --force to replace "
                         f"it, or --out to write elsewhere)")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(draft.text)
    print(f"wrote {out}: {len(draft.rows)} samples, status needs_review; check every REVIEW "
          f"line, then set 'status: ready'")
    return 0

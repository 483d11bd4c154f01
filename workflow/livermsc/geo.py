"""GEO's layout: where the supplementary files of a series or sample are served.

Two URL styles (``fetch.geo_url_style``): ``ftp``, the HTTPS mirror of GEO's FTP tree
(``<base>/series/GSE136nnn/GSE136103/suppl/<file>``, resumable), and ``cgi``
(``<base>/download/?acc=GSE136103&format=file[&file=<file>]``).
"""

from __future__ import annotations

import re
import urllib.parse

from livermsc.transfer import FetchSettings

GEO_BASE = {"ftp": "https://ftp.ncbi.nlm.nih.gov/geo", "cgi": "https://www.ncbi.nlm.nih.gov/geo"}


def geo_base(settings: FetchSettings) -> str:
    """Base URL of GEO for the chosen URL style (``base_url`` or the style's default)."""
    return (settings.base_url or GEO_BASE[settings.geo_url_style]).rstrip("/")


def geo_stem(acc: str) -> str:
    """GEO's folder stem of an accession: GSE136103 -> GSE136nnn, GSE1234 -> GSE1nnn, GSE12 -> GSEnnn."""
    m = re.fullmatch(r"(GSE|GSM|GPL|GDS)(\d+)", acc)
    if not m:
        raise ValueError(f"'{acc}' is not a GEO series or sample accession (expected GSE123 or GSM123)")
    prefix, digits = m.groups()
    return f"{prefix}{digits[:-3]}nnn"


def geo_url(acc: str, name: str, settings: FetchSettings) -> str:
    """URL of a GEO supplementary file (``ftp`` style: the HTTPS mirror of GEO's FTP tree;
    ``cgi`` style: ``/geo/download/?acc=...&format=file[&file=...]``)."""
    base = geo_base(settings)
    if settings.geo_url_style == "cgi":
        url = f"{base}/download/?acc={acc}&format=file"
        if name != f"{acc}_RAW.tar":
            url += "&file=" + urllib.parse.quote(name, safe="")
        return url
    kind = "series" if acc.startswith("GSE") else "samples"
    return f"{base}/{kind}/{geo_stem(acc)}/{acc}/suppl/{urllib.parse.quote(name)}"

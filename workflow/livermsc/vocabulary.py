"""Names every stage shares: population levels, score methods, measure names, cluster keys.

The score, claims, annotate and cluster stages write and read these names in their tables and
AnnData columns. This module imports no other livermsc module, so every stage imports them from
here (tests/test_defaults.py checks them against the enums of the JSON schemas).
"""

from __future__ import annotations

#: obs columns whose values are the populations that are scored and counted
POPULATION_LEVELS = ("cell_type", "cell_state")
#: the whole sample, as a population level and as its one population
ALL = "all"
#: sample-level signature score methods (score.methods)
SIGNATURE_METHODS = ("voom", "pseudobulk_z", "pseudobulk_mean", "ssgsea", "score_genes", "ulm")
#: the primary signature method: voom on the pseudobulk counts (livermsc.geneset)
VOOM = "voom"
#: method of share rows in sample_scores.tsv (tested as counts, quasi-binomial)
SHARE_METHOD = "proportion"
#: the cell type and state of cells (or clusters) the annotation does not call
UNASSIGNED = "unassigned"


def resolution_key(resolution: float) -> str:
    """obs column of the Leiden clustering at ``resolution`` (``leiden_0.5``, ``leiden_1``)."""
    return f"leiden_{float(resolution):g}"


def share_measure(parent_level: str, parent: str) -> str:
    """Name of a share measure: ``share_of:all`` or ``share_of:<level>:<value>``."""
    return f"share_of:{ALL}" if parent_level == ALL else f"share_of:{parent_level}:{parent}"

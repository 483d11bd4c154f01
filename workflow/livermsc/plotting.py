"""Shared figure style: arm colours (colour-blind safe) and saving in every configured format."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

#: Okabe-Ito palette, colour-blind safe; arms keep the same colour in every figure.
OKABE_ITO = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442",
             "#000000"]
ARM_COLOURS = {"healthy": "#0072B2", "injury": "#D55E00", "injury_msc": "#009E73",
               "injury_ev": "#CC79A7", "injury_msc_ev": "#E69F00"}


def arm_colour(arm: str, arms: Iterable[str] = ()) -> str:
    """Colour of an arm: fixed for the standard arms, then Okabe-Ito order for others."""
    if arm in ARM_COLOURS:
        return ARM_COLOURS[arm]
    others = [a for a in dict.fromkeys(arms) if a not in ARM_COLOURS]
    idx = others.index(arm) if arm in others else len(others)
    return OKABE_ITO[(4 + idx) % len(OKABE_ITO)]


def save_figure(fig: plt.Figure, stem: str | Path, formats: Iterable[str] = ("png",),
                dpi: int = 300) -> list[Path]:
    """Save ``fig`` as ``<stem>.<fmt>`` for every format, close it, return the paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        path = stem.with_suffix(f".{fmt}")
        fig.savefig(path, dpi=dpi, bbox_inches="tight")
        paths.append(path)
    plt.close(fig)
    return paths

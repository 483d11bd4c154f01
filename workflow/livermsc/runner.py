"""Run a stage function from a Snakemake ``script:`` directive.

Every rule points at ``workflow/scripts/run.py`` and names its entry point in
``params.entry`` (``"module:function"``); the function receives the Snakemake object. Logging
and warnings go to the rule's log file, and a failure removes the rule's partial outputs.
"""

from __future__ import annotations

import importlib
import logging
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any


def _remove_outputs(outputs: list[str]) -> None:
    for out in outputs:
        path = Path(out)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            path.unlink()


def run(smk: Any) -> None:
    """Configure logging to ``smk.log[0]``, call ``params.entry`` and clean up on failure."""
    log_path = Path(smk.log[0]) if smk.log else None
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.WARNING)  # the full record goes to the rule's log file
    handlers: list[logging.Handler] = [console]
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_path, mode="w"))
    logging.basicConfig(level=logging.INFO, handlers=handlers, force=True,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.captureWarnings(True)
    warnings.simplefilter("default")
    module_name, func_name = smk.params.entry.split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    try:
        func(smk)
    except Exception:
        logging.getLogger("livermsc").exception("rule %s failed", smk.rule)
        _remove_outputs(list(smk.output))
        raise

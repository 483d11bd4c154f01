"""Run a stage function from a Snakemake ``script:`` directive.

Every rule points at ``workflow/scripts/run.py`` and names its entry point in
``params.entry`` (``"module:function"``); the function receives the Snakemake object. The full
record (with any Python traceback) goes to the rule's log file; the console gets warnings and,
on failure, one line with the error and the log's path. A failure removes the rule's partial
outputs, so that a rerun never trusts them.
"""

from __future__ import annotations

import importlib
import logging
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any


class _NoTraceback(logging.Formatter):
    """Console format: the message only; tracebacks stay in the log file."""

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            return super().format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


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
    console.setFormatter(_NoTraceback("%(name)s %(levelname)s %(message)s"))
    handlers: list[logging.Handler] = [console]
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_path, mode="w")
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        handlers.append(handler)
    logging.basicConfig(level=logging.INFO, handlers=handlers, force=True)
    logging.captureWarnings(True)
    warnings.simplefilter("default")
    module_name, func_name = smk.params.entry.split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    try:
        func(smk)
    except Exception as err:
        where = f" (full record: {log_path})" if log_path is not None else ""
        logging.getLogger("livermsc").error("rule %s failed: %s: %s%s", smk.rule,
                                            type(err).__name__, err, where, exc_info=True)
        _remove_outputs(list(smk.output))
        raise


def main(smk: Any) -> None:
    """``run`` for the rule script: a failure exits with status 1 without a console traceback."""
    try:
        run(smk)
    except Exception:
        sys.exit(1)  # the error is on the console in one line, its traceback in the log file

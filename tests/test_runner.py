"""A failing rule leaves no partial outputs behind and logs the failure to its log file."""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import pytest
from livermsc.runner import run


def _fail(smk):
    for path in smk.output:
        if not path.endswith("_dir"):
            with open(path, "w") as fh:
                fh.write("half written")
    raise ValueError("bad input: results/x.h5ad field 'arm'")


def _ok(smk):
    with open(smk.output[0], "w") as fh:
        fh.write("done")


@pytest.fixture
def entry_module(monkeypatch):
    mod = types.ModuleType("livermsc_test_entries")
    mod.fail, mod.ok = _fail, _ok
    monkeypatch.setitem(sys.modules, "livermsc_test_entries", mod)
    return mod


def _smk(tmp_path, entry, outputs):
    return SimpleNamespace(log=[str(tmp_path / "logs" / "rule.log")], output=outputs,
                           rule="demo_rule", params=SimpleNamespace(entry=entry))


def test_failure_removes_partial_outputs_and_logs_reason(tmp_path, entry_module):
    folder = tmp_path / "out_dir"
    folder.mkdir()
    (folder / "part.tsv").write_text("x")
    outputs = [str(tmp_path / "a.h5ad"), str(tmp_path / "b.tsv")]
    with pytest.raises(ValueError, match="bad input"):
        run(_smk(tmp_path, "livermsc_test_entries:fail", [*outputs, str(folder)]))
    assert not any((tmp_path / name).exists() for name in ("a.h5ad", "b.tsv", "out_dir"))
    log = (tmp_path / "logs" / "rule.log").read_text()
    assert "rule demo_rule failed" in log and "field 'arm'" in log


def test_success_keeps_outputs(tmp_path, entry_module):
    out = tmp_path / "done.txt"
    run(_smk(tmp_path, "livermsc_test_entries:ok", [str(out)]))
    assert out.read_text() == "done"


def test_every_rule_names_its_entry_point_rule_underscore_rule_name():
    """One naming rule: the rule ``x`` calls ``livermsc.<stage>:rule_x`` (per-study rules
    ``unpack_<study>`` share ``rule_unpack``), and that function exists."""
    import importlib
    import re
    from pathlib import Path

    rules_dir = Path(__file__).resolve().parents[1] / "workflow" / "rules"
    seen = 0
    for smk in sorted(rules_dir.glob("*.smk")):
        text = smk.read_text()
        for block in re.split(r"\n(?=\s*rule[ :])", text):
            entry = re.search(r'entry="([\w.]+):(\w+)"', block)
            if entry is None:
                continue
            name = re.match(r"\s*rule (\w+):", block)
            rule = name.group(1) if name else re.search(r'f"(\w+?)_\{', block).group(1)
            module, func = entry.groups()
            assert func == f"rule_{rule}", f"{smk.name}: rule {rule} calls {func}"
            assert callable(getattr(importlib.import_module(module), func))
            seen += 1
    assert seen >= 17

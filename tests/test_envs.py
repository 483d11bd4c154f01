"""Conda environments: valid, pinned, on the allowed channels, and complete for their rules.

The rule files are read as text (one block per ``rule``/``checkpoint``): each rule's
``conda:`` file(s) must exist, and every third-party module its entry module imports
(following imports of other livermsc modules) must be listed in each of them.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
ENVS = REPO / "envs"
RULES_DIR = REPO / "workflow" / "rules"
PACKAGE_DIR = REPO / "workflow"
ENV_FILES = sorted(ENVS.glob("*.yaml"))
ALLOWED_CHANNELS = {"conda-forge", "bioconda", "nodefaults"}

#: import name -> conda package(s) that provide it (any one of them is enough)
IMPORT_TO_CONDA = {
    "anndata": ["anndata"],
    "scanpy": ["scanpy"],
    "decoupler": ["decoupler-py", "decoupler"],
    "gseapy": ["gseapy"],
    "statsmodels": ["statsmodels"],
    "skimage": ["scikit-image"],
    "sklearn": ["scikit-learn"],
    "leidenalg": ["leidenalg"],
    "igraph": ["python-igraph"],
    "pynndescent": ["pynndescent"],
    "umap": ["umap-learn"],
    "numpy": ["numpy"],
    "pandas": ["pandas"],
    "scipy": ["scipy"],
    "matplotlib": ["matplotlib-base", "matplotlib"],
    "seaborn": ["seaborn", "seaborn-base"],
    "h5py": ["h5py"],
    "rdata": ["rdata"],
    "xarray": ["xarray"],
    "pyedger": ["pyedger"],
    "pylimma": ["pylimma"],
    "jsonschema": ["jsonschema"],
    "referencing": ["referencing"],
    "yaml": ["pyyaml"],
    "scvi": ["scvi-tools"],
    "torch": ["pytorch"],
    "lightning": ["lightning"],
    "scib_metrics": ["scib-metrics"],
    "jax": ["jax"],
    "jaxlib": ["jaxlib"],
    "mudata": ["mudata"],
    "requests": ["requests"],
    "packaging": ["packaging"],
}
#: conda package -> PyPI name, where they differ (for the pyproject.toml range check)
CONDA_TO_PYPI = {"pytorch": "torch", "python-igraph": "igraph", "decoupler-py": "decoupler",
                 "matplotlib-base": "matplotlib", "seaborn-base": "seaborn"}
PIN = re.compile(r"^(?P<name>[A-Za-z0-9_.-]+)={1,2}(?P<version>\d[\w.]*)(?:=(?P<build>\S+))?$")


# --- helpers ------------------------------------------------------------------------------------

def load_env(path: Path) -> dict:
    with path.open() as fh:
        return yaml.safe_load(fh)


def env_pins(path: Path) -> dict[str, tuple[str, str | None]]:
    """Package -> (version, build) of an environment file, conda entries and its pip section."""
    pins = {}
    for dep in load_env(path)["dependencies"]:
        for item in dep.get("pip", []) if isinstance(dep, dict) else [dep]:
            m = PIN.match(item.replace(" ", ""))
            assert m, f"{path.name}: dependency '{item}' is not pinned (expected name=version)"
            pins[m["name"]] = (m["version"], m["build"])
    return pins


def rule_blocks(path: Path) -> dict[str, str]:
    """Rule name -> text of its block, for every ``rule``/``checkpoint`` of a rule file.

    Also finds rules defined in loops (``rule:`` with a ``name:`` directive); their name is
    the directive's text.
    """
    blocks: dict[str, str] = {}
    lines = path.read_text().splitlines()
    header = re.compile(r"^(?P<indent>[ \t]*)(?:rule|checkpoint)(?:\s+(?P<name>\w+))?\s*:\s*$")
    for i, line in enumerate(lines):
        m = header.match(line)
        if not m:
            continue
        body = []
        for nxt in lines[i + 1:]:
            if nxt.strip() and len(nxt) - len(nxt.lstrip()) <= len(m["indent"]):
                break
            body.append(nxt)
        block = "\n".join(body)
        name = m["name"] or (directive(block, "name") or "").strip() or f"line{i + 1}"
        blocks[name] = block
    return blocks


#: Directives that make a rule run a job (aggregating rules without them need no environment).
ACTIONS = ("script", "shell", "wrapper", "notebook", "cwl")


def directive(block: str, keyword: str) -> str | None:
    """The text of one directive (``conda:``, ``params:``...) in a rule block."""
    m = re.search(rf"^(?P<indent>[ \t]+){keyword}:(?P<rest>.*)$", block, flags=re.M)
    if not m:
        return None
    text = [m["rest"]]
    for line in block[m.end():].splitlines()[1:]:
        indent = len(line) - len(line.lstrip())
        if line.strip() and indent <= len(m["indent"]):
            break
        text.append(line)
    return "\n".join(text)


def all_rules() -> list[tuple[Path, str, str]]:
    return [(path, name, block) for path in sorted(RULES_DIR.glob("*.smk"))
            for name, block in rule_blocks(path).items()]


def module_file(module: str) -> Path | None:
    base = PACKAGE_DIR / Path(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return (isinstance(node, ast.If)
            and ((isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
                 or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")))


def third_party_imports(module: str, seen: set[str] | None = None) -> set[str]:
    """Top-level names of the non-stdlib modules ``module`` imports, following livermsc imports
    (imports under ``if TYPE_CHECKING:`` are ignored)."""
    seen = set() if seen is None else seen
    if module in seen:
        return set()
    seen.add(module)
    path = module_file(module)
    assert path is not None, f"module {module} not found under {PACKAGE_DIR}"
    found: set[str] = set()
    stack: list[ast.AST] = [ast.parse(path.read_text())]
    while stack:
        node = stack.pop()
        if _type_checking(node):
            stack.extend(getattr(node, "orelse", []))
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import inside the package
                parent = module.rsplit(".", node.level)[0]
                base = f"{parent}.{node.module}" if node.module else parent
            else:
                base = node.module or ""
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for name in names:
            top = name.split(".")[0]
            if top == "livermsc":
                if module_file(name) is not None:
                    found |= third_party_imports(name, seen)
            elif top and top != "__future__" and top not in sys.stdlib_module_names:
                found.add(top)
        stack.extend(ast.iter_child_nodes(node))
    return found


def conda_paths(path: Path, block: str) -> list[Path]:
    text = directive(block, "conda") or ""
    return [(path.parent / p).resolve() for p in re.findall(r"[\"']([^\"']+\.ya?ml)[\"']", text)]


def entry_of(block: str) -> tuple[str, str] | None:
    m = re.search(r"entry\s*=\s*[\"']([\w.]+):(\w+)[\"']", directive(block, "params") or "")
    return (m.group(1), m.group(2)) if m else None


# --- environment files --------------------------------------------------------------------------

def test_expected_environments_exist():
    assert {p.name for p in ENV_FILES} >= {"scanpy.yaml", "scvi.yaml", "fetch.yaml"}


@pytest.mark.parametrize("path", ENV_FILES, ids=lambda p: p.name)
def test_env_parses_with_allowed_channels(path):
    env = load_env(path)
    assert isinstance(env, dict) and env.get("name"), f"{path.name}: needs a name"
    channels = env.get("channels", [])
    assert channels and set(channels) <= ALLOWED_CHANNELS, f"{path.name}: channels {channels}"
    assert channels[0] == "conda-forge" and channels[-1] == "nodefaults"
    assert env.get("dependencies"), f"{path.name}: no dependencies"


@pytest.mark.parametrize("path", ENV_FILES, ids=lambda p: p.name)
def test_env_pins_every_package(path):
    pins = env_pins(path)  # asserts that every entry is pinned
    assert "python" in pins
    for dep in load_env(path)["dependencies"]:
        if isinstance(dep, dict):  # a pip section must pin too
            for item in dep.get("pip", []):
                assert "==" in item, f"{path.name}: pip entry '{item}' is not pinned"


@pytest.mark.parametrize("path", ENV_FILES, ids=lambda p: p.name)
def test_env_pins_lie_in_pyproject_ranges(path):
    tomllib = pytest.importorskip("tomllib")  # standard library from Python 3.11
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    ranges = {canonicalize_name(r.name): r.specifier
              for r in map(Requirement, project["dependencies"])}
    for name, (version, _) in env_pins(path).items():
        if name == "python":
            spec = Requirement(f"python{project['requires-python']}").specifier
            assert spec.contains(Version(version)), f"{path.name}: python={version}"
            continue
        pypi = canonicalize_name(CONDA_TO_PYPI.get(name, name))
        if pypi in ranges:
            assert ranges[pypi].contains(Version(version), prereleases=True), (
                f"{path.name}: {name}={version} outside pyproject.toml range "
                f"{pypi}{ranges[pypi]}")


def test_scvi_envs_differ_only_in_the_pytorch_build():
    gpu, cpu = env_pins(ENVS / "scvi.yaml"), env_pins(ENVS / "scvi_cpu.yaml")
    assert gpu["pytorch"][1] == "cuda*" and gpu["cuda-version"][0] == "12"
    assert cpu["pytorch"][1] == "cpu*" and "cuda-version" not in cpu
    assert gpu["pytorch"][0] == cpu["pytorch"][0]
    assert {k: v for k, v in gpu.items() if k not in {"pytorch", "cuda-version"}} == \
        {k: v for k, v in cpu.items() if k != "pytorch"}


# --- rules -> environments ----------------------------------------------------------------------

def test_rule_files_are_parsed():
    rules = all_rules()
    assert rules, "no rules found in workflow/rules/*.smk"
    assert any(name == "report_summary" for _, name, _ in rules)


@pytest.mark.parametrize(("path", "name", "block"), all_rules(),
                         ids=[f"{p.stem}:{n}" for p, n, _ in all_rules()])
def test_rule_declares_existing_conda_env(path, name, block):
    if not any(directive(block, action) is not None for action in ACTIONS):
        pytest.skip(f"rule {name} runs no job (no {'/'.join(ACTIONS)} directive)")
    envs = conda_paths(path, block)
    assert envs, f"{path.name}: rule {name} has no conda: directive naming an envs/*.yaml"
    for env in envs:
        assert env.is_file(), f"{path.name}: rule {name}: conda env {env} does not exist"
        assert env.parent == ENVS.resolve(), f"{path.name}: rule {name}: {env} not in envs/"


@pytest.mark.parametrize(("path", "name", "block"), all_rules(),
                         ids=[f"{p.stem}:{n}" for p, n, _ in all_rules()])
def test_rule_env_provides_its_imports(path, name, block):
    entry = entry_of(block)
    if entry is None:
        pytest.skip(f"rule {name} has no params.entry")
    module, func = entry
    source = module_file(module)
    assert source is not None, f"{path.name}: rule {name}: entry module {module} not found"
    defined = {n.name for n in ast.parse(source.read_text()).body
               if isinstance(n, ast.FunctionDef)}
    assert func in defined, f"{path.name}: rule {name}: {module} defines no function {func}"
    imports = third_party_imports(module) | third_party_imports("livermsc.runner")
    unknown = sorted(imports - set(IMPORT_TO_CONDA))
    assert not unknown, (f"{module} imports {unknown}: add them to IMPORT_TO_CONDA in "
                         f"tests/test_envs.py and to the rule's conda env")
    for env in conda_paths(path, block):
        listed = set(env_pins(env))
        missing = sorted(i for i in imports if not listed & set(IMPORT_TO_CONDA[i]))
        assert not missing, (f"{path.name}: rule {name} runs {module}, which imports "
                             f"{missing}; envs/{env.name} does not list them")


# --- import livermsc inside script jobs ---------------------------------------------------------

def test_script_jobs_import_modules_from_the_snakefile_sys_path(tmp_path):
    """What makes ``import livermsc`` work in any environment: a folder the Snakefile puts on
    sys.path is added to every script job's sys.path by Snakemake's script preamble, although
    the job runs in a new Python process without it (no PYTHONPATH, not installed)."""
    pkg = tmp_path / "pkgdir"
    pkg.mkdir()
    (pkg / "probe_module_xyz.py").write_text("VALUE = 42\n")
    (tmp_path / "probe.py").write_text(
        "import probe_module_xyz\n"
        "from pathlib import Path\n"
        "Path(snakemake.output[0]).write_text(str(probe_module_xyz.VALUE))\n")
    (tmp_path / "Snakefile").write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(pkg)!r})\n\n"
        "rule probe:\n"
        "    output: 'out.txt'\n"
        "    script: 'probe.py'\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "1", "--quiet",
                          "--workflow-profile", "none"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "out.txt").read_text() == "42"
    # the folder is not importable by a plain new process
    plain = subprocess.run([sys.executable, "-c", "import probe_module_xyz"], cwd=REPO,
                           env=env, capture_output=True, text=True)
    assert plain.returncode != 0

"""Import contracts of the package: who may import whom.

The contracts themselves live in pyproject.toml under ``[tool.importlinter]`` and are checked by
import-linter's ``lint-imports`` (a dev dependency), run from the project root as a subprocess of
this interpreter's venv, always with ``--no-cache`` so it writes no ``.import_linter_cache`` dir.

* ``layers``: cli -> stages -> feedback -> serve | report -> engine -> tracking -> data -> tasks
  -> math | config; a layer imports only from the layers below it, ``|`` siblings not each other.
* ``stages-independent``: no stage module imports another stage module, even indirectly; the
  contract must list every module of alignkit/stages but ``__init__`` and ``pipeline``
  (checked here against the files on disk).
* alignkit.math imports nothing outside the standard library, torch and alignkit.math itself, and
  keeps no module-level mutable state; import-linter cannot say "no external package but torch",
  so this one is an AST check here (see :func:`math_violations`).
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "alignkit"
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def _contracts(pyproject: Path = ROOT / "pyproject.toml") -> dict[str, dict]:
    with open(pyproject, "rb") as f:
        config = tomllib.load(f)["tool"]["importlinter"]
    return {c["id"]: c for c in config["contracts"]}


def _lint_imports(cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    assert LINT_IMPORTS.exists(), (
        f"{LINT_IMPORTS} not found: install the dev extras (pip install -e '.[dev]')")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    env["COLUMNS"] = "1000"  # rich wraps at 80 columns otherwise, splitting names and chains
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_contracts_hold():
    result = _lint_imports(ROOT)
    assert result.returncode == 0, f"lint-imports failed:\n{result.stdout}\n{result.stderr}"


def test_independence_contract_lists_every_stage_module():
    listed = set(_contracts()["stages-independent"]["modules"])
    stages = SRC / "stages"
    on_disk = {f"alignkit.stages.{p.stem}" for p in stages.glob("*.py")
               if p.name not in ("__init__.py", "pipeline.py")}
    on_disk |= {f"alignkit.stages.{p.parent.name}" for p in stages.glob("*/__init__.py")}
    assert on_disk - listed == set(), "stage modules missing from the independence contract"
    assert listed - on_disk == set(), "independence contract lists modules that do not exist"


# (contract id, file in the copy, import appended to it, the edge lint-imports must report)
INJECTIONS = {
    "layers": ("config.py", "import alignkit.stages", "alignkit.config -> alignkit.stages"),
    "stages-independent": ("stages/bon.py", "import alignkit.stages.sft",
                           "alignkit.stages.bon -> alignkit.stages.sft"),
}


@pytest.mark.parametrize("contract_id", sorted(INJECTIONS))
def test_a_forbidden_import_fails_the_contract(tmp_path, contract_id):
    """Lint a copy of the package before and after appending one forbidden import.

    The real tree may break the contracts already, so the proof is that the injected edge, with
    the line number it has in the copy (which shows the copy was linted, not the installed
    package), is reported after and not before, and that the contract is then BROKEN.
    """
    relpath, statement, edge = INJECTIONS[contract_id]
    shutil.copytree(SRC, tmp_path / "src" / "alignkit",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    name = _contracts(tmp_path / "pyproject.toml")[contract_id]["name"]

    before = _lint_imports(tmp_path, pythonpath=tmp_path / "src")
    assert "Contracts:" in before.stdout, before.stdout + before.stderr
    assert edge not in before.stdout

    target = tmp_path / "src" / "alignkit" / relpath
    text = target.read_text()
    if not text.endswith("\n"):
        text += "\n"
    lineno = text.count("\n") + 1
    target.write_text(f"{text}{statement}\n")

    after = _lint_imports(tmp_path, pythonpath=tmp_path / "src")
    out = after.stdout + after.stderr
    assert after.returncode != 0, out
    assert f"{name} BROKEN" in out, out
    assert f"{edge} (l.{lineno})" in out, out


# --- alignkit.math: torch and the standard library only, no module-level mutable state ------

ALLOWED_TOP_LEVEL = {"__future__", "torch"} | set(sys.stdlib_module_names)
_MUTABLE_NODES = (ast.Dict, ast.List, ast.Set, ast.DictComp, ast.ListComp, ast.SetComp)
_MUTABLE_CALLS = {"dict", "list", "set", "bytearray", "defaultdict", "OrderedDict", "Counter",
                  "deque"}
_ALL_CAPS = re.compile(r"_?[A-Z][A-Z0-9_]*")


def _is_mutable(value: ast.expr | None) -> bool:
    if isinstance(value, _MUTABLE_NODES):
        return True
    if isinstance(value, ast.Call):
        fn = value.func
        if isinstance(fn, ast.Attribute):  # collections.defaultdict(...)
            return fn.attr in _MUTABLE_CALLS
        return isinstance(fn, ast.Name) and fn.id in _MUTABLE_CALLS
    return False


def _names(target: ast.expr) -> list[str]:
    if isinstance(target, ast.Name):
        return [target.id]
    if isinstance(target, (ast.Tuple, ast.List)):
        return [n for elt in target.elts for n in _names(elt)]
    return [ast.unparse(target)]  # x.y = [] or x[0] = [] at module level: state all the same


def math_violations(source: str, module: str) -> list[str]:
    """What in ``source`` (the text of module ``module`` of alignkit.math) breaks the rules.

    Imports, anywhere in the file (also inside functions): ``__future__``, the standard library
    (``sys.stdlib_module_names``), ``torch`` and ``alignkit.math`` with its submodules; relative
    imports are resolved first. Anything else, numpy and the rest of alignkit included, is
    reported.

    Module-level mutable state: a ``global`` statement anywhere, or a module-level assignment
    (also inside a top-level ``if``/``try``/``with``) of a dict/list/set literal or
    comprehension or of a ``dict()``/``list()``/``set()``/``defaultdict()``/... call, unless the
    name is ALL_CAPS or ``__all__``. ALL_CAPS marks a constant table (``KL_ESTIMATORS``) or a
    registry filled at import time by a decorator (``LOSSES = {}`` filled by ``@register``);
    anything else held at module level (a cache, a counter, ``_seen = set()``) would be state
    that survives between calls and differs between processes, which math code must not have.
    """
    tree = ast.parse(source)
    # the package that relative imports are resolved against
    if module.endswith(".__init__"):
        package = module.removesuffix(".__init__")
    else:
        package = module.rpartition(".")[0]
    problems = []

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from alignkit import math` imports alignkit.math: judge the names, not the package
            targets = ([f"{mod}.{alias.name}" for alias in node.names]
                       if mod == "alignkit" else [mod])
        elif isinstance(node, ast.Global):
            problems.append(f"{module}:{node.lineno}: global {', '.join(node.names)}")
            continue
        else:
            continue
        for target in targets:
            if target.split(".")[0] in ALLOWED_TOP_LEVEL:
                continue
            if target == "alignkit.math" or target.startswith("alignkit.math."):
                continue
            problems.append(f"{module}:{node.lineno}: imports {target}")

    def module_level(body: list[ast.stmt]):
        for stmt in body:
            yield stmt
            if isinstance(stmt, (ast.If, ast.Try, ast.With)):
                for block in ("body", "orelse", "finalbody"):
                    yield from module_level(getattr(stmt, block, []))
                for handler in getattr(stmt, "handlers", []):
                    yield from module_level(handler.body)

    for stmt in module_level(tree.body):
        if isinstance(stmt, ast.Assign):
            targets, value = stmt.targets, stmt.value
        elif isinstance(stmt, (ast.AnnAssign, ast.AugAssign)):
            targets, value = [stmt.target], stmt.value
        else:
            continue
        if not _is_mutable(value):
            continue
        for name in (n for t in targets for n in _names(t)):
            if name != "__all__" and not _ALL_CAPS.fullmatch(name):
                problems.append(f"{module}:{stmt.lineno}: module-level mutable {name}")
    return problems


def _math_modules() -> list[Path]:
    return sorted((SRC / "math").rglob("*.py"))


def test_math_imports_only_torch():
    files = _math_modules()
    assert len(files) >= 3, files  # the glob found the package
    problems = []
    for path in files:
        module = ".".join(("alignkit", *path.relative_to(SRC).with_suffix("").parts))
        problems += math_violations(path.read_text(), module)
    assert problems == []


@pytest.mark.parametrize("source, expected", [
    ("import numpy as np", ["imports numpy"]),
    ("def f():\n    from transformers import AutoModel", ["imports transformers"]),
    ("from alignkit.engine import models", ["imports alignkit.engine"]),
    ("from alignkit import config", ["imports alignkit.config"]),
    ("from .. import tasks", ["imports alignkit.tasks"]),
    ("_cache = {}", ["module-level mutable _cache"]),
    ("seen: set[int] = set()", ["module-level mutable seen"]),
    ("try:\n    import torch\nexcept ImportError:\n    pending = []",
     ["module-level mutable pending"]),
    ("def f():\n    global n\n    n = 1", ["global n"]),
    # allowed: stdlib, torch, alignkit.math, relative within math, ALL_CAPS tables, __all__,
    # immutable module constants, mutable locals
    ("from __future__ import annotations\nimport math, typing\n"
     "import torch.nn.functional as F\nfrom alignkit.math.advantages import gae\n"
     "from . import logprobs\nfrom .losses import get_loss\nfrom alignkit import math\n"
     "__all__ = ['f']\nLOSSES: dict = {}\nTABLE = {'a': 1}\nEPS = 1e-6\nNAMES = ('a', 'b')\n"
     "def f():\n    cache = {}\n    return cache", []),
])
def test_math_rules_catch_violations(source, expected):
    found = [p.split(": ", 1)[1] for p in math_violations(textwrap.dedent(source),
                                                          "alignkit.math.example")]
    assert found == expected

"""bench/'s scripts: none of them shadows an installed package, and ``bench/run.py`` gets as far
as preparing its models.

A script's folder comes first on ``sys.path``, so a ``bench/NAME.py`` hides an installed ``NAME``
from every library the scripts import (``bench/kernels.py`` once hid the ``kernels`` package that
transformers imports, and ``make bench`` failed while preparing the models)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"
STEMS = sorted(p.stem for p in BENCH.glob("*.py"))

# Run in a fresh interpreter started in an empty folder, so that neither bench/ nor the project
# root nor the test's own folder is on its sys.path: what it finds is the environment's.
_PROBE = """
import importlib.metadata, importlib.util, json, sys
names = json.loads(sys.argv[1])
dists = importlib.metadata.packages_distributions()
out = {}
for name in names:
    spec = importlib.util.find_spec(name)
    out[name] = {"origin": spec and str(spec.origin), "stdlib": name in sys.stdlib_module_names,
                 "builtin": name in sys.builtin_module_names, "dists": dists.get(name)}
print(json.dumps(out))
"""


def _installed(python: str, names: list[str], cwd: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # which could hold bench/
    out = subprocess.run([python, "-c", _PROBE, json.dumps(names)], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _clashes(found: dict) -> dict:
    clashes = {}
    for name, f in found.items():
        own = f["origin"] is not None and Path(f["origin"]) == BENCH / f"{name}.py"
        if (f["origin"] is not None and not own) or f["stdlib"] or f["builtin"] or f["dists"]:
            clashes[name] = f
    return clashes


def test_no_bench_module_shadows_an_installed_package(tmp_path):
    assert "run" in STEMS and "prepare" in STEMS, STEMS
    # The project venv, and the peer venvs that run.py creates (worker.py, common.py and
    # trl_cases.py run there too) where they exist.
    pythons = [sys.executable] + [str(p) for p in sorted(BENCH.glob(".venv*/bin/python"))]
    for python in pythons:
        clashes = _clashes(_installed(python, STEMS, tmp_path))
        assert not clashes, (f"bench/ modules with the name of an installed or standard-library "
                             f"module in {python} (rename them): {clashes}")


def test_shadow_check_sees_an_installed_package(tmp_path):
    """The check above would catch a clash: names that are installed here are reported."""
    clashes = _clashes(_installed(sys.executable, ["json", "torch", "transformers"], tmp_path))
    assert set(clashes) == {"json", "torch", "transformers"}


@pytest.mark.slow
def test_run_prepares_the_models(tmp_path):
    """``bench/run.py`` as ``make bench`` runs it (a script, so bench/ is first on sys.path),
    up to its models: one small model, its work files under tmp_path."""
    work, out = tmp_path / "work", tmp_path / "results"
    cmd = [sys.executable, "bench/run.py", "--quick", "--cases", "sft", "--models", "gpt2-tiny",
           "--precisions", "fp32", "--no-peer", "--prepare-only",
           "--work", str(work), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    report = f"$ {' '.join(cmd)}\nexit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    assert proc.returncode == 0, report
    assert any(line.split("] ", 1)[-1].startswith("prepared gpt2-tiny (")
               for line in proc.stdout.splitlines()), report
    meta = json.loads((work / "quick" / "models" / "gpt2-tiny" / "bench_meta.json").read_text())
    assert meta["n_params"] > 0, report
    assert (work / "quick" / "models" / "gpt2-tiny" / "config.json").exists(), report
    assert (work / "quick" / "data" / "gpt2-tiny" / "sft.jsonl").stat().st_size > 0, report
    assert not out.exists(), report  # --prepare-only writes no result files


def _tracker_calls() -> set[str]:
    """Every ``tracker.NAME`` that the package's code reads (stages and the training loop;
    tracking.py's own ``tracker`` is one of the external trackers it drives)."""
    import ast

    names = set()
    for path in (ROOT / "src" / "alignkit").rglob("*.py"):
        if path.name == "tracking.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id == "tracker"):
                names.add(node.attr)
    return names


def test_bench_trackers_offer_what_the_stages_call(monkeypatch):
    """The harness times alignkit by replacing its tracker (``bench/alignkit_cases.py``); a method
    the stages call and the stand-ins lack fails every alignkit row of ``make bench`` (it did,
    once, for ``progress``)."""
    monkeypatch.syspath_prepend(str(BENCH))
    import alignkit_cases

    calls = _tracker_calls()
    assert {"log", "progress", "finish", "truncate_after"} <= calls, calls  # the scan sees them
    for cls in (alignkit_cases.ClockTracker, alignkit_cases.ClockRLTracker):
        missing = sorted(name for name in calls if not hasattr(cls, name))
        assert not missing, f"{cls.__name__} lacks {missing}, which the stages call on a tracker"
    tracker = alignkit_cases.ClockRLTracker(alignkit_cases.StepClock(), rows=4)
    bar = tracker.progress(10, done=2)
    bar.to(3)
    bar.close()
    tracker.log(1, {"response_length": 2.5})
    assert tracker.gen_tokens == [10] and len(tracker.clock.marks) == 1

"""kill -9 at checkpoint boundaries and inside checkpoint writes of every training stage (sft, rm,
dpo offline and online, ppo, rest, judge-model) resumes to the same weights and metrics as an
uninterrupted run.

Each scenario runs its stage in a child process that dies by a real SIGKILL at the chosen point
(no cleanup code runs), then runs the same config in the same folder again, and compares the
folder with an uninterrupted run of the config in another folder. The children are forked by one
zygote process (``kill_zygote.py``) that imports torch and the stages once.

What "the same" means, file by file (``compare_runs``), everywhere under the run folder:

* ``*.safetensors`` (the saved models, and each checkpoint's weights): bit-identical. Every run
  is one process on the CPU with one thread, so each float reduction runs in the same order
  whether or not the run was resumed; a resume restores parameters, optimiser and scheduler
  state and every RNG exactly.
* ``*.json`` and ``*.jsonl`` (``metrics.json``, ``metrics.jsonl`` of the stage and of each
  round / Improve step, cached evaluations, samples, trainer states): the same rows in the same
  order (each step once) with equal values, except the keys ``UNCOMPARED``: wall-clock
  ``seconds``, ``iteration_s``, ``tokens_per_s``, ``labels_per_second`` and the process's
  ``peak_rss_mb``, also under a ``last_`` or ``eval/`` prefix; a string holding the run folder's
  path is compared with that path replaced (``"model": "<run>/model"`` in ``metrics.json``, and
  the paths in ``config.yaml`` and ``fingerprint.json``).
* every other file (the checkpoints' optimiser, scheduler and RNG states, ``config.yaml``,
  tokenizer files): the same bytes, the run folder's path replaced.
* and the same set of files: nothing left half-written (``.tmp_step_*``) or left behind.

The on-disk state right after each kill is checked too, so each point is reached where it is
named (e.g. a ``.tmp_step_4`` folder holding weights and no ``step_4``: inside a checkpoint
write).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
# Measures of the process, not of the run: wall-clock times and rates, and the peak resident
# memory (ppo's peak_rss_mb: a resumed process holds less history).
UNCOMPARED = {"seconds", "iteration_s", "tokens_per_s", "labels_per_second", "peak_rss_mb"}
ZYGOTE_TIMEOUT = 900     # seconds for every scenario together; each child has CHILD_TIMEOUT
CHILD_TIMEOUT = 300

# ---------------------------------------------------------------------------------------------
# Tiny configs, one per stage (those of tests/stages and tests/engine/test_judges.py, with
# checkpoints at every step or two).


def _sft(base, data, out):
    return {"model": base, "out_dir": out,
            "data": {"train": "task:sentiment", "eval": "task:sentiment", "task_samples": 64,
                     "eval_samples": 16, "max_length": 96},
            "optim": {"lr": 3e-3, "warmup_steps": 1},
            "train": {"max_steps": 6, "batch_size": 8, "micro_batch_size": 4,
                      "mixed_precision": "no", "save_every": 2, "eval_every": 3, "log_every": 1}}


def _rm(base, data, out):
    return {"model": base, "out_dir": out,
            "data": {"train": data["pairs"], "eval": data["eval_pairs"], "max_length": 64},
            "optim": {"lr": 3e-3, "warmup_steps": 1},
            "train": {"max_steps": 6, "batch_size": 8, "micro_batch_size": 4,
                      "mixed_precision": "no", "save_every": 2, "log_every": 1}}


def _dpo(base, data, out):
    return {"model": base, "out_dir": out,
            "data": {"train": data["pairs"], "max_length": 64},
            "eval": {"task": "sentiment", "num_prompts": 2, "sampling": {"max_new_tokens": 6}},
            "optim": {"lr": 3e-3, "warmup_steps": 1},
            "train": {"max_steps": 6, "batch_size": 8, "micro_batch_size": 4,
                      "mixed_precision": "no", "save_every": 2, "log_every": 1}}


def _online_dpo(base, data, out):
    return {"model": base, "out_dir": out,
            "data": {"train": "online", "max_length": 64},
            "online": {"rounds": 2, "prompts_per_round": 6, "labeler": "simulated",
                       "sampling": {"max_new_tokens": 8}},
            "eval": {"task": "sentiment", "num_prompts": 2, "sampling": {"max_new_tokens": 4}},
            "train": {"epochs": 1.0, "batch_size": 2, "micro_batch_size": 2,
                      "mixed_precision": "no", "save_every": 1, "log_every": 1},
            "optim": {"lr": 3e-3, "warmup_steps": 0}}


def _ppo(base, data, out):
    return {"model": base, "reward": "python:kill_zygote:count_e", "out_dir": out,
            "task": "sentiment", "iterations": 3, "save_every": 1, "tensorboard": False,
            "rollout": {"prompts": data["prompts"], "prompts_per_iteration": 4,
                        "samples_per_prompt": 2, "batch_size": 8,
                        "sampling": {"max_new_tokens": 8}},
            "ppo": {"epochs": 2, "minibatch_size": 8, "micro_batch_size": 4},
            "optim": {"lr": 3e-2, "schedule": "constant"}, "value_optim": {"lr": 3e-3},
            # the adaptive KL controller and the reward normaliser are state a resume restores
            "kl": {"beta": 0.01, "adaptive": True, "target": 0.5, "horizon": 100},
            "score": {"normalize": "standardize"},
            "eval": {"num_prompts": 2, "batch_size": 8, "sampling": {"max_new_tokens": 6}}}


def _rest(base, data, out):
    return {"model": base, "out_dir": out, "reward": "python:kill_zygote:length",
            "task": "sentiment", "grow_steps": 2,
            "grow": {"num_prompts": 4, "samples_per_prompt": 4, "sampling": {"max_new_tokens": 8}},
            "filter": {"schedule": "percentile", "thresholds": [25, 50], "require_finished": False},
            "improve": {"lr_decay": 0.5, "max_length": 96,
                        "optim": {"lr": 3e-3, "warmup_steps": 0},
                        "train": {"epochs": 1.0, "batch_size": 4, "micro_batch_size": 4,
                                  "mixed_precision": "no", "save_every": 1, "log_every": 1}},
            "eval": {"num_prompts": 2, "success_at": 0.0, "sampling": {"max_new_tokens": 8}}}


def _judge_model(base, data, out):
    # judge.model is this stage's own output, as in configs/judge.yaml
    return {"model": base, "out_dir": out, "pairwise_examples": 24, "pointwise_examples": 8,
            "eval_examples": 6, "max_response_words": 8,
            "judge": {"model": f"{out}/model", "batch_size": 8},
            "train": {"max_steps": 4, "batch_size": 8, "micro_batch_size": 8,
                      "mixed_precision": "no", "save_every": 2, "eval_every": 2, "log_every": 1}}


CONFIGS = {"sft": ("sft", _sft), "rm": ("rm", _rm), "dpo": ("dpo", _dpo),
           "online-dpo": ("dpo", _online_dpo), "ppo": ("ppo", _ppo), "rest": ("rest", _rest),
           "judge-model": ("judge-model", _judge_model)}

# ---------------------------------------------------------------------------------------------
# Kill points: (run, point) -> (the kill hook of each killed phase (kill_zygote.py), what the run
# folder holds right after the last kill, what it does not hold: a file, or a folder "x/").

BOUNDARY = "a: after a checkpoint completed"
IN_WRITE = "b: inside a checkpoint write"
BEFORE_METRICS = "c: final model saved, no metrics.json yet"


def _ckpt(step, under=""):
    return f"{under}checkpoints/step_{step}/trainer_state.json"


def _tmp(step, under=""):
    return f"{under}checkpoints/.tmp_step_{step}/model.safetensors"


def _no_ckpt(step, under=""):
    return f"{under}checkpoints/step_{step}/"


def _after(what, nth, under=""):
    return {"after": what, "nth": nth, **({"dir": under.rstrip("/")} if under else {})}


FINISH = {"before": "finish"}
MODEL = "model/model.safetensors"
R1, S3, S2 = "round_1/", "grow_1/improve_0/", "grow_0/improve_1/"   # ReST: S3, S2 = steps 3, 2

POINTS = {
    ("sft", BOUNDARY): ([_after("save_checkpoint", 2)], [_ckpt(4)], [_no_ckpt(6)]),
    ("sft", IN_WRITE): ([_after("save_state", 2)], [_tmp(4), _ckpt(2)], [_no_ckpt(4)]),
    ("sft", "b: inside the final checkpoint write (after the final eval)"):
        ([_after("save_state", 3)], [_tmp(6), _ckpt(4)], [_no_ckpt(6)]),
    ("sft", BEFORE_METRICS): ([FINISH], [MODEL, _ckpt(6)], ["metrics.json"]),
    ("sft", "c, then again while its resume replaces the final checkpoint"):
        ([FINISH, {"inside": "rmtree", "name": "step_6"}], [_ckpt(4)], ["metrics.json"]),

    ("rm", BOUNDARY): ([_after("save_checkpoint", 1)], [_ckpt(2)], [_no_ckpt(4)]),
    ("rm", IN_WRITE): ([_after("save_state", 2)], [_tmp(4)], [_no_ckpt(4)]),
    ("rm", BEFORE_METRICS): ([FINISH], [MODEL], ["metrics.json"]),

    ("dpo", BOUNDARY): ([_after("save_checkpoint", 2)], [_ckpt(4)], [_no_ckpt(6)]),
    ("dpo", IN_WRITE): ([_after("save_state", 3)], [_tmp(6)], [_no_ckpt(6)]),
    ("dpo", BEFORE_METRICS): ([FINISH], [MODEL], ["metrics.json"]),
    ("online-dpo", "a: after a checkpoint of round 1's training"):
        ([_after("save_checkpoint", 1, R1)],
         ["round_0/metrics.json", R1 + "pairs.jsonl", _ckpt(1, R1)], [R1 + "metrics.json"]),
    ("online-dpo", "c: round 0's model saved and logged, its metrics.json not written"):
        ([{**FINISH, "dir": "round_0"}], ["round_0/" + MODEL], ["round_0/metrics.json"]),

    ("ppo", BOUNDARY): ([_after("save_checkpoint", 1)], [_ckpt(1)], [_no_ckpt(2)]),
    ("ppo", IN_WRITE): ([_after("save_state", 2)], [_tmp(2), _ckpt(1)], [_no_ckpt(2)]),
    ("ppo", BEFORE_METRICS): ([FINISH], [MODEL, _ckpt(3)], ["metrics.json"]),
    ("ppo", "inside the write of the initial evaluation's cache"):
        ([{"inside": "write_text", "name": "initial_metrics.json"}], [], ["checkpoints/"]),

    ("rest", "a: inside Improve step 3, after a checkpoint"):
        ([_after("save_checkpoint", 1, S3)], ["grow_1/grown.jsonl", _ckpt(1, S3)],
         [S3 + "metrics.json"]),
    ("rest", "b: inside Improve step 3, inside a checkpoint write"):
        ([_after("save_state", 2, S3)], [_tmp(2, S3), _ckpt(1, S3)], [_no_ckpt(2, S3)]),
    ("rest", "inside Improve step 2, while its checkpoints are deleted"):
        ([{"inside": "rmtree", "name": "checkpoints", "dir": S2}], [S2 + MODEL],
         [S2 + "metrics.json"]),
    ("rest", "inside the write of Improve step 2's done marker"):
        ([{"inside": "write_text", "name": "metrics.json", "dir": S2}], [S2 + "samples.jsonl"],
         ["grow_1/"]),
    ("rest", BEFORE_METRICS): ([FINISH], [MODEL], ["metrics.json"]),

    ("judge-model", BOUNDARY): ([_after("save_checkpoint", 1)], [_ckpt(2)], [_no_ckpt(4)]),
    ("judge-model", IN_WRITE): ([_after("save_state", 2)], [_tmp(4)], [_no_ckpt(4)]),
    ("judge-model", BEFORE_METRICS): ([FINISH], [MODEL], ["metrics.json"]),
}


# ---------------------------------------------------------------------------------------------
# One zygote runs the scenarios of the selected tests (and their uninterrupted runs).


def _data(root: Path) -> dict:
    """Preference pairs (rm, dpo) and prompts (ppo)."""
    good = ["a great film", "a moving story", "wonderful acting", "a fine cast"]
    bad = ["a dull mess", "a boring plot", "weak acting", "a tired script"]
    pairs = [{"prompt": f"Review {i}: it was", "chosen": " " + good[i % 4] + "." * (i % 3),
              "rejected": " " + bad[(i + 1) % 4]} for i in range(24)]
    paths = {"pairs": root / "pairs.jsonl", "eval_pairs": root / "eval_pairs.jsonl",
             "prompts": root / "prompts.jsonl"}
    paths["pairs"].write_text("".join(json.dumps(p) + "\n" for p in pairs[:16]))
    paths["eval_pairs"].write_text("".join(json.dumps(p) + "\n" for p in pairs[16:]))
    prompts = [{"prompt": f"Review {i}: the film" + " was" * (i % 3)} for i in range(12)]
    paths["prompts"].write_text("".join(json.dumps(p) + "\n" for p in prompts))
    return {k: str(v) for k, v in paths.items()}


def _scenario_id(run: str, point: str) -> str:
    return f"{run}-{sorted(p for r, p in POINTS if r == run).index(point)}"


@pytest.fixture(scope="module")
def fault_runs(request, tiny_base, tmp_path_factory) -> dict:
    selected = {tuple(item.callspec.params[k] for k in ("run", "point"))
                for item in request.session.items
                if item.module is request.module and hasattr(item, "callspec")}
    root = tmp_path_factory.mktemp("faults")
    data = _data(root)
    scenarios, dirs = [], {}
    for run in sorted({r for r, _ in selected}):
        stage, config = CONFIGS[run]
        dirs[run] = root / f"{run}.straight"
        scenarios.append({"id": f"{run}.straight", "stage": stage,
                          "config": config(str(tiny_base), data, str(dirs[run])),
                          "phases": [{"kill": None}]})
    for run, point in sorted(selected):
        stage, config = CONFIGS[run]
        sid = _scenario_id(run, point)
        dirs[run, point] = root / sid
        hooks = POINTS[run, point][0]
        scenarios.append({"id": sid, "stage": stage,
                          "config": config(str(tiny_base), data, str(dirs[run, point])),
                          "phases": [{"kill": h} for h in hooks] + [{"kill": None}]})
    plan = root / "plan.json"
    plan.write_text(json.dumps({"jobs": 2, "timeout": CHILD_TIMEOUT, "log_dir": str(root / "logs"),
                                "scenarios": scenarios}))
    import alignkit

    paths = [str(Path(alignkit.__file__).parents[1])]   # the alignkit under test, first
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        paths + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    # Its own process group: on a timeout the zygote and every child it forked are killed.
    proc = subprocess.Popen([sys.executable, str(HERE / "kill_zygote.py"), str(plan),
                             str(root / "result.json")], env=env, cwd=root, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=ZYGOTE_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"the zygote ran past {ZYGOTE_TIMEOUT} s: {output[-3000:]}")
    assert proc.returncode == 0, output[-3000:]
    result = json.loads((root / "result.json").read_text())
    return {"results": result["scenarios"], "dirs": dirs, "base": tiny_base}


# ---------------------------------------------------------------------------------------------
# Comparison of two run folders.


def _timing(key: str) -> bool:
    return key.rsplit("/", 1)[-1].removeprefix("last_") in UNCOMPARED


def _normal(value, run: str):
    if isinstance(value, dict):
        return {k: _normal(v, run) for k, v in value.items() if not _timing(k)}
    if isinstance(value, list):
        return [_normal(v, run) for v in value]
    if isinstance(value, str):
        return value.replace(run, "<run>")
    return value


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def compare_runs(straight: Path, resumed: Path) -> list[str]:
    """What differs between two run folders (module docstring); [] when nothing does."""
    from safetensors.torch import load_file

    diffs = []
    a_files, b_files = _files(straight), _files(resumed)
    if a_files != b_files:
        diffs.append(f"files only in the uninterrupted run: {sorted(a_files - b_files)}; "
                     f"only in the resumed one: {sorted(b_files - a_files)}")
    for rel in sorted(a_files & b_files):
        a, b = straight / rel, resumed / rel
        if rel.endswith(".safetensors"):
            wa, wb = load_file(a), load_file(b)
            if wa.keys() != wb.keys() or any(not wa[k].equal(wb[k]) for k in wa):
                worst = max((float((wa[k] - wb[k]).abs().max()) for k in wa if k in wb),
                            default=None)
                diffs.append(f"{rel}: weights differ (max abs difference {worst})")
        elif rel.endswith((".json", ".jsonl")):
            rows = [[json.loads(x) for x in p.read_text().splitlines()] if rel.endswith("l")
                    else [json.loads(p.read_text())] for p in (a, b)]
            ra, rb = _normal(rows[0], str(straight)), _normal(rows[1], str(resumed))
            if ra != rb:
                diffs.append(f"{rel}: {_first_difference(ra, rb)}")
        else:
            ta = a.read_bytes().replace(str(straight).encode(), b"<run>")
            tb = b.read_bytes().replace(str(resumed).encode(), b"<run>")
            if ta != tb:
                diffs.append(f"{rel}: contents differ")
    return diffs


def _first_difference(ra: list, rb: list) -> str:
    if len(ra) != len(rb):
        return (f"{len(ra)} rows vs {len(rb)} resumed; steps "
                f"{[r.get('step') for r in ra if isinstance(r, dict)]} vs "
                f"{[r.get('step') for r in rb if isinstance(r, dict)]}")
    for i, (x, y) in enumerate(zip(ra, rb)):
        if x != y:
            if isinstance(x, dict) and isinstance(y, dict):
                keys = sorted(k for k in set(x) | set(y) if x.get(k) != y.get(k))
                return f"row {i}: " + ", ".join(f"{k}: {x.get(k)!r} vs {y.get(k)!r}"
                                                for k in keys[:6])
            return f"row {i}: {x!r} vs {y!r}"
    return "?"


# ---------------------------------------------------------------------------------------------
# The tests: one per kill point.


@pytest.mark.parametrize("run,point", sorted(POINTS), ids=[f"{r}|{p}" for r, p in sorted(POINTS)])
def test_killed_run_resumes_to_the_uninterrupted_one(fault_runs, run, point):
    hooks, must, must_not = POINTS[run, point]
    phases = fault_runs["results"][_scenario_id(run, point)]
    straight = fault_runs["results"][f"{run}.straight"]
    assert straight[-1]["returncode"] == 0, _log(straight[-1])
    assert _trained(fault_runs["dirs"][run] / "model", fault_runs["base"])   # no vacuous compare
    for k, hook in enumerate(hooks):
        assert len(phases) > k, f"phase {k} never ran"
        assert phases[k]["returncode"] == -signal.SIGKILL and not phases[k]["timed_out"], (
            f"phase {k} ({hook}) did not die by SIGKILL: {_log(phases[k])}")
    killed = set(phases[len(hooks) - 1]["files"])
    for path in must:
        assert path in killed, f"after the kill, {path} is missing: {sorted(killed)}"
    for path in must_not:   # a file, or a folder (ending in "/")
        assert not any(f == path or (path.endswith("/") and f.startswith(path)) for f in killed), (
            f"after the kill, {path} exists: {sorted(killed)}")
    assert len(phases) == len(hooks) + 1, "the resume never ran"
    assert phases[-1]["returncode"] == 0, f"the resume failed: {_log(phases[-1])}"
    resumed = fault_runs["dirs"][run, point]
    diffs = compare_runs(fault_runs["dirs"][run], resumed)
    assert not diffs, "\n".join(diffs)
    for log in resumed.rglob("metrics.jsonl"):   # each step once (a step's eval row apart)
        rows = [json.loads(x) for x in log.read_text().splitlines()]
        kinds = [(r["step"], tuple(sorted(r))) for r in rows]
        steps = [step for step, _ in kinds]
        assert len(set(kinds)) == len(kinds) and steps == sorted(steps), log


def _trained(model: Path, base: Path) -> bool:
    from safetensors.torch import load_file

    before, after = load_file(base / "model.safetensors"), load_file(model / "model.safetensors")
    return any(not before[k].equal(after[k]) for k in before if k in after)


def _log(phase: dict) -> str:
    text = Path(phase["log"]).read_text(errors="replace") if Path(phase["log"]).exists() else ""
    return f"returncode={phase['returncode']}\n{text[-3000:]}"

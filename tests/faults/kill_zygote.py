"""Run stages in forked children that die by SIGKILL at a chosen point, then resume them.

``python kill_zygote.py PLAN.json RESULT.json``. The zygote imports torch, transformers and every
stage once, and computes nothing with torch (no OpenMP pool exists to break across ``fork``).
Each scenario of the plan is a list of phases, run one after another, each in a forked child
(one thread; its output to ``<log_dir>/<scenario>.<phase>.log``): the child installs its
phase's kill hook, runs the stage's ``main(cfg)`` and exits 0, or dies by the hook's
``os.kill(os.getpid(), SIGKILL)``, where no cleanup code runs. Up to ``jobs`` scenarios run at
once; a scenario stops at a phase that did not end as planned. A child that outlives
``timeout`` seconds is killed and reported as timed out, so the zygote never hangs.

Plan: ``{"jobs": 2, "timeout": 300, "log_dir": ..., "scenarios": [{"id": ..., "stage": "sft",
"config": {...}, "phases": [{"kill": HOOK}, {"kill": null}]}]}``. RESULT.json: per scenario, per
phase run: ``returncode`` (-9: killed by SIGKILL), ``timed_out``, ``seconds`` (wall clock),
``cpu_seconds``, ``files`` (the run folder's files after the phase) and ``log``.

HOOK (``nth``: the how-many-th matching call, default 1; ``dir``: only calls whose target, a
checkpoint folder, model folder or file, lies inside this folder of the run, default the run
folder, count):

* ``{"after": "save_checkpoint"}``: once ``engine.training.save_checkpoint`` returned (a
  checkpoint is complete: the boundary).
* ``{"after": "save_state"}``: once ``Accelerator.save_state`` wrote the temporary folder,
  before ``trainer_state.json`` and the rename (inside a checkpoint write).
* ``{"after": "save_model"}``: once ``engine.models.save_model`` returned.
* ``{"before": "finish"}``: on entering ``Tracker.finish`` of the run folder (or ``dir``): the
  model is saved, ``metrics.json`` is not written.
* ``{"inside": "rmtree", "name": NAME}``: while ``shutil.rmtree`` deletes a folder whose name
  ends with NAME (the folder, or a renamed copy of it): after its newest checkpoint's
  ``model.safetensors`` is gone (a deletion cut short).
* ``{"inside": "write_text", "name": NAME}``: while ``Path.write_text`` writes a file named
  NAME (or its temporary ``NAME.tmp``, renamed to NAME once written): after ``open`` truncated
  it, before a byte is written.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

# What the stages import, once, before any fork: a child pays no import time.
import accelerate
import numpy.ma  # noqa: F401
import torch
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification,  # noqa: F401
                          AutoTokenizer, PreTrainedTokenizerFast)
from transformers.models.llama import modeling_llama  # noqa: F401

import alignkit.data.collate  # noqa: F401
import alignkit.data.formats  # noqa: F401
import alignkit.engine.attention  # noqa: F401
import alignkit.engine.evaluation  # noqa: F401
import alignkit.engine.judges  # noqa: F401
import alignkit.engine.lm_loss  # noqa: F401
import alignkit.engine.models  # noqa: F401
import alignkit.engine.rl.roles  # noqa: F401
import alignkit.engine.scoring  # noqa: F401
import alignkit.feedback.labelers  # noqa: F401
import alignkit.feedback.simulate  # noqa: F401
import alignkit.tracking  # noqa: F401
from alignkit.config import build
from alignkit.stages import dpo, judge_model, ppo, rest, reward, sft
from alignkit.tasks import get_task

# The sentiment task builds its prompt pool and fits its gold reward's trigram model on first
# use (seconds each; pure Python, no torch): once here, not in every child.
get_task("sentiment").prompts("test", 1)
get_task("sentiment").gold_reward(["The film was"], [" good."])

IMPORTED = round(time.process_time(), 2)   # CPU seconds of the imports and warm-ups above
STAGES = {"sft": sft, "rm": reward, "dpo": dpo, "ppo": ppo, "rest": rest,
          "judge-model": judge_model}


# ---------------------------------------------------------------------------------------------
# Reward sources of the plans (``python:kill_zygote:NAME``).


def count_e(prompts, responses):
    """How many letters "e" a response holds."""
    return [float(r.count("e")) for r in responses]


def length(prompts, responses):
    return [float(len(r)) for r in responses]


# ---------------------------------------------------------------------------------------------
# Kill hooks: monkeypatches of the child (a disposable copy of the zygote).


def die() -> None:
    sys.stdout.flush()   # our log only; nothing of the stage runs after this
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)       # never reached


def _inside(target, folder: Path) -> bool:
    target = Path(target).resolve()
    return target == folder or folder in target.parents


def _counter(hook: dict, what: str):
    """Counts the calls it is given; True at the ``nth``: the moment to die."""
    calls = [0]

    def reached() -> bool:
        calls[0] += 1
        if calls[0] != hook.get("nth", 1):
            return False
        print(f"kill_zygote: SIGKILL {what} #{calls[0]}", flush=True)
        return True

    return reached


def _after(owner, name: str, hook: dict, folder: Path, target_of) -> None:
    """Die once the ``nth`` call of ``owner.name`` whose target is inside ``folder`` returned."""
    real, reached = getattr(owner, name), _counter(hook, f"after {name}")

    def wrapped(*args, **kwargs):
        result = real(*args, **kwargs)
        if _inside(target_of(*args, **kwargs), folder) and reached():
            die()
        return result

    setattr(owner, name, wrapped)


def install(hook: dict, out_dir: Path) -> None:
    """``hook["dir"]`` (relative to the run folder, default the run folder itself): only calls
    whose target lies inside it count."""
    import shutil

    import alignkit.engine.models as models
    import alignkit.engine.training as training
    import alignkit.tracking as tracking

    folder = (out_dir / hook.get("dir", "")).resolve()
    if hook.get("after") == "save_checkpoint":   # (accelerator, out_dir, step, ...)
        _after(training, "save_checkpoint", hook, folder, lambda *a, **k: a[1])
    elif hook.get("after") == "save_state":      # (self, output_dir)
        _after(accelerate.Accelerator, "save_state", hook, folder, lambda *a, **k: a[1])
    elif hook.get("after") == "save_model":      # (model, tokenizer, out_dir)
        _after(models, "save_model", hook, folder, lambda *a, **k: a[2])
    elif hook.get("before") == "finish":
        real_finish, reached = tracking.Tracker.finish, _counter(hook, "in Tracker.finish")

        def finish(self, metrics):
            if self.out_dir.resolve() == folder and reached():
                die()
            return real_finish(self, metrics)

        tracking.Tracker.finish = finish
    elif hook.get("inside") == "rmtree":
        real_rmtree, reached = shutil.rmtree, _counter(hook, "inside rmtree")

        def rmtree(path, *args, **kwargs):
            p = Path(path)
            if p.name.endswith(hook["name"]) and p.exists() and _inside(p, folder) and reached():
                steps = sorted(p.glob("step_*"), key=lambda s: int(s.name[5:])) or [p]
                (steps[-1] / "model.safetensors").unlink()   # the first file rmtree removed
                die()
            return real_rmtree(path, *args, **kwargs)

        shutil.rmtree = rmtree
    elif hook.get("inside") == "write_text":
        real_write, reached = Path.write_text, _counter(hook, "inside write_text")

        def write_text(self, *args, **kwargs):
            if self.name in (hook["name"], hook["name"] + ".tmp") and _inside(self, folder) \
                    and reached():
                self.open("w").close()     # open() truncated it; no byte written yet
                die()
            return real_write(self, *args, **kwargs)

        Path.write_text = write_text
    else:
        raise ValueError(f"unknown kill hook {hook}")


# ---------------------------------------------------------------------------------------------
# Children and the scheduler.


def child(scenario: dict, phase: dict, log: Path) -> None:
    """Runs in the forked child; never returns."""
    code = 1
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        torch.set_num_threads(1)
        module = STAGES[scenario["stage"]]
        cfg = build(module.Config, scenario["config"])
        if phase.get("kill"):
            install(phase["kill"], Path(cfg.out_dir))
        module.main(cfg)
        code = 0
    except BaseException:  # noqa: BLE001 - reported through the log and the exit code
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)   # no atexit handler of the zygote runs in a child


def files_of(folder: Path) -> list[str]:
    if not folder.exists():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def run(plan: dict) -> dict:
    jobs, timeout = plan.get("jobs", 1), plan.get("timeout", 240)
    log_dir = Path(plan["log_dir"])
    log_dir.mkdir(parents=True, exist_ok=True)
    pending = [(s, 0) for s in plan["scenarios"]]
    running: dict[int, tuple[dict, int, float]] = {}
    results: dict[str, list[dict]] = {s["id"]: [] for s in plan["scenarios"]}
    sys.stdout.flush()
    sys.stderr.flush()
    while pending or running:
        while pending and len(running) < jobs:
            scenario, k = pending.pop(0)
            log = log_dir / f"{scenario['id']}.{k}.log"
            pid = os.fork()
            if pid == 0:
                child(scenario, scenario["phases"][k], log)
            running[pid] = (scenario, k, time.monotonic())
        time.sleep(0.05)
        for pid, (scenario, k, start) in list(running.items()):
            done, status, usage = os.wait4(pid, os.WNOHANG)
            timed_out = False
            if not done and time.monotonic() - start > timeout:
                os.kill(pid, signal.SIGKILL)
                _, status, usage = os.wait4(pid, 0)
                done, timed_out = pid, True
            if not done:
                continue
            del running[pid]
            out_dir = Path(scenario["config"]["out_dir"])
            log = log_dir / f"{scenario['id']}.{k}.log"
            results[scenario["id"]].append({
                "phase": k, "kill": scenario["phases"][k].get("kill"),
                # as subprocess reports it: -9 for a SIGKILL, else the exit code
                "returncode": -os.WTERMSIG(status) if os.WIFSIGNALED(status)
                else os.WEXITSTATUS(status),
                "timed_out": timed_out, "seconds": round(time.monotonic() - start, 2),
                "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2),
                "files": files_of(out_dir), "log": str(log)})
            planned = -signal.SIGKILL if scenario["phases"][k].get("kill") else 0
            if results[scenario["id"]][-1]["returncode"] == planned and not timed_out \
                    and k + 1 < len(scenario["phases"]):
                pending.insert(0, (scenario, k + 1))   # this scenario's next phase first
    return results


def main() -> None:
    plan = json.loads(Path(sys.argv[1]).read_text())
    start = time.monotonic()
    results = run(plan)
    Path(sys.argv[2]).write_text(json.dumps({"scenarios": results, "import_seconds": IMPORTED,
                                             "seconds": round(time.monotonic() - start, 2)}))


if __name__ == "__main__":
    main()

"""Where an RL iteration's time goes, on alignkit's side: ``python bench/phases.py --case grpo``.

Runs ``run.py``'s cell of the case (same sizes, compiled decoding, sampled log-probs reused) in
this process with timers around alignkit's own functions, and prints the milliseconds per
iteration of each phase, over the timed iterations (the warm-up ones, which compile the decode
step, are left out):

- ``sample``: ``sampling.sample`` inside ``rollout.collect`` (prefill and decode loop);
- ``no-grad forwards``: the reference's (and, for PPO, the value model's) log-probs and values of
  the rollout, ``rollout.collect`` less its sampling;
- ``policy forward``: the training forward's log-probs (``rollout_logps`` under autograd);
- ``forward + backward``: ``engine.rl.update.accumulate`` (the forward above, the loss, its
  backward, the diagnostics);
- ``optimiser``: clipping, AdamW, zeroing (``engine.rl.update._step``);
- ``iteration``: the time between two iterations' logged metrics (the cell's clock), the figure
  ``run.py`` times.

Needs ``bench/work/full`` (``python bench/prepare.py``). Sums of phases can differ from
``iteration`` by the scoring, advantages and metrics in between.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import alignkit_cases  # noqa: E402
import common  # noqa: E402
import run  # noqa: E402
from common import seed_all, set_threads  # noqa: E402


def timed(owner, name: str, into: list):
    """Replace ``owner.name`` by a wrapper that appends each call's seconds to ``into``."""
    inner = getattr(owner, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            into.append(time.perf_counter() - start)

    setattr(owner, name, wrapper)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=("grpo", "rloo", "ppo"), default="grpo")
    ap.add_argument("--model", default="llama-demo")
    ap.add_argument("--work", default=str(BENCH / "work" / "full"))
    ap.add_argument("--steps", type=int, default=8, help="timed iterations")
    ap.add_argument("--warmup", type=int, default=2, help="iterations left out (compilation)")
    args = ap.parse_args()

    from alignkit.engine.rl import rollout, update

    set_threads()
    seed_all(0)
    times: dict[str, list[float]] = collections.defaultdict(list)
    timed(rollout, "sample", times["sample"])
    timed(rollout, "collect", times["collect"])
    timed(update, "rollout_logps", times["policy forward"])
    timed(update, "accumulate", times["forward + backward"])
    timed(update, "_step", times["optimiser"])
    # An iteration ends where the stage logs it: the cell's clock marks every log.
    marks: list[float] = []
    mark = common.StepClock.mark
    common.StepClock.mark = lambda clock: marks.append(time.perf_counter()) or mark(clock)
    spec = dict(run.cell_spec(run.FULL[args.case], args.case, args.model, "fp32", args.work),
                side="alignkit", warmup=args.warmup, steps=args.steps)
    alignkit_cases.CASES[args.case](spec)
    times["iteration"] = [0.0] + [b - a for a, b in zip(marks, marks[1:])]

    iterations = len(marks)

    def per_iteration(name: str) -> float:
        calls = times[name]
        per = len(calls) // iterations  # calls per iteration (micro-batches, optimisers)
        return sum(calls[per * args.warmup:]) / args.steps * 1000

    rows = {name: per_iteration(name) for name in ("sample", "collect", "policy forward",
                                                   "forward + backward", "optimiser", "iteration")}
    rows["no-grad forwards"] = rows.pop("collect") - rows["sample"]
    print(f"{args.case} {args.model} fp32: ms per iteration, mean of {args.steps} after {args.warmup} "
          f"warm-up")
    for name in ("sample", "no-grad forwards", "policy forward", "forward + backward", "optimiser",
                 "iteration"):
        print(f"  {name:20s} {rows[name]:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

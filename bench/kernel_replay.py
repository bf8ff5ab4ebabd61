"""How fast alignkit's step could be here: its matmul and attention kernels alone, side by side
with the measured steps of both sides. ``python bench/kernel_replay.py --case sft --model llama-demo``.

A ratio target asks for work not done (alignkit and the peer compute the same loss on the same
tokens), so it has a ceiling: the time of the kernels that no implementation of the step can
skip, the model's matrix products (forward and backward) and attention, at the shapes alignkit
runs them. This script

1. measures both sides' step (or sampling call, or RL iteration) the way ``run.py`` does, each in
   a fresh ``worker.py`` process, alternately, ``--reps`` times each;
2. runs the alignkit cell once more in this process with a ``TorchDispatchMode`` recording every
   matmul (``linear``, ``mm``, ``addmm``, ``bmm``, ``baddbmm``) and attention kernel (SDPA's fused CPU kernels,
   forward and backward) of the timed steps, with their shapes, strides and dtypes;
3. replays each distinct recorded call on fresh tensors of the same layout (one warm-up call,
   then the median of ``--repeats``) and sums them, times their counts, per step.

It prints the measured step of each side, alignkit's kernels-alone time per step, the share of
its step they take, and the ceiling ``peer step / kernels alone``: the ratio alignkit would reach
if everything else in its step (elementwise ops, norms, the optimiser, Python) cost nothing. A
target above the ceiling cannot be met at equal work on this machine. The sampling case records
the eager decode step (the compiled one calls the same matmuls, some of its attention products
inside generated loops). Needs ``bench/work/full`` (``python bench/prepare.py``) and the peer
venvs ``run.py`` creates.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import run  # noqa: E402  (sizes, peer venvs, child processes)
from common import StepClock, set_threads  # noqa: E402

aten = torch.ops.aten
# linear: under inference_mode (sampling) it reaches the dispatcher whole, elsewhere as t + mm.
KERNELS = {aten.linear.default, aten.mm.default, aten.mm.out, aten.addmm.default, aten.addmm.out,
           aten.bmm.default, aten.bmm.out, aten.baddbmm.default, aten.baddbmm.out,
           aten._scaled_dot_product_flash_attention_for_cpu.default,
           aten._scaled_dot_product_flash_attention_for_cpu_backward.default}


def _layout(x):
    """A call's argument as a hashable description: tensors by shape, strides and dtype."""
    if isinstance(x, torch.Tensor):
        return ("T", tuple(x.shape), tuple(x.stride()), x.dtype)
    if isinstance(x, (list, tuple)):
        return tuple(_layout(v) for v in x)
    return x


def _build(d):
    if isinstance(d, tuple) and d and d[0] == "T":
        _, shape, stride, dtype = d
        t = torch.empty_strided(shape, stride, dtype=dtype)
        return t.normal_() if t.is_floating_point() else t.zero_()
    if isinstance(d, tuple):
        return tuple(_build(v) for v in d)
    return d


class Recorder(TorchDispatchMode):
    """Counts the kernel calls (``KERNELS``) made while it is on, by layout."""

    def __init__(self):
        super().__init__()
        self.on = False
        self.calls: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.on and func in KERNELS:
            self.calls[(func, _layout(args), _layout(tuple(sorted(kwargs.items()))))] += 1
        return func(*args, **kwargs)


def replay(calls: collections.Counter, repeats: int) -> float:
    """Seconds the recorded calls take run alone: each distinct call timed on fresh tensors."""
    total = 0.0
    with torch.inference_mode():
        for key, count in calls.items():
            total += _time(*key, repeats) * count
    return total


def _time(func, args, kwargs, repeats: int) -> float:
    """Median seconds of one call on fresh tensors of the recorded layout, after a warm-up call."""
    a, kw = _build(args), dict(_build(kwargs))
    func(*a, **kw)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        func(*a, **kw)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def record(spec: dict) -> tuple[collections.Counter, int]:
    """Run the alignkit cell in this process, recording the kernels of its timed steps."""
    import alignkit_cases

    recorder = Recorder()
    first, last = spec["warmup"], spec["warmup"] + spec["steps"]
    if spec["case"] == "sample":
        import alignkit.engine.sampling as sampling

        plain, n = sampling.sample, [0]

        def sample(*args, **kwargs):
            recorder.on = first <= n[0] < last
            n[0] += 1
            try:
                return plain(*args, **kwargs)
            finally:
                recorder.on = False

        sampling.sample = sample
    else:
        mark = StepClock.mark

        def marking(clock):
            mark(clock)
            recorder.on = first <= len(clock.marks) < last

        StepClock.mark = marking
    with recorder:
        alignkit_cases.CASES[spec["case"]](spec)
    return recorder.calls, spec["steps"]


def measure(spec: dict, reps: int, logs: Path) -> dict[str, list[float]]:
    """Both sides' seconds per step, alternately, each in a fresh worker process (as run.py)."""
    peer_py = run.peer_python(run.PEER_OF_CASE.get(spec["case"], "trl"), logs)
    out = {"alignkit": [], "peer": []}
    for rep in range(reps):
        for side in (("alignkit", "peer") if rep % 2 == 0 else ("peer", "alignkit")):
            s = dict(spec, side="alignkit" if side == "alignkit" else "trl")
            py = sys.executable if side == "alignkit" else str(peer_py)
            r = run.run_child([py, str(BENCH / "worker.py"), json.dumps(s)],
                              logs / f"{spec['case']}-{side}-{rep}.log", 600, dict(os.environ))
            if "error" in r or "skipped" in r:
                raise RuntimeError(f"{side}: {r.get('error') or r.get('skipped')}")
            out[side].append(r["seconds"] / r["steps"])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=("sft", "rm", "dpo", "sample", "grpo", "rloo"), default="sft")
    ap.add_argument("--model", default="llama-demo")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--work", default=str(BENCH / "work" / "full"))
    ap.add_argument("--reps", type=int, default=2, help="measurements per side")
    ap.add_argument("--repeats", type=int, default=5, help="timed replays of each distinct kernel call")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default: run.py's)")
    args = ap.parse_args()

    set_threads()
    spec = run.cell_spec(run.FULL[args.case], args.case, args.model, args.precision, args.work)
    if args.steps is not None:
        spec["steps"] = args.steps
    logs = Path(args.work) / "logs" / f"kernel_replay-{time.strftime('%Y%m%d-%H%M%S')}"
    logs.mkdir(parents=True, exist_ok=True)
    steps = measure(spec, args.reps, logs)
    calls, n_steps = record(dict(spec, side="alignkit", compile=False))
    kernels = replay(calls, args.repeats) / n_steps
    ours, peer = statistics.median(steps["alignkit"]), statistics.median(steps["peer"])
    target = run.TARGETS.get(args.case)
    print(f"{args.case} {args.model} {args.precision}: seconds per step, median of {args.reps}")
    print(f"  peer {peer:.4f} ({', '.join(f'{s:.4f}' for s in steps['peer'])})")
    print(f"  alignkit {ours:.4f} ({', '.join(f'{s:.4f}' for s in steps['alignkit'])}): "
          f"ratio {peer / ours:.2f}")
    print(f"  alignkit's matmul and attention kernels alone {kernels:.4f} "
          f"({100 * kernels / ours:.0f}% of its step; {sum(calls.values()) / n_steps:.0f} calls, "
          f"{len(calls)} distinct): ceiling ratio {peer / kernels:.2f}"
          + (f" (target {target})" if target else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

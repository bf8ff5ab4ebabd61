"""Helpers shared by the benchmark workers of both sides (alignkit venv and peer venv).

Imports only the standard library and torch at module level, so it loads in either venv.
A worker measures one (side, case, model, precision) cell in its own process and prints one line
``BENCH_RESULT {json}``; the parent (``bench/run.py``) reads it and the child's peak RSS.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

RESULT_PREFIX = "BENCH_RESULT "


class Skip(Exception):
    """A case that cannot run on this side (missing stage, missing peer feature)."""


def rss_mb() -> float:
    """Current resident set size of this process in MiB (Linux /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def peak_rss_mb() -> float:
    """ru_maxrss of this process in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_jsonl(path: str | Path, n: int | None = None) -> list[dict]:
    rows = []
    with open(path) as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
                if n is not None and len(rows) >= n:
                    break
    if n is not None and len(rows) < n:
        raise ValueError(f"{path}: need {n} records, found {len(rows)}")
    return rows


def real_tokens(batch) -> int:
    """Non-pad tokens of a collated batch: the sum of every ``*attention_mask`` tensor in it, or
    the tokens owned by a sequence in a packed batch (with a pair's shared prefix counted in
    both of its sequences, as a padded batch holds it: the same data)."""
    if "sequence_index" in batch:  # alignkit's packed rows: -1 marks the padding of a row tail
        return computed_tokens(batch) + sum(batch.get("shared_prefix_lens", ()))
    total = 0
    for key, value in batch.items():
        if key.endswith("attention_mask") and hasattr(value, "sum"):
            total += int(value.sum())
    if total == 0 and "position_ids" in batch:  # padding-free batches carry no mask
        total = int(batch["position_ids"].numel())
    return total


def computed_tokens(batch) -> int:
    """Tokens a forward pass over the batch computes, padding excluded (for MFU): fewer than
    ``real_tokens`` where pairs share their prefix (alignkit's ``collate_shared``)."""
    if "sequence_index" in batch:
        return int((batch["sequence_index"] >= 0).sum())
    return real_tokens(batch)


class CountingCollate:
    """Wraps a collate function; remembers the real-token count of every batch it builds, in order.

    Both trainers call their collate exactly once per micro-batch, in training order, so entry
    ``i`` belongs to step ``i + 1`` when one micro-batch makes one step (the benchmark setting).
    """

    def __init__(self, collate):
        self.collate = collate
        self.tokens: list[int] = []
        self.computed: list[int] = []
        self.rows: list[int] = []

    def __call__(self, features):
        batch = self.collate(features)
        self.tokens.append(real_tokens(batch))
        self.computed.append(computed_tokens(batch))
        self.rows.append(len(features))
        return batch

    def reset(self):
        self.tokens.clear()
        self.computed.clear()
        self.rows.clear()

    def __getattr__(self, name):  # trainers sometimes read attributes of their collator
        return getattr(self.collate, name)


class StepClock:
    """``mark()`` at the end of every optimiser step; the first ``warmup`` steps are not timed."""

    def __init__(self):
        self.marks: list[float] = []
        self.start = time.perf_counter()

    def mark(self):
        self.marks.append(time.perf_counter())

    def timed(self, warmup: int, steps: int) -> tuple[float, list[float]]:
        """(seconds of steps ``warmup+1 .. warmup+steps``, per-step seconds)."""
        need = warmup + steps
        if len(self.marks) < need:
            raise RuntimeError(f"only {len(self.marks)} steps ran, {need} expected")
        if warmup == 0:
            raise ValueError("warmup must be >= 1 (the first step is the time origin)")
        per_step = [b - a for a, b in zip(self.marks[warmup - 1:need - 1], self.marks[warmup:need])]
        return self.marks[need - 1] - self.marks[warmup - 1], per_step


def training_result(clock: StepClock, counter: CountingCollate, warmup: int, steps: int,
                    items_per_step: int, extra: dict | None = None) -> dict:
    seconds, per_step = clock.timed(warmup, steps)
    if len(counter.tokens) < warmup + steps:
        raise RuntimeError(f"collate ran {len(counter.tokens)} times for {warmup + steps} steps")
    tokens = sum(counter.tokens[warmup:warmup + steps])
    out = {"seconds": seconds, "steps": steps, "tokens": tokens,
           "items": items_per_step * steps, "tokens_per_s": tokens / seconds,
           "items_per_s": items_per_step * steps / seconds,
           "step_s_median": statistics.median(per_step), "step_s": per_step,
           "warmup_tokens": sum(counter.tokens[:warmup])}
    computed = sum(counter.computed[warmup:warmup + steps])
    if computed != tokens:
        out["computed_tokens_per_s"] = computed / seconds
    out.update(extra or {})
    return out


def rl_result(spec: dict, clock: StepClock, gen_tokens: list[int], per_iter: int) -> dict:
    """Throughput of an RL case: ``gen_tokens`` generated per iteration, ``per_iter`` completions."""
    seconds, per_step = clock.timed(spec["warmup"], spec["steps"])
    w, s = spec["warmup"], spec["steps"]
    tokens = sum(gen_tokens[w:w + s])
    return {"seconds": seconds, "steps": s, "tokens": tokens, "items": per_iter * s,
            "tokens_per_s": tokens / seconds, "items_per_s": per_iter * s / seconds,
            "iters_per_s": s / seconds, "step_s_median": statistics.median(per_step),
            "step_s": per_step}


def sampling_result(spec: dict, times: list[float], tokens: list[int]) -> dict:
    """Throughput of the sampling case: one call per step, ``spec["batch"]`` completions each;
    ``times``/``tokens`` per call, warm-up calls first."""
    w = spec["warmup"]
    seconds = sum(times[w:])
    return {"seconds": seconds, "steps": spec["steps"], "tokens": sum(tokens[w:]),
            "items": spec["batch"] * spec["steps"], "tokens_per_s": sum(tokens[w:]) / seconds,
            "items_per_s": spec["batch"] * spec["steps"] / seconds,
            "step_s_median": statistics.median(times[w:]), "step_s": times[w:]}


def emit(result: dict) -> None:
    result.setdefault("peak_rss_self_mb", peak_rss_mb())
    sys.stdout.flush()
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def set_threads():
    """Same thread count on both sides: whatever BENCH_THREADS says, else torch's default."""
    import torch

    n = os.environ.get("BENCH_THREADS")
    if n:
        torch.set_num_threads(int(n))
    return torch.get_num_threads()


def seed_all(seed: int):
    import random

    import torch

    random.seed(seed)
    torch.manual_seed(seed)


def autocast_dtype(precision: str):
    import torch

    return {"fp32": None, "bf16": torch.bfloat16}[precision]


def reward_of_ids(ids) -> float:
    """The cheap, deterministic reward both sides use in RL cases: share of even token ids.

    A pure function of the completion's token ids (no model), so reward cost is equal and
    negligible on both sides and the iteration time is rollout + update only.
    """
    ids = list(ids)
    return sum(1 for t in ids if t % 2 == 0) / max(len(ids), 1)


def reward_of_texts(prompts, responses) -> list[float]:
    """The same kind of cheap reward for alignkit's ``python:MOD:FN`` reward source (text in):
    share of letters that are vowels. Its cost is negligible next to a rollout, as on the peer."""
    return [sum(c in "aeiou" for c in r) / max(len(r), 1) for r in responses]

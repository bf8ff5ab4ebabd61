"""One process of a multi-process SFT run for tests/engine/test_strategies.py (launched with
torchrun): ``python sharded_worker.py RUNS_JSON``, each run ``{"model", "out", "strategy",
"lora", "resume", "probe"}`` through ``alignkit.stages.sft.main``, or ``{"model", "out",
"strategy", "pairs"}`` through ``alignkit.stages.dpo.main``, one after another.

``probe``: watch how the strategy builds the model (:func:`probe`)."""

import contextlib
import gc
import json
import sys
import weakref
from pathlib import Path

import torch
import torch.distributed as dist


def sft_config(model: str, out: str, strategy: str = "ddp", lora: bool = False,
               resume: str = "auto"):
    from alignkit.config import build
    from alignkit.stages import sft

    return build(sft.Config, {
        "model": model, "out_dir": out,
        "data": {"train": "task:sentiment", "task_samples": 48, "max_length": 64},
        "lora": {"enabled": lora, "r": 4, "alpha": 8},
        "optim": {"lr": 3e-3, "warmup_steps": 1},
        "train": {"max_steps": 4, "batch_size": 8, "micro_batch_size": 2, "mixed_precision": "no",
                  "save_every": 2, "keep_checkpoints": 2, "log_every": 1, "strategy": strategy,
                  "resume": resume}})


def dpo_config(model: str, out: str, pairs: str, strategy: str = "ddp"):
    """DPO whose reference (the initial policy) the strategy keeps: sharded under fsdp2 / zero3;
    its cached pass in batches of 32 pairs, split between the processes."""
    from alignkit.config import build
    from alignkit.stages import dpo

    return build(dpo.Config, {
        "model": model, "out_dir": out, "data": {"train": pairs, "max_length": 64},
        "loss": {"name": "dpo", "beta": 0.5}, "optim": {"lr": 3e-3, "warmup_steps": 1},
        "train": {"max_steps": 3, "batch_size": 8, "micro_batch_size": 2, "mixed_precision": "no",
                  "log_every": 1, "save_every": 0, "strategy": strategy}})


@contextlib.contextmanager
def watch_frozen(strategy: str, out: str):
    """Each process writes ``OUT/frozen_rank<r>.json``: how many of the frozen model's weights
    it holds after ``prepare_frozen`` (its shard: DTensor local or ZeRO-3 partition) and how
    many the model has; after the run, whether it was freed."""
    from alignkit.engine.strategies import STRATEGIES

    cls = STRATEGIES[strategy]
    prepare_frozen = cls.prepare_frozen
    Path(out).mkdir(parents=True, exist_ok=True)

    def spy(self, model):
        frozen = prepare_frozen(self, model)
        watched.append(weakref.ref(frozen))
        params = list(frozen.parameters())
        local = sum(getattr(p, "to_local", lambda: p)().numel() if not hasattr(p, "ds_id")
                    else p.ds_tensor.numel() for p in params)
        whole = sum(getattr(p, "ds_numel", p.numel()) for p in params)
        Path(out, f"frozen_rank{self.rank}.json").write_text(json.dumps(
            {"local": local, "whole": whole, "trainable": sum(p.requires_grad for p in params)}))
        return frozen

    watched: list = []
    cls.prepare_frozen = spy
    try:
        yield
    finally:
        cls.prepare_frozen = prepare_frozen
    gc.collect()   # the run is over: nothing of the frozen model should be left
    path = Path(out, f"frozen_rank{dist.get_rank() if dist.is_initialized() else 0}.json")
    if watched and path.exists():
        path.write_text(json.dumps({**json.loads(path.read_text()),
                                    "freed": all(w() is None for w in watched)}))


@contextlib.contextmanager
def probe(strategy: str, out: str):
    """Watch the strategy's ``build`` and first ``prepare`` during a run: each process writes
    ``OUT/build_rank<r>.json`` (whether it called ``load``, i.e. loaded the whole weights, and
    how often, of how many builds; how many parameters the last built model has, how many on the meta device, how many ZeRO-3
    partitions smaller than their parameter) and the main process ``OUT/built.pt``: the whole
    weights right after ``prepare`` (``full_state_dict``, before any step)."""
    from alignkit.engine.strategies import STRATEGIES

    cls = STRATEGIES[strategy]
    build, prepare = cls.build, cls.prepare
    Path(out).mkdir(parents=True, exist_ok=True)
    seen: dict = {}

    def spy_build(self, load, empty):
        seen["builds"] = seen.get("builds", 0) + 1
        seen.setdefault("loads", 0)
        seen.setdefault("loaded", False)

        def spy_load():
            seen["loaded"] = True
            seen["loads"] += 1
            return load()

        model = build(self, spy_load, empty)
        params = list(model.parameters())
        seen.update(params=len(params), meta=sum(p.is_meta for p in params),
                    partitioned=sum(hasattr(p, "ds_id") and p.numel() < p.ds_numel for p in params))
        Path(out, f"build_rank{self.rank}.json").write_text(json.dumps(seen))
        return model

    def spy_prepare(self, *objects):
        prepared = prepare(self, *objects)
        if not seen.get("prepared"):
            seen["prepared"] = True
            model = next(o for o in (prepared if isinstance(prepared, tuple) else (prepared,))
                         if isinstance(o, torch.nn.Module))
            sd = self.full_state_dict(model)
            if self.rank == 0:
                torch.save({k: v.clone() for k, v in sd.items()}, Path(out, "built.pt"))
        return prepared

    cls.build, cls.prepare = spy_build, spy_prepare
    try:
        yield
    finally:
        cls.build, cls.prepare = build, prepare


def main(runs: list[dict]) -> None:
    from alignkit.stages import dpo, sft

    torch.set_num_threads(1)
    for run in runs:
        run = dict(run)
        strategy = run.get("strategy", "ddp")
        if "pairs" in run:
            with watch_frozen(strategy, run["out"]):
                dpo.main(dpo_config(**run))
            continue
        watch = probe(strategy, run["out"]) if run.pop("probe", False) \
            else contextlib.nullcontext()
        with watch:
            sft.main(sft_config(**run))
    if dist.is_initialized():
        dist.barrier()      # else a rank can leave while another still talks to it
        dist.destroy_process_group()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))

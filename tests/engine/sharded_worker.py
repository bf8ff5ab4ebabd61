"""One process of a multi-process SFT run for tests/engine/test_strategies.py (launched with
torchrun): ``python sharded_worker.py RUNS_JSON``, each run ``{"model", "out", "strategy",
"lora", "resume", "probe"}``, run one after another through ``alignkit.stages.sft.main``.

``probe``: watch how the strategy builds the model (:func:`probe`)."""

import contextlib
import json
import sys
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


@contextlib.contextmanager
def probe(strategy: str, out: str):
    """Watch the strategy's ``build`` and first ``prepare`` during a run: each process writes
    ``OUT/build_rank<r>.json`` (whether it called ``load``, i.e. loaded the whole weights; how
    many parameters the built model has, how many on the meta device, how many ZeRO-3
    partitions smaller than their parameter) and the main process ``OUT/built.pt``: the whole
    weights right after ``prepare`` (``full_state_dict``, before any step)."""
    from alignkit.engine.strategies import STRATEGIES

    cls = STRATEGIES[strategy]
    build, prepare = cls.build, cls.prepare
    Path(out).mkdir(parents=True, exist_ok=True)
    seen: dict = {}

    def spy_build(self, load, empty):
        seen["loaded"] = False

        def spy_load():
            seen["loaded"] = True
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
    from alignkit.stages import sft

    torch.set_num_threads(1)
    for run in runs:
        run = dict(run)
        watch = probe(run.get("strategy", "ddp"), run["out"]) if run.pop("probe", False) \
            else contextlib.nullcontext()
        with watch:
            sft.main(sft_config(**run))
    if dist.is_initialized():
        dist.barrier()      # else a rank can leave while another still talks to it
        dist.destroy_process_group()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))

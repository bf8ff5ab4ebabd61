"""One process of a multi-process SFT run for tests/engine/test_strategies.py (launched with
torchrun): ``python sharded_worker.py RUNS_JSON``, each run ``{"model", "out", "strategy",
"lora", "resume"}``, run one after another through ``alignkit.stages.sft.main``."""

import json
import sys

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


def main(runs: list[dict]) -> None:
    from alignkit.stages import sft

    torch.set_num_threads(1)
    for run in runs:
        sft.main(sft_config(**run))
    if dist.is_initialized():
        dist.barrier()      # else a rank can leave while another still talks to it
        dist.destroy_process_group()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))

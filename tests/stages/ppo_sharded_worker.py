"""One process of a multi-process PPO / GRPO run for tests/stages/test_ppo_sharded.py (launched
with torchrun): ``python ppo_sharded_worker.py RUNS_JSON``, each run ``{"model", "prompts",
"out", "algo", "strategy", "resume"}``, run one after another through ``alignkit.stages.ppo.main``;
each process writes how its models were built (``build_rank<r>.json``) and how much of the
frozen reference it holds (``frozen_rank<r>.json``)."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def count_e(prompts, responses):
    """Reward: how many letters "e" the response holds."""
    return [float(r.count("e")) for r in responses]


def ppo_config(model: str, prompts: str, out: str, algo: str = "ppo", strategy: str = "ddp",
               resume: str = "auto"):
    from alignkit.config import build
    from alignkit.stages import ppo

    return build(ppo.Config, {
        "model": model, "reward": "python:ppo_sharded_worker:count_e", "out_dir": out,
        "iterations": 2, "save_every": 1, "resume": resume, "strategy": strategy,
        "report_to": "none", "seed": 3,
        "rollout": {"prompts": prompts, "prompts_per_iteration": 4, "samples_per_prompt": 2,
                    "batch_size": 8, "sampling": {"max_new_tokens": 8}},
        "ppo": {"algo": algo, "epochs": 1, "minibatch_size": 4, "micro_batch_size": 1},
        "optim": {"lr": 3e-3, "schedule": "constant"},
        "value_optim": {"lr": 3e-3, "schedule": "constant"},
        "kl": {"beta": 0.01}, "score": {"normalize": "standardize"}})


def main(runs: list[dict]) -> None:
    from alignkit.stages import ppo
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
    from sharded_worker import probe, watch_frozen   # tests/engine's worker

    torch.set_num_threads(1)
    for run in runs:
        strategy = run.get("strategy", "ddp")
        with probe(strategy, run["out"]), watch_frozen(strategy, run["out"]):
            ppo.main(ppo_config(**run))
    if dist.is_initialized():
        dist.barrier()      # else a rank can leave while another still talks to it
        dist.destroy_process_group()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))

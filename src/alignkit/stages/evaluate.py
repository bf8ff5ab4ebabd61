"""``alignkit evaluate``: sample a policy on held-out prompts and measure it.

Metrics: gold reward (built-in tasks; mean, std and standard error over prompts), proxy reward
(a reward source, e.g. the trained RM), KL to the reference policy (sequence-level, k1 estimate
``E_y~pi[log pi(y|x) - log ref(y|x)]``, Schulman 2020), response length, and a few samples.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alignkit.config import require
from alignkit.engine.generation import SamplingConfig


@dataclass(frozen=True)
class Config:
    policy: str = ""
    reference: str | None = None      # default: no KL reported
    task: str = "sentiment"
    chat: bool = False
    proxy_reward: str | None = None   # reward source spec, e.g. model:runs/rm/model
    num_prompts: int = 200
    samples_per_prompt: int = 1
    split: str = "test"
    batch_size: int = 64
    seed: int = 1234
    success_at: float | None = None   # also report gold_success: the share of gold >= this
    out_dir: str = "runs/eval"
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def __post_init__(self):
        require(bool(self.policy), "policy is required (path of a causal LM)")
        require(self.samples_per_prompt >= 1, "samples_per_prompt must be >= 1")


def prompt_records(prompts: list[str], chat: bool) -> list[dict]:
    if chat:
        return [{"messages": [{"role": "user", "content": p}]} for p in prompts]
    return [{"prompt": p} for p in prompts]


def encode_prompts(prompts: list[str], tokenizer, chat: bool) -> list[list[int]]:
    """Prompt token ids exactly as the data layer builds them for training."""
    from alignkit.data.formats import prompt_ids

    return [prompt_ids(r, tokenizer) for r in prompt_records(prompts, chat)]


@torch.no_grad()
def sample_policy(model, tokenizer, prompts: list[str], sampling: SamplingConfig, *, chat: bool,
                  seed: int, batch_size: int = 64):
    """Sample one response per prompt; returns the rollout and the decoded response texts."""
    from alignkit.engine.generation import generate

    ids = encode_prompts(prompts, tokenizer, chat)
    gen = torch.Generator().manual_seed(seed)
    rollout = generate(model, ids, sampling, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, generator=gen, batch_size=batch_size)
    return rollout, rollout.decode(tokenizer)


@torch.no_grad()
def sequence_kl(policy, reference, rollout, temperature: float = 1.0) -> torch.Tensor:
    """Per-sample ``sum_t log pi - log ref`` over response tokens (k1; unbiased for seq. KL)."""
    from alignkit.engine.generation import rollout_logps

    pi = rollout_logps(policy, rollout, temperature)
    ref = rollout_logps(reference, rollout, temperature)
    return ((pi - ref) * rollout.response_mask).sum(-1)


def summarize(values: list[float], prefix: str) -> dict:
    n = len(values)
    mean = sum(values) / max(n, 1)
    var = sum((v - mean) ** 2 for v in values) / max(n - 1, 1)
    return {f"{prefix}_mean": mean, f"{prefix}_std": math.sqrt(var),
            f"{prefix}_sem": math.sqrt(var / max(n, 1))}


def success_metrics(gold, success_at: float | None) -> dict:
    """``gold_success_{mean,std,sem}``: the share of gold rewards >= ``success_at`` (on
    ``arithmetic`` with ``success_at=1.0``, accuracy); nothing when ``success_at`` is None."""
    if success_at is None:
        return {}
    return summarize([float(g >= success_at) for g in gold], "gold_success")


def evaluate_policy(policy, tokenizer, cfg: Config, reference=None, proxy=None) -> tuple[dict, list[dict]]:
    from alignkit.engine.scoring import GoldReward

    task_prompts = GoldReward(cfg.task, chat=cfg.chat).task.prompts(cfg.split, cfg.num_prompts)
    prompts = [p for p in task_prompts for _ in range(cfg.samples_per_prompt)]
    policy.eval()
    rollout, responses = sample_policy(policy, tokenizer, prompts, cfg.sampling, chat=cfg.chat,
                                       seed=cfg.seed, batch_size=cfg.batch_size)
    gold = GoldReward(cfg.task, chat=cfg.chat)(prompts, responses)
    metrics = summarize(gold, "gold_reward")
    metrics.update(success_metrics(gold, cfg.success_at))
    lengths = rollout.response_mask.sum(-1).float()
    metrics["response_length"] = float(lengths.mean())
    metrics["finished_fraction"] = float(rollout.finished.float().mean())
    rows = [{"prompt": p, "response": r, "gold_reward": g}
            for p, r, g in zip(prompts, responses, gold)]
    if proxy is not None:
        proxy_scores = proxy(prompts, responses)
        metrics.update(summarize(proxy_scores, "proxy_reward"))
        for row, s in zip(rows, proxy_scores):
            row["proxy_reward"] = s
    if reference is not None:
        kl = sequence_kl(policy, reference, rollout, _temperature(cfg.sampling)).tolist()
        metrics["kl_to_ref"] = sum(kl) / len(kl)
        metrics["kl_estimator"] = "k1"
    else:
        metrics["kl_to_ref"] = 0.0
    return metrics, rows


def _temperature(sampling: SamplingConfig) -> float:
    return sampling.temperature if sampling.temperature > 0 else 1.0


def main(cfg: Config) -> dict:
    from alignkit.engine.models import load_causal_lm, load_tokenizer
    from alignkit.engine.scoring import make_reward_source
    from alignkit.tracking import Tracker

    tracker = Tracker(cfg.out_dir, cfg, stage="evaluate")
    tokenizer = load_tokenizer(cfg.policy)
    policy = load_causal_lm(cfg.policy, tokenizer=tokenizer)
    reference = load_causal_lm(cfg.reference, tokenizer=tokenizer) if cfg.reference else None
    proxy = make_reward_source(cfg.proxy_reward, chat=cfg.chat) if cfg.proxy_reward else None
    metrics, rows = evaluate_policy(policy, tokenizer, cfg, reference, proxy)
    out = Path(cfg.out_dir)
    with (out / "samples.jsonl").open("w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    tracker.log(0, {k: v for k, v in metrics.items() if not isinstance(v, str)})
    return tracker.finish(metrics)

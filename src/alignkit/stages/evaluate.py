"""``alignkit evaluate``: sample a policy on held-out prompts and measure it.

Metrics: gold reward (built-in tasks; mean, std and standard error over prompts), proxy reward
(a reward source, e.g. the trained RM), KL to the reference policy (sequence-level, k1 estimate
``E_y~pi[log pi(y|x) - log ref(y|x)]``, Schulman 2020), response length, and a few samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from alignkit.config import require
from alignkit.engine.sampling import SamplingConfig
from alignkit.tracking import TrackingConfig


@dataclass(frozen=True)
class Config(TrackingConfig):
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


def main(cfg: Config) -> dict:
    from alignkit.data.io import write_jsonl
    from alignkit.engine.evaluation import evaluate_on_task
    from alignkit.engine.models import load_causal_lm, load_tokenizer
    from alignkit.engine.scoring import make_reward_source
    from alignkit.tracking import Tracker

    tracker = Tracker(cfg.out_dir, cfg, stage="evaluate")
    tokenizer = load_tokenizer(cfg.policy)
    policy = load_causal_lm(cfg.policy, tokenizer=tokenizer)
    reference = load_causal_lm(cfg.reference, tokenizer=tokenizer) if cfg.reference else None
    proxy = make_reward_source(cfg.proxy_reward, chat=cfg.chat) if cfg.proxy_reward else None
    metrics, rows = evaluate_on_task(
        policy, tokenizer, cfg.task, cfg.sampling, chat=cfg.chat, split=cfg.split,
        num_prompts=cfg.num_prompts, samples_per_prompt=cfg.samples_per_prompt, seed=cfg.seed,
        batch_size=cfg.batch_size, success_at=cfg.success_at, reference=reference, proxy=proxy)
    write_jsonl(Path(cfg.out_dir) / "samples.jsonl", rows)
    tracker.log(0, {k: v for k, v in metrics.items() if not isinstance(v, str)})
    return tracker.finish(metrics)

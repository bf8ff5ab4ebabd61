"""``alignkit evaluate``: sample a policy on held-out prompts and measure it.

Prompts: a built-in task's test split (``task``), or a user's file of prompt records
(``prompts``: ``{"prompt": ...}`` or ``{"messages": [...]}``). Metrics: the task's gold reward
(mean, std and standard error over samples; ``success_at``: the share above a line), any number
of reward sources (``proxy_reward`` and ``rewards``: ``model:PATH``, ``python:MOD:FN``,
``judge:CONFIG``, ``gold:TASK``; each as ``NAME_mean`` / ``_std`` / ``_sem``), KL to an optional
reference policy (sequence-level, k1 estimate ``E_y~pi[log pi(y|x) - log ref(y|x)]``, Schulman
2020), response length, and a win rate against a baseline policy judged by a pairwise AI judge
(AlpacaEval-style, Li et al. 2023: the judge's probability that the policy's response is the
better one, both orders averaged to cancel position bias); every sample in ``samples.jsonl``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from alignkit.config import require
from alignkit.engine.sampling import SamplingConfig
from alignkit.engine.workers import WorkersConfig
from alignkit.tracking import TrackingConfig


@dataclass(frozen=True)
class Config(TrackingConfig):
    policy: str = ""
    reference: str | None = None      # KL to this policy; default: no KL reported
    task: str | None = None           # built-in task: its test prompts and its gold reward
    prompts: str | None = None        # a file of prompt records (or task:NAME[:chat]) instead
    chat: bool = False
    chat_template: str | None = None  # for chat=true: a Jinja template or a .jinja file
    proxy_reward: str | None = None   # reward source spec, e.g. model:runs/rm/model
    rewards: list[str] = field(default_factory=list)   # more sources: "NAME=SPEC" or "SPEC"
    baseline: str | None = None       # a baseline policy: the win rate against it (needs judge)
    judge: str | None = None          # a judge config file (its pairwise template judges)
    num_prompts: int = 200
    samples_per_prompt: int = 1
    split: str = "test"
    batch_size: int = 64
    seed: int = 1234
    success_at: float | None = None   # also report gold_success: the share of gold >= this
    out_dir: str = "runs/eval"
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)   # where sampling and RM scoring run: local | ray

    def __post_init__(self):
        require(bool(self.policy), "policy is required (path of a causal LM)")
        require(self.samples_per_prompt >= 1, "samples_per_prompt must be >= 1")
        require(self.task is not None or self.prompts is not None,
                "set task (a built-in task) or prompts (a file of prompt records)")
        require((self.baseline is None) == (self.judge is None),
                "a win rate needs both baseline (a policy) and judge (a judge config file)")
        require(self.success_at is None or self.task is not None,
                "success_at needs task (it is a share of gold rewards)")
        names = [name for name, _ in reward_specs(self)]
        require(len(names) == len(set(names)), f"rewards: two sources named alike in {names}")


def reward_specs(cfg: Config) -> list[tuple[str, str]]:
    """``(metric name, source spec)`` of every reward source to report (gold first)."""
    out = [("gold_reward", f"gold:{cfg.task}" + (":chat" if cfg.chat else ""))] if cfg.task else []
    if cfg.proxy_reward:
        out.append(("proxy_reward", cfg.proxy_reward))
    for item in cfg.rewards:
        name, sep, spec = item.partition("=")
        if not sep:   # a bare spec: named after it, e.g. python:mod:fn -> python_mod_fn
            name, spec = re.sub(r"\W+", "_", item).strip("_"), item
        out.append((name, spec))
    return out


def main(cfg: Config) -> dict:
    from alignkit.data.io import write_jsonl
    from alignkit.data.sources import load_prompts
    from alignkit.engine.evaluation import evaluate_policy, win_rate
    from alignkit.engine.models import load_causal_lm, load_tokenizer
    from alignkit.engine.scoring import make_reward_source
    from alignkit.tracking import Tracker

    tracker = Tracker(cfg.out_dir, cfg, stage="evaluate")
    tokenizer = load_tokenizer(cfg.policy, cfg.chat_template, chat=cfg.chat)
    policy = load_causal_lm(cfg.policy, tokenizer=tokenizer)
    reference = load_causal_lm(cfg.reference, tokenizer=tokenizer) if cfg.reference else None
    sources = {name: make_reward_source(spec, chat=cfg.chat, workers=cfg.workers)
               for name, spec in reward_specs(cfg)}
    spec = cfg.prompts or f"task:{cfg.task}"
    prompts = [p for p in load_prompts(spec, cfg.split, cfg.num_prompts, cfg.chat)
               for _ in range(cfg.samples_per_prompt)]
    metrics, rows = evaluate_policy(policy, tokenizer, prompts, cfg.sampling, chat=cfg.chat,
                                    seed=cfg.seed, batch_size=cfg.batch_size, sources=sources,
                                    success_at=cfg.success_at, reference=reference,
                                    workers=cfg.workers)
    if cfg.baseline:
        from alignkit.engine.judges import load_judge_config

        baseline = load_causal_lm(cfg.baseline, tokenizer=tokenizer)
        metrics.update(win_rate(load_judge_config(cfg.judge), baseline, tokenizer, rows,
                                cfg.sampling, chat=cfg.chat, seed=cfg.seed,
                                batch_size=cfg.batch_size, workers=cfg.workers))
    write_jsonl(Path(cfg.out_dir) / "samples.jsonl", rows)
    tracker.log(0, {k: v for k, v in metrics.items() if not isinstance(v, str)})
    return tracker.finish(metrics)

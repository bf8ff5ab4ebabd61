"""The metrics every stage reports about a policy: sample it on held-out prompts and score.

Gold reward (built-in tasks; mean, std and standard error over samples), any other reward
source (e.g. the trained RM as the proxy), the share of gold rewards above a success line, KL to
the reference policy (sequence-level k1, ``E_y~pi[log pi(y|x) - log ref(y|x)]``, Schulman 2020),
response length and the finished fraction; plus one row per sample for ``samples.jsonl``.
"""

from __future__ import annotations

import math

import torch

from alignkit.engine.generation import rollout_logps
from alignkit.engine.sampling import SamplingConfig, sample_texts
from alignkit.engine.workers import WorkersConfig
from alignkit.math.advantages import sequence_kl


def summarize(values: list[float], prefix: str) -> dict:
    """``{prefix}_mean``, ``_std`` (sample) and ``_sem`` (standard error) of ``values``."""
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


@torch.no_grad()
def rollout_kl(policy, reference, rollout, temperature: float = 1.0) -> torch.Tensor:
    """Per-sample ``sum_t log pi - log ref`` over a rollout's response tokens ``[B]`` (k1: an
    unbiased estimate of the sequence KL), both models' training forwards."""
    pi = rollout_logps(policy, rollout, temperature)
    ref = rollout_logps(reference, rollout, temperature)
    return sequence_kl(pi, ref, rollout.response_mask, "k1")


def temperature_of(sampling: SamplingConfig) -> float:
    """The temperature log-probs are taken at: the sampling one, 1 for greedy decoding."""
    return sampling.temperature if sampling.temperature > 0 else 1.0


def evaluate_policy(policy, tokenizer, prompts: list[str], sampling: SamplingConfig, *,
                    chat: bool, seed: int, batch_size: int = 64, sources: dict | None = None,
                    success_at: float | None = None, reference=None,
                    workers: WorkersConfig | None = None) -> tuple[dict, list[dict]]:
    """Sample one response per prompt and measure it; returns ``(metrics, rows)``.

    ``sources``: metric name -> reward source (``gold_reward``, ``proxy_reward``, ...), each
    summarised by :func:`summarize` and written into every row; the success share is of
    ``gold_reward``. ``reference``: KL to it (``kl_to_ref``), else ``kl_to_ref`` is 0.
    ``workers``: where the sampling runs (:mod:`alignkit.engine.workers`)."""
    policy.eval()
    rollout, responses = sample_texts(policy, tokenizer, prompts, sampling, chat=chat, seed=seed,
                                      batch_size=batch_size, workers=workers)
    rows = [{"prompt": p, "response": r} for p, r in zip(prompts, responses)]
    metrics = {"response_length": float(rollout.response_mask.sum(-1).float().mean()),
               "finished_fraction": float(rollout.finished.float().mean())}
    for name, source in (sources or {}).items():
        scores = source(prompts, responses)
        metrics.update(summarize(scores, name))
        if name == "gold_reward":
            metrics.update(success_metrics(scores, success_at))
        for row, s in zip(rows, scores):
            row[name] = s
    if reference is not None:
        kl = rollout_kl(policy, reference, rollout, temperature_of(sampling)).tolist()
        metrics["kl_to_ref"] = sum(kl) / len(kl)
        metrics["kl_estimator"] = "k1"
    else:
        metrics["kl_to_ref"] = 0.0
    return metrics, rows


def evaluate_on_task(policy, tokenizer, task: str, sampling: SamplingConfig, *, chat: bool = False,
                     split: str = "test", num_prompts: int = 200, samples_per_prompt: int = 1,
                     seed: int = 1234, batch_size: int = 64, success_at: float | None = None,
                     reference=None, proxy=None,
                     workers: WorkersConfig | None = None) -> tuple[dict, list[dict]]:
    """:func:`evaluate_policy` on the first ``num_prompts`` prompts of a built-in task's
    ``split`` (each ``samples_per_prompt`` times), scored by its gold reward and ``proxy``."""
    from alignkit.engine.scoring import GoldReward

    gold = GoldReward(task, chat=chat)
    prompts = [p for p in gold.task.prompts(split, num_prompts) for _ in range(samples_per_prompt)]
    sources = {"gold_reward": gold, **({"proxy_reward": proxy} if proxy is not None else {})}
    return evaluate_policy(policy, tokenizer, prompts, sampling, chat=chat, seed=seed,
                           batch_size=batch_size, sources=sources, success_at=success_at,
                           reference=reference, workers=workers)


def win_rate(judge_cfg, baseline, tokenizer, rows: list[dict], sampling: SamplingConfig, *,
             chat: bool, seed: int, batch_size: int = 64,
             workers: WorkersConfig | None = None) -> dict:
    """The win rate of the responses in ``rows`` (``prompt``, ``response``) against a baseline
    policy's on the same prompts (same seed), judged pairwise by the judge of ``judge_cfg``
    (AlpacaEval-style, Li et al. 2023): ``win_rate_{mean,std,sem}`` of the judge's probability
    that the policy's response is better (both orders averaged when ``judge.swap``: the position
    bias cancels), ``win_fraction`` (ties half), the pairs judged; each row gets the baseline's
    response and its ``win_prob`` (None where the judge gave no usable answer)."""
    from alignkit.engine.judges import PairwiseJudge

    prompts = [r["prompt"] for r in rows]
    baseline.eval()
    _, theirs = sample_texts(baseline, tokenizer, prompts, sampling, chat=chat, seed=seed,
                             batch_size=batch_size, workers=workers)
    judgements = PairwiseJudge(judge_cfg).judge(prompts, [r["response"] for r in rows], theirs)
    for row, other, j in zip(rows, theirs, judgements):
        row["baseline_response"], row["win_prob"] = other, j.prob_a
    probs = [j.prob_a for j in judgements if j.prob_a is not None]
    labels = [j.label for j in judgements if j.label is not None]
    out = summarize(probs, "win_rate")
    out["win_fraction"] = sum({"a": 1.0, "tie": 0.5}.get(x, 0.0) for x in labels) / max(len(labels), 1)
    out["win_pairs_judged"] = len(probs)
    return out

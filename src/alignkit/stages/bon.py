"""``alignkit bon``: best-of-n sampling, as inference and as an evaluation of the reward-KL trade.

For each prompt the policy draws ``M = max(n)`` samples once; the proxy reward (the selector)
and, on built-in tasks, the gold reward score them. For each ``n`` in ``n``:

* the reward of the chosen sample, estimated from all ``C(M, n)`` subsets of the ``M`` samples
  (an unbiased U-statistic for ``E[reward of best-of-n]``, lower variance than one draw);
* the analytic KL bound ``KL(pi_bon || pi) <= log n - (n - 1) / n`` (Stiennon et al. 2020,
  appendix; Beirami et al. 2024, "Theoretical guarantees on the best-of-n alignment policy",
  who show it is an upper bound, tight only when no two samples share a reward);
* a plug-in estimate of that KL: best-of-n of the empirical distribution of the ``M`` samples,
  whose selection probabilities follow from the rank statistics of the rewards (ties count as one
  level: ``P(level l) = F(l)^n - F(l-)^n``), compared with the empirical distribution itself.

Writes ``samples.jsonl`` (every sample with its scores), ``chosen.jsonl`` (best of ``M`` per prompt:
the inference output), ``metrics.jsonl`` (one row per ``n``, ``step = n``) and ``metrics.json``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from alignkit.config import require
from alignkit.engine.sampling import SamplingConfig
from alignkit.engine.workers import WorkersConfig
from alignkit.tracking import TrackingConfig


@dataclass(frozen=True)
class Config(TrackingConfig):
    policy: str = ""
    reward: str = ""                    # the selector: model:PATH, gold:TASK, python:MOD:FN, ...
    task: str | None = None             # built-in task: default prompts and the gold reward
    chat: bool = False
    chat_template: str | None = None  # for chat=true: a Jinja template or a .jinja file
    prompts: str | None = None          # "task:NAME" (test split) or a prompt file
    heldout: str | None = None          # a second signal to report (e.g. another RM); gold on tasks
    num_prompts: int = 100
    n: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    batch_size: int = 64
    seed: int = 1234
    out_dir: str = "runs/bon"
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)   # where sampling and RM scoring run: local | ray

    def __post_init__(self):
        require(bool(self.policy), "policy is required (path of a causal LM)")
        require(bool(self.reward), "reward is required (the reward source that picks the best)")
        require(len(self.n) >= 1 and all(n >= 1 for n in self.n), "n must list values >= 1")
        require(self.task is not None or self.prompts is not None, "set task or prompts")
        require(self.num_prompts > 0, "num_prompts must be > 0")


# ----------------------------------------------------------------------------------------------
# The math of best-of-n. ``rewards`` are the selector's scores of the M samples of one prompt.


def kl_bound(n: int) -> float:
    """``log n - (n - 1) / n``: the KL of best-of-n to the base policy for continuous rewards."""
    return math.log(n) - (n - 1) / n


def selection_probs(rewards, n: int, replace: bool) -> np.ndarray:
    """Probability that each of the ``M`` samples is the one best-of-n picks, ``[M]``.

    ``replace=True``: best of ``n`` i.i.d. draws from the empirical distribution of the samples
    (``P(level l) = F(l)^n - F(l-)^n``). ``replace=False``: best of a uniformly random ``n``-subset
    (``(C(c_l, n) - C(c_{l-1}, n)) / C(M, n)`` with ``c_l`` the samples at or below level ``l``),
    which needs ``n <= M``. Tied samples share their level's probability equally: among i.i.d.
    draws, which of two equal rewards is picked does not depend on the sample.
    """
    r = np.asarray(rewards, dtype=np.float64)
    m = r.size
    _, inverse, counts = np.unique(r, return_inverse=True, return_counts=True)
    below = np.cumsum(counts)                       # c_l: samples at or below each level
    above = below - counts                          # c_{l-1}
    if replace:
        p_level = (below / m) ** n - (above / m) ** n
    else:
        require(n <= m, f"best-of-{n} without replacement needs at least {n} samples, got {m}")
        total = math.comb(m, n)
        p_level = np.array([(math.comb(int(b), n) - math.comb(int(a), n)) / total
                            for b, a in zip(below, above)])
    return (p_level / counts)[inverse]


def expected_best(rewards, values, n: int) -> float:
    """Unbiased estimate of ``E[value of the best-of-n sample]`` from ``M >= n`` samples."""
    return float(np.dot(selection_probs(rewards, n, replace=False), np.asarray(values, float)))


def kl_plugin(rewards, n: int) -> float:
    """Plug-in ``KL(best-of-n || pi)`` with ``pi`` the empirical distribution of the samples:
    ``sum_i p_i log(M p_i)``. Exact for it; it approaches :func:`kl_bound` as ``M`` grows when
    the rewards are distinct, is smaller with ties, and cannot exceed ``log M``."""
    p = selection_probs(rewards, n, replace=True)
    nz = p > 0
    return float(np.sum(p[nz] * np.log(p.size * p[nz])))


# ----------------------------------------------------------------------------------------------
# The stage.


def score_samples(prompts: list[str], responses: list[str], cfg: Config) -> dict[str, list[float]]:
    from alignkit.engine.scoring import make_reward_source

    proxy = make_reward_source(cfg.reward, chat=cfg.chat, workers=cfg.workers)
    scores = {"proxy_reward": proxy(prompts, responses)}
    gold_spec = f"gold:{cfg.task}" + (":chat" if cfg.chat else "") if cfg.task else None
    golds = (gold_spec, f"gold:{cfg.task}")
    if gold_spec:  # selecting by the gold reward itself (a verifier) needs no second pass
        scores["gold_reward"] = scores["proxy_reward"] if cfg.reward in golds \
            else make_reward_source(gold_spec)(prompts, responses)
    if cfg.heldout and cfg.heldout not in golds:
        heldout = make_reward_source(cfg.heldout, chat=cfg.chat, workers=cfg.workers)
        scores["heldout_reward"] = heldout(prompts, responses)
    return scores


def per_n_metrics(scores: dict[str, np.ndarray], n: int, base: dict | None) -> dict:
    """``scores[name]`` is ``[P, M]``; selection is always by ``proxy_reward``."""
    from alignkit.engine.evaluation import summarize

    proxy = scores["proxy_reward"]
    out = {"n": n, "kl_bound": kl_bound(n),
           "kl_plugin": float(np.mean([kl_plugin(row, n) for row in proxy]))}
    for name, values in scores.items():
        chosen = [expected_best(p, v, n) for p, v in zip(proxy, values)]
        out.update(summarize(chosen, name))
        if base is not None:
            out[f"{name}_gain"] = out[f"{name}_mean"] - base[f"{name}_mean"]
    return out


def main(cfg: Config) -> dict:
    from alignkit.data.io import write_jsonl
    from alignkit.data.sources import load_prompts
    from alignkit.engine.models import load_causal_lm, load_tokenizer
    from alignkit.engine.sampling import sample_texts
    from alignkit.tracking import Tracker

    out = Path(cfg.out_dir)
    tracker = Tracker(out, cfg, stage="bon")
    m = max(cfg.n)
    prompts = load_prompts(cfg.prompts or f"task:{cfg.task}", "test", cfg.num_prompts, cfg.chat)
    tokenizer = load_tokenizer(cfg.policy, cfg.chat_template, chat=cfg.chat)
    policy = load_causal_lm(cfg.policy, tokenizer=tokenizer).eval()
    repeated = [p for p in prompts for _ in range(m)]
    _, responses = sample_texts(policy, tokenizer, repeated, cfg.sampling, chat=cfg.chat,
                                seed=cfg.seed, batch_size=cfg.batch_size, workers=cfg.workers)
    flat = score_samples(repeated, responses, cfg)
    scores = {k: np.asarray(v, dtype=np.float64).reshape(len(prompts), m) for k, v in flat.items()}

    rows = [{"prompt": p, "sample": j % m, "response": r, **{k: v[j] for k, v in flat.items()}}
            for j, (p, r) in enumerate(zip(repeated, responses))]
    write_jsonl(out / "samples.jsonl", rows)
    best = scores["proxy_reward"].argmax(-1)
    write_jsonl(out / "chosen.jsonl", (rows[i * m + b] for i, b in enumerate(best.tolist())))

    base = per_n_metrics(scores, 1, None)
    results = {}
    for n in sorted(set(cfg.n)):
        results[n] = base if n == 1 else per_n_metrics(scores, n, base)
        tracker.log(n, results[n])
    top = results[max(results)]
    summary = {k: v for k, v in top.items()}
    summary.update({f"n{n}/{k}": v for n, r in results.items() for k, v in r.items()
                    if k.endswith(("_mean", "kl_bound", "kl_plugin"))})
    summary.update({"samples_per_prompt": m, "prompts": len(prompts),
                    "chosen": str(out / "chosen.jsonl")})
    return tracker.finish(summary)


def figures(run_dir: str | Path) -> list:
    """Reward of the chosen sample against KL (bound and plug-in), one point per ``n``."""
    from alignkit.tracking import read_metrics

    rows = [r for r in read_metrics(run_dir) if "kl_bound" in r]
    if not rows:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [k[:-5] for k in rows[0] if k.endswith("_reward_mean")]
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        for kl_key, style in (("kl_bound", "o-"), ("kl_plugin", "s--")):
            ax.errorbar([r[kl_key] for r in rows], [r[f"{name}_mean"] for r in rows],
                        yerr=[r.get(f"{name}_sem", 0) for r in rows], fmt=style, capsize=2,
                        label=f"x = {kl_key.replace('_', ' ')}")
        for r in rows:
            ax.annotate(f"n={r['n']}", (r["kl_bound"], r[f"{name}_mean"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("KL(best-of-n || policy), nats", fontsize=8)
        ax.set_title(f"{name.replace('_', ' ')} of the chosen sample", fontsize=9)
        ax.legend(fontsize=7)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return [("Best-of-n: reward vs KL", fig)]

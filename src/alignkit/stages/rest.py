"""``alignkit rest``: Reinforced Self-Training (ReST, Gulcehre et al. 2023, Algorithm 1).

For each Grow step ``g = 0 .. G-1``:

* **Grow**: sample ``N`` responses per prompt from the current policy and score each with a
  reward source (reward model, verifier, gold reward, Python function, judge); the grown set,
  with its scores, is written to ``grow_<g>/grown.jsonl`` (or ``.parquet``).
* **Improve** ``i = 0 .. I-1``: normalise the grown rewards to [0, 1], keep the samples whose
  normalised reward exceeds ``tau_i`` (ReST §2: ``F(x, y; tau) = 1[R(x, y) > tau]``, with
  ``tau_0 <= tau_1 <= ...``), optionally mix in the original SFT data, and fine-tune the
  previous policy on them at ``lr * lr_decay**i``: behaviour cloning (NLL) by default, or
  reward-weighted BC (each sample's NLL times its normalised reward). Normalising and
  thresholding live in :mod:`alignkit.engine.rl.filtering`.

After every Improve step the policy is evaluated on held-out prompts (proxy reward, gold reward
on built-in tasks, a held-out signal, KL to the SFT model) and the reward-hacking guard
(:mod:`alignkit.engine.rl.guard`) sees (proxy, held-out). Expert iteration / RAFT (Anthony et al. 2017;
Dong et al. 2023) is this stage with one Improve step per Grow (``configs/raft.yaml``).

Files under ``out_dir``: ``initial/metrics.json`` (the SFT model), ``grow_<g>/grown.jsonl``,
``grow_<g>/improve_<i>/{model, metrics.json, metrics.jsonl, samples.jsonl}``, ``metrics.jsonl``
(one row per Improve step, ``step = g * I + i + 1``; step 0 is the SFT model), ``model`` (final).
Resume: a step whose ``metrics.json`` exists is not redone, a grown file that exists is not
regrown, and an Improve step stopped mid-training resumes from its own checkpoint.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np

from alignkit.config import require
from alignkit.data.io import write_json, write_jsonl
from alignkit.data.sources import load_prompts
from alignkit.engine.evaluation import evaluate_policy
from alignkit.engine.models import LoraSpec
from alignkit.engine.rl.filtering import FilterConfig, select
from alignkit.engine.rl.guard import GuardConfig, GuardDecision, HackingGuard
from alignkit.engine.sampling import SamplingConfig, sample_texts
from alignkit.engine.training import LoopConfig, OptimConfig
from alignkit.engine.workers import WorkersConfig
from alignkit.tracking import TrackingConfig


@dataclass(frozen=True)
class GrowConfig:
    prompts: str | None = None          # "task:NAME" (train split) or a prompt file; default task
    num_prompts: int = 256
    samples_per_prompt: int = 4         # N
    batch_size: int = 64
    seed: int = 0
    format: Literal["jsonl", "parquet"] = "jsonl"
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def __post_init__(self):
        require(self.num_prompts > 0, "grow.num_prompts must be > 0")
        require(self.samples_per_prompt >= 1, "grow.samples_per_prompt must be >= 1")


@dataclass(frozen=True)
class ImproveConfig:
    loss: Literal["bc", "reward_weighted"] = "bc"
    lr_decay: float = 0.5               # Improve step i trains at optim.lr * lr_decay**i
    sft_data: str | None = None         # keep the original SFT data in the mix ("task:NAME"/path)
    sft_samples: int = 0
    max_length: int = 256
    min_examples: int = 0               # fewer kept samples than this (or one batch): skip the step
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, warmup_steps=5))
    train: LoopConfig = field(default_factory=lambda: LoopConfig(epochs=1.0, batch_size=32,
                                                                 micro_batch_size=32))

    def __post_init__(self):
        require(0.0 < self.lr_decay <= 1.0, "improve.lr_decay must be in (0, 1]")
        require(self.sft_samples >= 0, "improve.sft_samples must be >= 0")


@dataclass(frozen=True)
class EvalConfig:
    prompts: str | None = None          # "task:NAME" (test split) or a prompt file; default task
    num_prompts: int = 200
    samples_per_prompt: int = 1         # more samples per prompt: less sampling noise per step
    batch_size: int = 64
    seed: int = 1234
    success_at: float | None = None     # also report the share of gold rewards >= this
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def __post_init__(self):
        # The *_sem metrics treat the samples as independent: with several per prompt they are
        # a lower bound (samples of one prompt are correlated).
        require(self.num_prompts > 0 and self.samples_per_prompt >= 1,
                "eval.num_prompts must be > 0 and eval.samples_per_prompt >= 1")


@dataclass(frozen=True)
class Config(TrackingConfig):
    model: str = ""                     # the starting (SFT) policy
    reference: str | None = None        # KL yardstick; default: model
    reward: str = ""                    # the proxy: the only signal that selects training data
    task: str | None = None             # built-in task: default prompts and the gold reward
    chat: bool = False
    chat_template: str | None = None  # for chat=true: a Jinja template or a .jinja file
    out_dir: str = "runs/rest"
    grow_steps: int = 2                 # G
    grow: GrowConfig = field(default_factory=GrowConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    improve: ImproveConfig = field(default_factory=ImproveConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    lora: LoraSpec = field(default_factory=LoraSpec)
    workers: WorkersConfig = field(default_factory=WorkersConfig)   # where sampling and RM scoring run: local | ray

    def __post_init__(self):
        require(bool(self.model), "model is required (path of the SFT policy)")
        require(bool(self.reward), "reward is required (model:PATH, gold:TASK, python:MOD:FN, judge:...)")
        require(self.grow_steps >= 1, "grow_steps must be >= 1")
        require(self.task is not None or (self.grow.prompts and self.eval.prompts),
                "set task (a built-in task) or both grow.prompts and eval.prompts")

    @property
    def improve_steps(self) -> int:  # I
        return len(self.filter.thresholds)


# ----------------------------------------------------------------------------------------------
# Grow: sample N responses per prompt and score them.


def grow(policy, tokenizer, prompts: list[str], cfg: GrowConfig, *, chat: bool, seed: int,
         reward, inspect: dict | None = None, workers: WorkersConfig | None = None) -> list[dict]:
    """The grown set: one record per sample, ``N`` consecutive samples per prompt, with the
    ``reward`` that filtering reads and, for inspection only, the scores of ``inspect`` sources."""
    repeated = [p for p in prompts for _ in range(cfg.samples_per_prompt)]
    policy.eval()
    rollout, responses = sample_texts(policy, tokenizer, repeated, cfg.sampling, chat=chat,
                                      seed=seed, batch_size=cfg.batch_size, workers=workers)
    rows = [{"prompt": p, "response": r, "reward": s, "finished": bool(f),
             "sample": j % cfg.samples_per_prompt}
            for j, (p, r, s, f) in enumerate(zip(repeated, responses, reward(repeated, responses),
                                                 rollout.finished.tolist()))]
    for name, source in (inspect or {}).items():
        for row, h in zip(rows, source(repeated, responses)):
            row[name] = h
    return rows


def grown_path(out: Path, g: int, fmt: str) -> Path:
    return out / f"grow_{g}" / f"grown.{fmt}"


def save_grown(rows: list[dict], path: Path) -> None:
    """Write to a temporary file, then rename: the file exists only once the Grow step is done."""
    if path.suffix != ".parquet":
        write_jsonl(path, rows)
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(pa.Table.from_pylist(rows), tmp)
    tmp.replace(path)


def load_grown(path: Path) -> list[dict]:
    from alignkit.data.io import load_records

    return [dict(r) for r in load_records(path)]


# ----------------------------------------------------------------------------------------------
# Improve: (reward-weighted) behaviour cloning through the SFT loss and the shared loop.


def training_records(grown: list[dict], kept: list[int], weights: np.ndarray, chat: bool,
                     ) -> list[dict]:
    out = []
    for j in kept:
        p, r = grown[j]["prompt"], grown[j]["response"]
        if chat:
            p, r = [{"role": "user", "content": p}], [{"role": "assistant", "content": r}]
        out.append({"prompt": p, "completion": r, "weight": float(weights[j])})
    return out


def encode(records: list[dict], tokenizer, max_length: int) -> list[dict]:
    from alignkit.data.formats import build_dataset

    if not records:
        return []
    rows, stats = build_dataset([{k: v for k, v in r.items() if k != "weight"} for r in records],
                                tokenizer, max_length=max_length, overlong="truncate")
    assert stats.kept == len(records), "truncation never drops a record"
    return [{**row, "weight": r.get("weight", 1.0)} for row, r in zip(rows, records)]


def sft_mix(cfg: Config, tokenizer) -> list[dict]:
    if not cfg.improve.sft_data or cfg.improve.sft_samples == 0:
        return []
    from alignkit.data.formats import build_dataset
    from alignkit.data.sources import sft_source

    src = sft_source(cfg.improve.sft_data, "train", cfg.improve.sft_samples, seed=cfg.grow.seed)
    rows, _ = build_dataset(src, tokenizer, max_length=cfg.improve.max_length, overlong="truncate")
    return [{**r, "weight": 1.0} for r in rows[:cfg.improve.sft_samples]]


def improve(policy, examples: list[dict], cfg: Config, i: int, k: int, step_dir: Path,
            tokenizer) -> dict:
    """Fine-tune ``policy`` on ``examples``; save ``step_dir/model``; return the loop's metrics."""
    from alignkit.engine.lm_loss import collate_weighted, loss_for, n_targets, weighted_causal_lm_loss
    from alignkit.engine.models import apply_lora, save_model
    from alignkit.engine.training import (final_model, make_accelerator, remove_folder, train,
                                          use_packing)
    from alignkit.tracking import Tracker

    imp = cfg.improve
    optim = replace(imp.optim, lr=imp.optim.lr * imp.lr_decay ** i)
    loop = replace(imp.train, seed=imp.train.seed + k)
    accelerator = make_accelerator(loop.mixed_precision, loop.strategy, loop.offload)
    tracker = Tracker(step_dir, enabled=accelerator.is_main_process, stage=f"rest improve {k}")
    model = apply_lora(policy.train(), cfg.lora)
    pad, pack = tokenizer.pad_token_id, use_packing(model, loop, accelerator)
    result = train(model, examples, lengths=[len(e["input_ids"]) for e in examples],
                   collate=lambda b: collate_weighted(b, pad, pack), weight_of=n_targets,
                   loss_fn=loss_for(model, pack, weighted_causal_lm_loss),
                   loop=loop, optim=optim, out_dir=step_dir,
                   tracker=tracker, accelerator=accelerator)
    trained = final_model(accelerator, model)
    if accelerator.is_main_process:
        save_model(trained, tokenizer, step_dir / "model",
                   adapter_dir=step_dir / "adapter")
        remove_folder(step_dir / "checkpoints")  # the model + marker suffice
    accelerator.wait_for_everyone()
    return {"lr": optim.lr, "train_steps": result.step, "train_loss": result.last_metrics.get("loss"),
            **result.distribution}


# ----------------------------------------------------------------------------------------------
# Evaluation after each step, on held-out prompts (the same prompts and seed at every step).


@dataclass
class Judges:
    """The signals of a run: the proxy (selects training data), the gold reward (built-in
    tasks) and the guard's held-out signal, read from metric ``heldout_key``."""

    proxy: object
    gold: object | None
    heldout: object | None          # a separate source; None when the held-out signal is gold
    heldout_key: str | None         # "gold_reward_mean", "heldout_reward_mean" or None (no guard)


def make_judges(cfg: Config) -> Judges:
    from alignkit.engine.scoring import make_reward_source

    gold_spec = f"gold:{cfg.task}" + (":chat" if cfg.chat else "") if cfg.task else None
    gold = make_reward_source(gold_spec) if gold_spec else None
    spec = cfg.guard.heldout or gold_spec
    proxy = make_reward_source(cfg.reward, chat=cfg.chat, workers=cfg.workers)
    if spec is None:
        return Judges(proxy, gold, None, None)
    if spec in (gold_spec, f"gold:{cfg.task}"):
        return Judges(proxy, gold, None, "gold_reward_mean")
    return Judges(proxy, gold, make_reward_source(spec, chat=cfg.chat, workers=cfg.workers),
                  "heldout_reward_mean")


def evaluate(policy, reference, tokenizer, prompts: list[str], cfg: Config,
             judges: Judges) -> tuple[dict, list[dict]]:
    """The policy on the held-out prompts: every signal of ``judges``, KL to ``reference``."""
    e = cfg.eval
    sources = {"proxy_reward": judges.proxy, "gold_reward": judges.gold,
               "heldout_reward": judges.heldout}
    return evaluate_policy(policy, tokenizer, prompts, e.sampling, chat=cfg.chat, seed=e.seed,
                           batch_size=e.batch_size,
                           sources={k: v for k, v in sources.items() if v is not None},
                           success_at=e.success_at,
                           reference=reference if policy is not reference else None,
                           workers=cfg.workers)


# ----------------------------------------------------------------------------------------------
# The stage.


def _step_dir(out: Path, g: int, i: int) -> Path:
    return out / f"grow_{g}" / f"improve_{i}"


def run_improve(cfg: Config, g: int, i: int, k: int, grown: list[dict], policy_path: str,
                tokenizer, mix: list[dict]) -> dict:
    """Filter, train and save one Improve step; returns its metrics."""
    from alignkit.engine.models import load_causal_lm, save_model

    step_dir = _step_dir(Path(cfg.out_dir), g, i)
    kept, norm = select(grown, cfg.filter, i)
    weights = norm if cfg.improve.loss == "reward_weighted" else np.ones_like(norm)
    examples = encode(training_records(grown, kept, weights, cfg.chat), tokenizer,
                      cfg.improve.max_length) + mix
    raw = [grown[j]["reward"] for j in kept]
    metrics = {"grow": g, "improve": i, "tau": cfg.filter.thresholds[i], "kept": len(kept),
               "kept_fraction": len(kept) / len(grown),
               "kept_reward_mean": float(np.mean(raw)) if raw else None,
               "kept_reward_min": float(np.min(raw)) if raw else None,
               "grown_reward_mean": float(np.mean([x["reward"] for x in grown]))}
    policy = load_causal_lm(policy_path, tokenizer=tokenizer)
    enough = len(kept) > 0 and len(examples) >= max(cfg.improve.train.batch_size,
                                                    cfg.improve.min_examples)
    if enough:
        metrics.update(improve(policy, examples, cfg, i, k, step_dir, tokenizer))
    else:
        print(f"[rest] step {k}: {len(kept)} samples kept, fewer than one batch; policy unchanged",
              flush=True)
        save_model(policy, tokenizer, step_dir / "model")
    metrics["trained"] = enough
    return metrics


def main(cfg: Config) -> dict:
    from alignkit.engine.models import load_causal_lm, load_tokenizer
    from alignkit.tracking import Tracker

    out = Path(cfg.out_dir)
    tracker = Tracker(out, cfg, stage="rest")
    tokenizer = load_tokenizer(cfg.model, cfg.chat_template, chat=cfg.chat)
    reference = load_causal_lm(cfg.reference or cfg.model, tokenizer=tokenizer).eval()
    judges = make_judges(cfg)
    grow_prompts = load_prompts(cfg.grow.prompts or f"task:{cfg.task}", "train",
                                cfg.grow.num_prompts, cfg.chat)
    eval_prompts = [p for p in load_prompts(cfg.eval.prompts or f"task:{cfg.task}", "test",
                                            cfg.eval.num_prompts, cfg.chat)
                    for _ in range(cfg.eval.samples_per_prompt)]
    guard = HackingGuard(cfg.guard.patience, cfg.guard.min_delta, cfg.guard.stop) \
        if judges.heldout_key is not None else None
    mix = sft_mix(cfg, tokenizer)

    def evaluate_at(policy, folder: Path, extra: dict | None = None) -> None:
        _evaluate_into(policy, reference, tokenizer, eval_prompts, cfg, judges, folder, extra)

    if not (out / "initial" / "metrics.json").exists():
        policy0 = reference if cfg.reference is None else load_causal_lm(cfg.model, tokenizer=tokenizer)
        evaluate_at(policy0, out / "initial")
    tracker.truncate_after(-1)  # the log is rebuilt from the step markers: resume == uninterrupted
    tracker.progress(cfg.grow_steps * cfg.improve_steps)
    models, metrics_by_step = {0: cfg.model}, {0: _read(out / "initial")}
    decision = _watch(guard, metrics_by_step[0], judges.heldout_key, tracker, 0)
    policy_path, fired_at = cfg.model, None
    for g in range(cfg.grow_steps):
        grown = None  # read or sampled only when one of this Grow's Improve steps is not done
        for i in range(cfg.improve_steps):
            if decision is not None and decision.stop:
                break
            k = g * cfg.improve_steps + i + 1
            step_dir = _step_dir(out, g, i)
            if not (step_dir / "metrics.json").exists():
                grown = grown or _grown(cfg, g, policy_path, tokenizer, grow_prompts, judges)
                trained = run_improve(cfg, g, i, k, grown, policy_path, tokenizer, mix)
                evaluate_at(load_causal_lm(step_dir / "model", tokenizer=tokenizer), step_dir, trained)
            policy_path = str(step_dir / "model")
            models[k], metrics_by_step[k] = policy_path, _read(step_dir)
            decision = _watch(guard, metrics_by_step[k], judges.heldout_key, tracker, k)
            if decision is not None and decision.fired and fired_at is None:
                fired_at = k
    stopped = decision is not None and decision.stop
    return _finish(cfg, tracker, models, metrics_by_step, guard, stopped, fired_at)


def _evaluate_into(policy, reference, tokenizer, prompts, cfg: Config, judges: Judges,
                   folder: Path, extra: dict | None = None) -> None:
    """Evaluate ``policy``; write ``folder/samples.jsonl`` and, last, the marker ``metrics.json``."""
    metrics, rows = evaluate(policy, reference, tokenizer, prompts, cfg, judges)
    write_jsonl(folder / "samples.jsonl", rows)
    write_json(folder / "metrics.json", {**(extra or {}), **metrics})


def _read(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def _watch(guard: HackingGuard | None, metrics: dict, key: str | None, tracker,
           k: int) -> GuardDecision | None:
    """Feed the guard one step, log the step, warn when the guard fires."""
    d = guard.update(metrics["proxy_reward_mean"], metrics[key]) \
        if guard is not None and metrics.get(key) is not None else None
    fields = {} if d is None else {"guard_streak": d.streak, "guard_fired": d.fired,
                                   "best_step": d.best_step}
    tracker.log(k, {**metrics, **fields})
    if d is not None and d.fired:
        print(f"[rest] WARNING reward hacking suspected at step {k}: the held-out signal has been "
              f"below its best (step {d.best_step}: {d.best_heldout:.4g}) for {d.streak} steps "
              f"while the proxy stayed above its value there"
              + ("; stopping" if d.stop else ""), flush=True)
    return d


def _grown(cfg: Config, g: int, policy_path: str, tokenizer, prompts: list[str],
           judges: Judges) -> list[dict]:
    """The grown set of step ``g``: read back if it was written, else sampled now."""
    from alignkit.engine.models import load_causal_lm

    path = grown_path(Path(cfg.out_dir), g, cfg.grow.format)
    if path.exists():
        print(f"[rest] grow {g}: reusing {path}", flush=True)
        return load_grown(path)
    policy = load_causal_lm(policy_path, tokenizer=tokenizer)
    inspect = {name: src for name, src in (("gold_reward", judges.gold), ("heldout_reward", judges.heldout))
               if src is not None and src.name != judges.proxy.name}
    rows = grow(policy, tokenizer, prompts, cfg.grow, chat=cfg.chat, seed=cfg.grow.seed + g,
                reward=judges.proxy, inspect=inspect, workers=cfg.workers)
    for r in rows:
        r["grow"] = g
    save_grown(rows, path)
    print(f"[rest] grow {g}: {len(rows)} samples, mean reward "
          f"{np.mean([r['reward'] for r in rows]):.4g} -> {path}", flush=True)
    return rows


def _finish(cfg: Config, tracker, models: dict, metrics_by_step: dict,
            guard: HackingGuard | None, stopped: bool, fired_at: int | None) -> dict:
    out = Path(cfg.out_dir)
    last = max(models)
    final_step = guard.best_step if (stopped and guard is not None) else last
    shutil.rmtree(out / "model", ignore_errors=True)
    shutil.copytree(models[final_step], out / "model")
    summary = {k: v for k, v in metrics_by_step[final_step].items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    summary.update({"model": str(out / "model"), "final_step": final_step, "steps": last,
                    "grow_steps": cfg.grow_steps, "improve_steps": cfg.improve_steps,
                    "guard_fired_at": fired_at, "guard_stopped": stopped,
                    "initial_gold_reward_mean": metrics_by_step[0].get("gold_reward_mean"),
                    "initial_proxy_reward_mean": metrics_by_step[0].get("proxy_reward_mean")})
    return tracker.finish(summary)


# ----------------------------------------------------------------------------------------------
# Report figure.


def figures(run_dir: str | Path) -> list:
    """Per-step curves of a ReST run: rewards, KL to SFT, samples kept; ``[(title, Figure)]``."""
    from alignkit.tracking import read_metrics

    rows = [r for r in read_metrics(run_dir) if "proxy_reward_mean" in r]
    if not rows:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for key, label in (("proxy_reward_mean", "proxy"), ("gold_reward_mean", "gold"),
                       ("heldout_reward_mean", "held-out"),
                       ("gold_success_mean", "accuracy (gold >= success_at)")):
        pts = [(r["step"], r[key], r.get(key.replace("_mean", "_sem"), 0)) for r in rows
               if r.get(key) is not None]
        if pts:
            axes[0].errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts],
                             marker="o", capsize=2, label=label)
    axes[0].set_title("reward on held-out prompts", fontsize=9)
    axes[0].legend(fontsize=7)
    axes[1].plot(steps, [r.get("kl_to_ref", 0.0) for r in rows], marker="o")
    axes[1].set_title("KL(policy || SFT), nats", fontsize=9)
    trained = [r for r in rows if r.get("kept") is not None]
    axes[2].bar([r["step"] for r in trained], [r["kept"] for r in trained], color="#9ab")
    axes[2].set_title("samples kept (bars) / their mean reward", fontsize=9)
    twin = axes[2].twinx()
    twin.plot([r["step"] for r in trained], [r.get("kept_reward_mean") for r in trained],
              marker="o", color="#c44")
    fired = [r["step"] for r in rows if r.get("guard_fired")]
    for ax in axes:
        ax.set_xlabel("step (0 = SFT)", fontsize=8)
        ax.tick_params(labelsize=7)
        for s in fired:
            ax.axvline(s, color="red", alpha=0.3, linestyle="--")
    fig.tight_layout()
    return [("ReST: per-step rewards, KL and kept samples" + (" (red: guard fired)" if fired else ""),
             fig)]

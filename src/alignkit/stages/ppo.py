"""``alignkit ppo``: RLHF with PPO, or the critic-free RLOO and GRPO, on one loop.

Each iteration: sample ``k`` responses for each of a batch of prompts (:mod:`alignkit.engine.rl.rollout`),
score them with a reward source, turn scores into advantages (the algorithm's part, registered
in :mod:`alignkit.engine.rl.algorithms`), then run ``ppo.epochs`` passes of clipped-surrogate updates over
shuffled minibatches.

* ``ppo`` (Schulman et al. 2017; RLHF as Ziegler et al. 2019, Stiennon et al. 2020, Ouyang et
  al. 2022): per-token reward ``r(x, y) 1[t = last] - beta KL_t``, GAE advantages from a value
  model, whitened; clipped policy loss averaged over tokens, clipped value loss.
* ``rloo`` (Ahmadian et al. 2024): the KL goes into the sequence reward,
  ``R = r(x, y) - beta sum_t KL_t``, and the baseline is the mean reward of the other ``k - 1``
  samples of the prompt; the loss sums over a response's tokens (REINFORCE of the sequence).
* ``grpo`` (Shao et al. 2024): group-normalised scores as advantages, the k3 KL to the
  reference as a loss term, each response's tokens averaged.

Roles live in :mod:`alignkit.engine.rl.roles` (``roles: separate | shared``). Gold rewards of built-in
tasks are computed on the same rollouts for reporting and never enter training unless the
reward source itself is ``gold:TASK``. A checkpoint after an iteration holds the policy, the
value, the optimisers, schedulers, KL controller, reward normaliser and every RNG, so a resumed
run continues the same trajectory.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch

from alignkit.math.advantages import AdaptiveKLController, FixedKLController, kl_penalty
from alignkit.engine.rl.algorithms import ALGORITHMS, Algorithm, loss_weights, sequence_kl
from alignkit.config import require
from alignkit.engine.generation import SamplingConfig, rollout_logps
from alignkit.math.losses import ppo_clipped, ppo_value_loss, reduce_loss
from alignkit.engine.models import LoraSpec
from alignkit.engine.rl.rollout import (Experience, GeneratorState, RunningMoments, ScoreConfig,
                              iteration_prompts, load_prompts)
from alignkit.engine.training import OptimConfig


@dataclass(frozen=True)
class RolloutConfig:
    prompts: str | None = None        # "task:NAME[:chat]" (train split) or a file of prompt records
    num_prompts: int = 0              # size of the prompt pool (0: all)
    prompts_per_iteration: int = 32
    samples_per_prompt: int = 1       # k; RLOO and GRPO need k >= 2
    batch_size: int = 64              # rows per generation chunk
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    # Old log-probs = those recorded while sampling (equal to a forward pass's within float
    # error): one policy forward fewer per iteration. logprob_gap_max is then measured on the
    # first training forward, before the first update.
    reuse_sampling_logps: bool = False

    def __post_init__(self):
        require(self.prompts_per_iteration > 0, "rollout.prompts_per_iteration must be > 0")
        require(self.samples_per_prompt >= 1, "rollout.samples_per_prompt must be >= 1")

    @property
    def rows(self) -> int:
        return self.prompts_per_iteration * self.samples_per_prompt


@dataclass(frozen=True)
class KLConfig:
    # Per-token KL estimator of the shaped reward (PPO, RLOO) and of the kl_to_ref metric; GRPO's
    # loss term is always k3 (Shao et al. 2024, eq. 4).
    estimator: Literal["k1", "k2", "k3"] = "k1"
    beta: float = 0.05                 # the coefficient (its start value when adaptive)
    adaptive: bool = False             # Ziegler et al. 2019's proportional controller
    target: float = 6.0                # nats per response
    horizon: float = 10000.0           # samples

    def __post_init__(self):
        require(self.beta >= 0, "kl.beta must be >= 0")
        require(not self.adaptive or (self.target > 0 and self.horizon > 0),
                "kl.target and kl.horizon must be > 0")


@dataclass(frozen=True)
class PPOConfig:
    algo: Literal["ppo", "rloo", "grpo"] = "ppo"
    epochs: int = 4                    # passes over each iteration's rollouts
    minibatch_size: int = 16           # rows per optimiser step
    micro_batch_size: int = 8          # rows per forward (gradient accumulation)
    clip_eps: float = 0.2
    value_clip_eps: float | None = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True     # PPO's per-batch advantage whitening
    grpo_scale: bool = True            # false: Dr. GRPO (no division by the group's std)
    # The forwards over rollouts (old and reference log-probs, values, the updates) on each row's
    # real tokens in one flat row, no padding, each prompt once for the rows sampled from it, where
    # the models' attention allows (checked at start, as SFT's train.packing; main then holds the
    # layout here: True flat, "shared" with the prompts shared); the same values within float error.
    packing: bool | str = True

    def __post_init__(self):
        require(self.epochs >= 1, "ppo.epochs must be >= 1")
        require(self.minibatch_size > 0 and self.micro_batch_size > 0,
                "ppo.minibatch_size and ppo.micro_batch_size must be > 0")
        require(self.clip_eps > 0, "ppo.clip_eps must be > 0")
        require(0 <= self.gamma <= 1 and 0 <= self.lam <= 1, "ppo.gamma and ppo.lam must be in [0, 1]")
        require(self.packing in (True, False, "shared"),
                f"ppo.packing must be true, false or \"shared\", got {self.packing!r}")


@dataclass(frozen=True)
class EvalConfig:
    num_prompts: int = 200             # the first prompts of the split (0: no evaluation)
    split: str = "test"                # held-out prompts; "train": the questions trained on
    samples_per_prompt: int = 1
    batch_size: int = 64
    seed: int = 1234
    initial: bool = True               # also evaluate the starting policy (initial_* metrics)
    success_at: float | None = None    # also report the share of gold rewards >= this
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


@dataclass(frozen=True)
class Config:
    model: str = ""                    # the starting policy (an SFT model)
    reward: str = ""                   # model:PATH | gold:TASK | python:MOD:FN | judge:...
    reference: str | None = None       # default: model
    task: str | None = None            # built-in task: default prompts, gold metrics, final eval
    chat: bool = False
    out_dir: str = "runs/ppo"
    iterations: int = 20
    roles: Literal["separate", "shared"] = "separate"
    value_init: Literal["policy", "reward"] = "policy"
    lora: LoraSpec = field(default_factory=LoraSpec)  # the adapters of roles=shared
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    kl: KLConfig = field(default_factory=KLConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, schedule="constant"))
    value_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, schedule="constant"))
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0
    save_every: int = 0                # iterations between checkpoints (0: only at the end)
    keep_checkpoints: int = 2
    resume: str = "auto"               # "auto" | "never" | a checkpoint path
    mixed_precision: Literal["no", "bf16"] = "no"
    tensorboard: bool = True

    def __post_init__(self):
        require(bool(self.model), "model is required (path of the starting policy)")
        require(bool(self.reward), "reward is required (model:PATH, gold:TASK, python:MOD:FN, ...)")
        require(self.iterations >= 1, "iterations must be >= 1")
        require(self.task is not None or self.rollout.prompts is not None,
                "set task (a built-in task) or rollout.prompts (a file of prompt records)")
        k = self.rollout.samples_per_prompt
        require(self.ppo.algo == "ppo" or k >= 2, f"ppo.algo={self.ppo.algo} needs "
                f"rollout.samples_per_prompt >= 2 (a baseline from the other samples), got {k}")
        require(self.rollout.rows % self.ppo.minibatch_size == 0,
                f"rows per iteration ({self.rollout.rows} = prompts_per_iteration x "
                f"samples_per_prompt) must be a multiple of ppo.minibatch_size "
                f"({self.ppo.minibatch_size})")
        require(self.value_init == "policy" or self.reward.startswith("model:"),
                "value_init=reward needs reward: model:PATH")


# ---------------------------------------------------------------------------------------------
# One minibatch: forward + backward in micro-batches with the minibatch's global normalisers.


def accumulate(roles, mb: Experience, algo: Algorithm, ppo: PPOConfig, beta: float,
               temperature: float, accelerator, measure_gap: bool = False) -> dict[str, float]:
    """Accumulate the gradients of one minibatch (policy and, for PPO, value) into ``.grad``.

    The normalisers are those of the whole minibatch (:func:`alignkit.math.losses.reduce_loss`), so the
    gradient does not depend on ``ppo.micro_batch_size``. Returns summed metrics and their counts;
    ``measure_gap`` adds ``logprob_gap_max``, the largest |new - old| log-prob (before an update).
    """
    _, policy_norm = loss_weights(algo.reduction, mb.mask)
    value_norm = float(mb.mask.sum())
    stats = {"policy_loss": 0.0, "value_loss": 0.0, "clipfrac": 0.0, "approx_kl": 0.0,
             "tokens": value_norm}
    for start in range(0, len(mb), ppo.micro_batch_size):
        sub = mb.take(range(start, min(start + ppo.micro_batch_size, len(mb))))
        mask = sub.mask.float()
        with accelerator.autocast():
            new_logps = rollout_logps(roles.policy, sub.rollout, temperature, ppo.packing)
        weights, _ = loss_weights(algo.reduction, mask)
        loss = reduce_loss(algo.loss(new_logps, sub, beta, ppo).float(), weights, policy_norm)
        accelerator.backward(loss)
        stats["policy_loss"] += float(loss.detach())
        # Diagnostics, per token whatever the loss's weighting. approx_kl: k3 with samples from
        # the old policy, r = new / old, an estimate of KL(old || new) (Schulman 2020).
        stats["clipfrac"] += float((ppo_clipped(new_logps, sub.old_logps, sub.advantages,
                                                ppo.clip_eps) * mask).sum())
        stats["approx_kl"] += float((kl_penalty(sub.old_logps, new_logps.detach(), "k3") * mask).sum())
        if measure_gap:
            gap = float(((new_logps.detach() - sub.old_logps).abs() * mask).max())
            stats["logprob_gap_max"] = max(stats.get("logprob_gap_max", 0.0), gap)
        if algo.uses_value:
            with accelerator.autocast():
                values = roles.values(sub.rollout, ppo.packing)
            vloss = reduce_loss(ppo_value_loss(values, sub.values, sub.returns, ppo.value_clip_eps),
                                mask, value_norm)
            accelerator.backward(vloss)
            stats["value_loss"] += float(vloss.detach())
    return stats


def _step(accelerator, optimizer, scheduler, params, max_grad_norm) -> float:
    norm = accelerator.clip_grad_norm_(params, max_grad_norm) if max_grad_norm > 0 else None
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm) if norm is not None else float("nan")


def optimise(roles, exp: Experience, algo: Algorithm, cfg: Config, beta: float, opt,
             generator: torch.Generator, accelerator) -> dict[str, float]:
    """``ppo.epochs`` passes over the experience in shuffled minibatches; mean metrics."""
    temperature = cfg.rollout.sampling.temperature or 1.0
    totals: dict[str, float] = {}
    gap = None   # with reused sampling log-probs: measured on the first minibatch, before an update
    n_steps = 0
    roles.train(True)
    for _ in range(cfg.ppo.epochs):
        order = torch.randperm(len(exp), generator=generator).tolist()
        for s in range(0, len(exp), cfg.ppo.minibatch_size):
            stats = accumulate(roles, exp.take(order[s:s + cfg.ppo.minibatch_size]), algo, cfg.ppo,
                               beta, temperature, accelerator,
                               measure_gap=cfg.rollout.reuse_sampling_logps and n_steps == 0)
            if "logprob_gap_max" in stats:
                gap = stats.pop("logprob_gap_max")
            stats["grad_norm"] = _step(accelerator, opt["policy"], opt["policy_sched"],
                                       roles.policy_parameters(), cfg.optim.max_grad_norm)
            if algo.uses_value:
                stats["value_grad_norm"] = _step(accelerator, opt["value"], opt["value_sched"],
                                                 roles.value_parameters(),
                                                 cfg.value_optim.max_grad_norm)
            tokens = stats.pop("tokens")
            stats["clipfrac"] /= tokens
            stats["approx_kl"] /= tokens
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + v
            n_steps += 1
    roles.train(False)
    out = {k: v / n_steps for k, v in totals.items()}
    if gap is not None:
        out["logprob_gap_max"] = gap
    if not algo.uses_value:
        out.pop("value_loss")
    out["lr"] = opt["policy_sched"].get_last_lr()[0]
    return out


# ---------------------------------------------------------------------------------------------
# Setup helpers.


def make_optimizers(roles, cfg: Config, algo: Algorithm) -> dict:
    from alignkit.engine.training import lr_lambda, make_optimizer

    per_iteration = cfg.ppo.epochs * (cfg.rollout.rows // cfg.ppo.minibatch_size)
    total = cfg.iterations * per_iteration
    out = {}
    groups = [("policy", roles.policy_parameters(), cfg.optim)]
    if algo.uses_value:
        groups.append(("value", roles.value_parameters(), cfg.value_optim))
    for name, params, optim in groups:
        opt = make_optimizer(torch.nn.ParameterList(params), optim)
        out[name] = opt
        out[f"{name}_sched"] = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(optim, total))
    return out


def _eval_config(cfg: Config):
    from alignkit.stages import evaluate

    e = cfg.eval
    return evaluate.Config(policy=cfg.model, task=cfg.task, chat=cfg.chat, num_prompts=e.num_prompts,
                           split=e.split, samples_per_prompt=e.samples_per_prompt,
                           batch_size=e.batch_size, seed=e.seed, sampling=e.sampling,
                           success_at=e.success_at)


def _evaluate(roles, tokenizer, cfg: Config) -> tuple[dict, list[dict]]:
    from alignkit.stages.evaluate import evaluate_policy

    return evaluate_policy(roles.policy, tokenizer, _eval_config(cfg), roles.reference, roles.reward)


# ---------------------------------------------------------------------------------------------
# One iteration and the run.


@dataclass
class LoopState:
    """Everything besides the models and optimisers that a checkpoint must restore."""

    kl: FixedKLController | AdaptiveKLController
    moments: RunningMoments
    rng: GeneratorState


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    return float((x * mask).sum() / mask.sum().clamp_min(1))


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """``1 - Var[R - V] / Var[R]`` over real tokens: 1 is a perfect critic, <= 0 a useless one."""
    mask = mask.float()
    var_r = _masked_mean((returns - _masked_mean(returns, mask)) ** 2, mask)
    err = returns - values
    var_e = _masked_mean((err - _masked_mean(err, mask)) ** 2, mask)
    return 1.0 - var_e / var_r if var_r > 0 else float("nan")


def run_iteration(iteration: int, roles, prompts, tokenizer, algo: Algorithm, cfg: Config,
                  state: LoopState, opt: dict, accelerator, gold) -> dict:
    from alignkit.engine.rl.rollout import collect, training_scores
    from alignkit.stages.evaluate import success_metrics

    start = time.perf_counter()
    texts, ids = prompts
    k = cfg.rollout.samples_per_prompt
    chosen = iteration_prompts(len(texts), cfg.rollout.prompts_per_iteration, cfg.seed, iteration)
    rows = [i for i in chosen for _ in range(k)]   # k consecutive samples per prompt
    sampled = collect(roles, [ids[i] for i in rows], [texts[i] for i in rows], tokenizer,
                      cfg.rollout.sampling, state.rng.generator, batch_size=cfg.rollout.batch_size,
                      gold=gold, recompute_logps=not cfg.rollout.reuse_sampling_logps,
                      pack=cfg.ppo.packing)
    exp = sampled.experience
    finished = exp.rollout.finished
    scores = training_scores(sampled.proxy, finished, cfg.score, state.moments)
    beta = state.kl.value
    exp.advantages, exp.returns = algo.advantages(exp, scores, beta, cfg)
    kl = sequence_kl(exp, cfg.kl.estimator)
    lengths = exp.mask.sum(-1).float()
    metrics = {"proxy_reward_mean": float(sampled.proxy.mean()),
               "proxy_reward_std": float(sampled.proxy.std()) if len(exp) > 1 else 0.0,
               "score_mean": float(scores.mean()),
               "kl_to_ref": float(kl.mean()), "kl_estimator": cfg.kl.estimator, "beta": beta,
               "entropy": -_masked_mean(exp.old_logps, exp.mask.float()),
               "response_length": float(lengths.mean()),
               "finished_fraction": float(finished.float().mean()),
               "logprob_gap_max": sampled.logprob_gap_max,
               "tokens_per_s": float(lengths.sum()) / max(sampled.generation_seconds, 1e-9)}
    if sampled.gold is not None:
        metrics["gold_reward_mean"] = float(sampled.gold.mean())
        success = success_metrics(sampled.gold.tolist(), cfg.eval.success_at)
        if success:
            metrics["gold_success_mean"] = success["gold_success_mean"]
    if algo.uses_value:
        metrics["explained_variance"] = explained_variance(exp.values, exp.returns, exp.mask)
    metrics.update(optimise(roles, exp, algo, cfg, beta, opt, state.rng.generator, accelerator))
    state.kl.update(metrics["kl_to_ref"], len(exp))
    metrics["iteration_s"] = time.perf_counter() - start
    return metrics


def _packs(roles, ppo: PPOConfig) -> bool | str:
    """How the forwards over rollouts pack (``rollout_logps``'s ``pack``): ``"shared"`` (each
    prompt written once for its group's rows) where every model that reads rollouts lets a
    segment attend to the prompt of the one before it, else ``True`` (one flat row) where each
    keeps attention to each sequence of a flat row (``alignkit.engine.attention.flat_packing`` switches
    transformers' SDPA to one that does both), else ``False``; ``False`` if ``ppo.packing`` is off."""
    from alignkit.engine.attention import flat_packing
    from alignkit.engine.forward import supports_packing

    models = roles.rollout_models()
    if not (ppo.packing and all(flat_packing(m) and supports_packing(m, "flat") for m in models)):
        return False
    return "shared" if all(supports_packing(m, "shared") for m in models) else True


def _resume(cfg: Config, out: Path, accelerator, tracker) -> int:
    from alignkit.engine.training import _latest_checkpoint

    ckpt = None
    if cfg.resume == "auto":
        ckpt = _latest_checkpoint(out)
    elif cfg.resume != "never":
        ckpt = Path(cfg.resume)
    if ckpt is None:
        return 0
    accelerator.load_state(str(ckpt))
    done = json.loads((ckpt / "trainer_state.json").read_text())["step"]
    tracker.truncate_after(done)
    accelerator.print(f"alignkit ppo: resumed from {ckpt} at iteration {done}/{cfg.iterations}")
    return done


def _initial_eval(roles, tokenizer, cfg: Config, out: Path) -> dict:
    """Metrics of the starting policy on the same held-out prompts (cached for resumed runs)."""
    path = out / "initial_metrics.json"
    if path.exists():
        return json.loads(path.read_text())
    metrics, _ = _evaluate(roles, tokenizer, cfg)
    initial = {f"initial_{k}": v for k, v in metrics.items()
               if k.startswith(("gold_reward", "gold_success", "proxy_reward", "response_length"))}
    path.write_text(json.dumps(initial, indent=2) + "\n")
    return initial


def main(cfg: Config) -> dict:
    from accelerate.utils import set_seed

    from alignkit.engine.models import load_tokenizer
    from alignkit.engine.scoring import GoldReward
    from alignkit.engine.rl.roles import RoleSpec, build_roles, memory_report
    from alignkit.tracking import Tracker
    from alignkit.engine.training import _save_checkpoint, make_accelerator

    accelerator = make_accelerator(cfg.mixed_precision)
    require(accelerator.num_processes == 1, "alignkit ppo runs in one process")
    set_seed(cfg.seed)
    out = Path(cfg.out_dir)
    algo = ALGORITHMS[cfg.ppo.algo]
    tracker = Tracker(out, cfg, stage=cfg.ppo.algo, tensorboard=cfg.tensorboard)
    tokenizer = load_tokenizer(cfg.model)
    spec = RoleSpec(model=cfg.model, reference=cfg.reference, reward=cfg.reward,
                    value_init=cfg.value_init, chat=cfg.chat, lora=cfg.lora)
    roles = build_roles(cfg.roles, spec, tokenizer, needs_value=algo.uses_value).to(accelerator.device)
    cfg = replace(cfg, ppo=replace(cfg.ppo, packing=_packs(roles, cfg.ppo)))
    prompts = load_prompts(cfg.rollout.prompts or f"task:{cfg.task}" + (":chat" if cfg.chat else ""),
                           cfg.rollout.num_prompts, tokenizer)
    gold = GoldReward(cfg.task, chat=cfg.chat) if cfg.task else None
    evaluating = cfg.task is not None and cfg.eval.num_prompts > 0
    initial = _initial_eval(roles, tokenizer, cfg, out) if evaluating and cfg.eval.initial else {}

    opt = make_optimizers(roles, cfg, algo)
    kl = (AdaptiveKLController(cfg.kl.beta, cfg.kl.target, cfg.kl.horizon) if cfg.kl.adaptive
          else FixedKLController(cfg.kl.beta))
    state = LoopState(kl, RunningMoments(), GeneratorState(cfg.seed))
    names = sorted(opt)
    prepared = accelerator.prepare(*roles.modules().values(), *(opt[n] for n in names))
    opt = dict(zip(names, prepared[len(roles.modules()):]))
    accelerator.register_for_checkpointing(state.kl, state.moments, state.rng)
    start = _resume(cfg, out, accelerator, tracker)

    metrics: dict = {}
    for it in range(start, cfg.iterations):
        metrics = run_iteration(it, roles, prompts, tokenizer, algo, cfg, state, opt, accelerator,
                                gold)
        tracker.log(it + 1, metrics)
        if cfg.save_every > 0 and (it + 1) % cfg.save_every == 0 and it + 1 < cfg.iterations:
            _save_checkpoint(accelerator, out, it + 1, cfg.keep_checkpoints)
    if start < cfg.iterations:
        _save_checkpoint(accelerator, out, cfg.iterations, cfg.keep_checkpoints)

    final = {"algo": cfg.ppo.algo, "roles": cfg.roles, "iterations": cfg.iterations,
             "beta": state.kl.value,
             **{f"last_{k}": v for k, v in metrics.items()}, **memory_report(roles), **initial}
    if evaluating:
        evaluated, rows = _evaluate(roles, tokenizer, cfg)
        final.update(evaluated)
        with (out / "samples.jsonl").open("w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
    final["model"] = str(roles.save_policy(out / "model", tokenizer))
    return tracker.finish(final)


# ---------------------------------------------------------------------------------------------
# Report figure.


def figures(run_dir: str | Path) -> list:
    """Proxy and gold reward of each iteration's rollouts against ``sqrt(KL to the reference)``:
    the over-optimisation curve of Gao, Schulman & Hilton 2022 (fig. 1: gold rises, peaks and
    falls with ``sqrt(KL)`` while the proxy keeps rising). ``[(title, Figure)]``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from alignkit.tracking import read_metrics

    rows = [r for r in read_metrics(run_dir) if r.get("kl_to_ref") is not None
            and r.get("proxy_reward_mean") is not None]
    if len(rows) < 2:
        return []
    x = [math.sqrt(max(r["kl_to_ref"], 0.0)) for r in rows]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot(x, [r["proxy_reward_mean"] for r in rows], marker=".", color="tab:blue",
            label="proxy reward (RM)")
    ax.set_xlabel("sqrt(KL(policy || reference)), sqrt(nats)")
    ax.set_ylabel("proxy reward", color="tab:blue")
    if any(r.get("gold_reward_mean") is not None for r in rows):
        gold_ax = ax.twinx()
        gold_ax.plot(x, [r.get("gold_reward_mean") for r in rows], marker=".", color="tab:red",
                     label="gold reward")
        gold_ax.set_ylabel("gold reward", color="tab:red")
        fig.legend(loc="upper left", bbox_to_anchor=(0.12, 0.88), fontsize=8)
    ax.grid(alpha=0.3)
    out = [("Proxy and gold reward against sqrt(KL to the reference), per iteration", fig)]
    success = [(r["step"], r["gold_success_mean"]) for r in rows
               if r.get("gold_success_mean") is not None]
    if success:   # e.g. accuracy on arithmetic (eval.success_at=1.0)
        fig, ax = plt.subplots(figsize=(5.5, 3.2))
        ax.plot(*zip(*success), marker=".")
        ax.set_xlabel("iteration")
        ax.set_ylabel("share of rollouts with gold >= success_at")
        ax.grid(alpha=0.3)
        out.append(("Success rate of each iteration's rollouts (training prompts)", fig))
    return out

"""``alignkit ppo``: RLHF with PPO, or the critic-free RLOO and GRPO, on one loop.

Each iteration: sample ``k`` responses for each of a batch of prompts (:mod:`alignkit.engine.rl.rollout`),
score them with a reward source, turn scores into advantages (the algorithm's part, registered
in :mod:`alignkit.engine.rl.algorithms`) and :mod:`alignkit.engine.rl.update`, then run ``ppo.epochs`` passes of clipped-surrogate updates over
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

Multi-process runs (``torchrun`` / ``accelerate launch``) train the policy and the value model
with ``strategy`` (``ddp | fsdp2 | zero2 | zero3``, :mod:`alignkit.engine.strategies`), each
model its own sharded unit, each built through the strategy. The frozen reference is kept as
the strategy keeps a frozen model (``Strategy.prepare_frozen``: sharded under fsdp2 / zero3, a
copy per process under ddp / zero2); the reward model (or other reward source) is replicated.
Each process samples its equal share of the iteration's prompts from an unsharded rollout copy
of the policy (the strategy gathers the updated weights into it after each update) with each
row's own seed, runs the no-grad forwards of that share in
lockstep (sharded forwards all-gather), and the shares are then all-gathered: every process
holds the whole experience, computes the same advantages, normaliser, KL controller and
minibatch order, and trains on its share of each minibatch with the whole minibatch's
normalisers (:mod:`alignkit.engine.rl.update`). So N processes give one process's run up to
float summation order. Evaluation runs on every process (the same samples), the files are
written by the main one.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from alignkit.config import ConfigError, require
from alignkit.data.io import write_json, write_jsonl
from alignkit.engine.evaluation import success_metrics
from alignkit.engine.models import LoraSpec
from alignkit.engine.rl.algorithms import ALGORITHMS, Algorithm, KLConfig, PPOConfig
from alignkit.engine.rl.rollout import (GeneratorState, RolloutConfig, RunningMoments, ScoreConfig,
                                        collect, encoded_prompts, iteration_prompts, rollout_packing,
                                        training_scores)
from alignkit.engine.rl.update import explained_variance, make_optimizers, masked_mean, optimise
from alignkit.engine.sampling import SamplingConfig
from alignkit.engine.workers import WorkersConfig
from alignkit.engine.training import OptimConfig
from alignkit.math.advantages import AdaptiveKLController, FixedKLController, sequence_kl
from alignkit.tracking import TrackingConfig, is_main_process


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
class Config(TrackingConfig):
    model: str = ""                    # the starting policy (an SFT model)
    reward: str = ""                   # model:PATH | gold:TASK | python:MOD:FN | judge:...
    reference: str | None = None       # default: model
    task: str | None = None            # built-in task: default prompts, gold metrics, final eval
    chat: bool = False
    chat_template: str | None = None  # for chat=true: a Jinja template or a .jinja file
    out_dir: str = "runs/ppo"
    iterations: int = 20
    roles: Literal["separate", "shared"] = "separate"
    value_init: Literal["policy", "reward"] = "policy"
    lora: LoraSpec = field(default_factory=LoraSpec)  # the adapters of roles=shared
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)   # where sampling runs: local | ray
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
    # How processes share the trained policy and value (alignkit.engine.strategies): ddp
    # (replicated), fsdp2, zero2, zero3; offload (fsdp2, zero3 on a GPU): their weights and
    # optimiser state in CPU memory. The frozen reference is sharded with them (fsdp2, zero3);
    # the reward source is replicated.
    strategy: str = "ddp"
    offload: bool = False
    report_to: list[str] | str = field(default_factory=lambda: ["tensorboard"], kw_only=True)
    tensorboard: bool | None = None    # deprecated: report_to (true adds tensorboard, false drops it)

    def __post_init__(self):
        require(bool(self.model), "model is required (path of the starting policy)")
        require(bool(self.reward), "reward is required (model:PATH, gold:TASK, python:MOD:FN, ...)")
        require(self.iterations >= 1, "iterations must be >= 1")
        require(self.task is not None or self.rollout.prompts is not None,
                "set task (a built-in task) or rollout.prompts (a file of prompt records)")
        k = self.rollout.samples_per_prompt
        need = ALGORITHMS[self.ppo.algo].min_samples_per_prompt
        require(k >= need, f"ppo.algo={self.ppo.algo} needs rollout.samples_per_prompt >= {need} "
                f"(a baseline from the other samples), got {k}")
        require(self.rollout.rows % self.ppo.minibatch_size == 0,
                f"rows per iteration ({self.rollout.rows} = prompts_per_iteration x "
                f"samples_per_prompt) must be a multiple of ppo.minibatch_size "
                f"({self.ppo.minibatch_size})")
        require(self.value_init == "policy" or self.reward.startswith("model:"),
                "value_init=reward needs reward: model:PATH")
        from alignkit.engine.strategies import validate

        validate(self.strategy, self.offload)
        require(self.roles == "separate" or self.strategy == "ddp",
                f"roles=shared (LoRA adapters on one base) trains in one process with "
                f"strategy=ddp; strategy={self.strategy} shards separate models: set "
                f"roles=separate")


def check_processes(cfg: Config, world: int) -> None:
    """What a run on ``world`` processes needs: equal shares of whole prompts per process and of
    every minibatch's rows (sharded forwards run in lockstep), separate roles (the shared
    placement's adapters are not wrapped per model), and sampling in each process with the hf
    engine."""
    if world == 1:
        return
    if cfg.roles != "separate":
        raise ConfigError(f"roles=shared runs in one process; {world} processes need "
                          f"roles=separate")
    if cfg.rollout.prompts_per_iteration % world:
        raise ConfigError(f"rollout.prompts_per_iteration ({cfg.rollout.prompts_per_iteration}) "
                          f"must be a multiple of the number of processes ({world}): each samples "
                          f"an equal share of whole prompts")
    if cfg.rollout.sampling.engine != "hf" or cfg.workers.backend != "local":
        # Each process would start its own engine or Ray pool beside its trainer: untested.
        raise ConfigError(f"{world} processes sample with rollout.sampling.engine=hf and "
                          f"workers.backend=local (each from its rollout copy); got "
                          f"engine={cfg.rollout.sampling.engine}, workers.backend="
                          f"{cfg.workers.backend}: run those in one process")
    if cfg.ppo.minibatch_size % world:
        raise ConfigError(f"ppo.minibatch_size ({cfg.ppo.minibatch_size}) must be a multiple of "
                          f"the number of processes ({world}): each trains an equal share of "
                          f"every minibatch")


# ---------------------------------------------------------------------------------------------
# Evaluation on held-out prompts of the task.


def _evaluate(roles, tokenizer, cfg: Config, policy=None) -> tuple[dict, list[dict]]:
    from alignkit.engine.evaluation import evaluate_on_task

    e = cfg.eval
    policy = roles.policy if policy is None else policy
    return evaluate_on_task(policy, tokenizer, cfg.task, e.sampling, chat=cfg.chat,
                            split=e.split, num_prompts=e.num_prompts,
                            samples_per_prompt=e.samples_per_prompt, seed=e.seed,
                            batch_size=e.batch_size, success_at=e.success_at,
                            reference=roles.reference, proxy=roles.reward, workers=cfg.workers)


def _initial_eval(roles, tokenizer, cfg: Config, out: Path, policy) -> dict:
    """Metrics of the starting ``policy`` on the same held-out prompts (cached for resumed runs)."""
    path = out / "initial_metrics.json"
    if path.exists():
        return json.loads(path.read_text())
    metrics, _ = _evaluate(roles, tokenizer, cfg, policy)
    initial = {f"initial_{k}": v for k, v in metrics.items()
               if k.startswith(("gold_reward", "gold_success", "proxy_reward", "response_length"))}
    if is_main_process():
        write_json(path, initial)
    return initial


# ---------------------------------------------------------------------------------------------
# One iteration and the run.


@dataclass
class LoopState:
    """Everything besides the models and optimisers that a checkpoint must restore."""

    kl: FixedKLController | AdaptiveKLController
    moments: RunningMoments
    rng: GeneratorState


def run_iteration(iteration: int, roles, prompts, tokenizer, algo: Algorithm, cfg: Config,
                  state: LoopState, opt: dict, accelerator, gold,
                  pack: bool | str, sampler=None) -> tuple[dict, list[dict]]:
    """Sample, score and update once; the iteration's metrics and its samples with their
    scores. ``sampler``: the unsharded policy to sample from (default ``roles.policy``)."""
    start = time.perf_counter()
    texts, ids = prompts
    k = cfg.rollout.samples_per_prompt
    chosen = iteration_prompts(len(texts), cfg.rollout.prompts_per_iteration, cfg.seed, iteration)
    rows = [i for i in chosen for _ in range(k)]   # k consecutive samples per prompt
    sampled = collect(roles, [ids[i] for i in rows], [texts[i] for i in rows], tokenizer,
                      cfg.rollout.sampling, state.rng.generator, batch_size=cfg.rollout.batch_size,
                      gold=gold, recompute_logps=not cfg.rollout.reuse_sampling_logps, pack=pack,
                      workers=cfg.workers, sampler=sampler, rank=accelerator.process_index,
                      world=accelerator.num_processes)
    exp = sampled.experience
    finished = exp.rollout.finished
    scores = training_scores(sampled.proxy, finished, cfg.score, state.moments)
    beta = state.kl.value
    exp.advantages, exp.returns = algo.advantages(exp, scores, beta, cfg.ppo, cfg.kl.estimator, k)
    kl = sequence_kl(exp.old_logps, exp.ref_logps, exp.mask, cfg.kl.estimator)
    lengths = exp.mask.sum(-1).float()
    metrics = {"proxy_reward_mean": float(sampled.proxy.mean()),
               "proxy_reward_std": float(sampled.proxy.std()) if len(exp) > 1 else 0.0,
               "score_mean": float(scores.mean()),
               "kl_to_ref": float(kl.mean()), "kl_estimator": cfg.kl.estimator, "beta": beta,
               "entropy": -masked_mean(exp.old_logps, exp.mask.float()),
               "response_length": float(lengths.mean()),
               "finished_fraction": float(finished.float().mean()),
               "logprob_gap_max": sampled.logprob_gap_max,
               "tokens_per_s": float(lengths.sum()) / max(sampled.generation_seconds, 1e-9)}
    if not math.isnan(sampled.logprob_gap_mean):
        metrics["logprob_gap_mean"] = sampled.logprob_gap_mean
    if sampled.gold is not None:
        metrics["gold_reward_mean"] = float(sampled.gold.mean())
        success = success_metrics(sampled.gold.tolist(), cfg.eval.success_at)
        if success:
            metrics["gold_success_mean"] = success["gold_success_mean"]
    if algo.uses_value:
        metrics["explained_variance"] = explained_variance(exp.values, exp.returns, exp.mask)
    metrics.update(optimise(roles, exp, algo, beta, opt, state.rng.generator, accelerator,
                            ppo=cfg.ppo, optim=cfg.optim, value_optim=cfg.value_optim,
                            temperature=cfg.rollout.sampling.temperature or 1.0, pack=pack,
                            reused_sampling_logps=cfg.rollout.reuse_sampling_logps))
    state.kl.update(metrics["kl_to_ref"], len(exp))
    metrics["iteration_s"] = time.perf_counter() - start
    rows = [{"prompt": p, "response": r, "proxy_reward": float(x)}
            for p, r, x in zip(sampled.prompts, sampled.responses, sampled.proxy.tolist())]
    if sampled.gold is not None:
        for row, g in zip(rows, sampled.gold.tolist()):
            row["gold_reward"] = g
    return metrics, rows


def main(cfg: Config) -> dict:
    from accelerate.utils import set_seed

    from alignkit.engine.models import load_tokenizer
    from alignkit.engine.rl.roles import RoleSpec, build_roles, memory_report
    from alignkit.engine.scoring import GoldReward
    from alignkit.engine.training import make_accelerator, resume, save_checkpoint
    from alignkit.tracking import Tracker

    accelerator = make_accelerator(cfg.mixed_precision, cfg.strategy, cfg.offload)
    check_processes(cfg, accelerator.num_processes)
    set_seed(cfg.seed)
    out = Path(cfg.out_dir)
    algo = ALGORITHMS[cfg.ppo.algo]
    tracker = Tracker(out, cfg, enabled=accelerator.is_main_process, stage=cfg.ppo.algo)
    tokenizer = load_tokenizer(cfg.model, cfg.chat_template, chat=cfg.chat)
    spec = RoleSpec(model=cfg.model, reference=cfg.reference, reward=cfg.reward,
                    value_init=cfg.value_init, chat=cfg.chat, lora=cfg.lora)
    roles = build_roles(cfg.roles, spec, tokenizer, needs_value=algo.uses_value,
                        strategy=accelerator).to(accelerator.device)
    pack = rollout_packing(roles.rollout_models(), cfg.ppo.packing, accelerator.on_whole)
    accelerator.print(f"alignkit ppo: rollout forwards packed: {pack} (ppo.packing={cfg.ppo.packing})")
    prompts = encoded_prompts(cfg.rollout.prompts or f"task:{cfg.task}" + (":chat" if cfg.chat else ""),
                              cfg.rollout.num_prompts, tokenizer)
    gold = GoldReward(cfg.task, chat=cfg.chat) if cfg.task else None
    evaluating = cfg.task is not None and cfg.eval.num_prompts > 0

    per_iteration = cfg.ppo.epochs * (cfg.rollout.rows // cfg.ppo.minibatch_size)
    opt = make_optimizers(roles, algo, optim=cfg.optim, value_optim=cfg.value_optim,
                          total_steps=cfg.iterations * per_iteration)
    kl = (AdaptiveKLController(cfg.kl.beta, cfg.kl.target, cfg.kl.horizon) if cfg.kl.adaptive
          else FixedKLController(cfg.kl.beta))
    state = LoopState(kl, RunningMoments(), GeneratorState(cfg.seed))
    opt = _prepare(roles, opt, cfg, accelerator)
    # The starting policy's metrics, sampled as every iteration samples (a sharded build holds
    # the whole policy on the main process only until prepare).
    initial = _initial_eval(roles, tokenizer, cfg, out, accelerator.rollout_model(roles.policy)) \
        if evaluating and cfg.eval.initial else {}
    accelerator.announce()
    accelerator.register_for_checkpointing(state.kl, state.moments, state.rng)
    start, saved = resume(accelerator, out, cfg.resume, tracker,
                          f"iteration {{}}/{cfg.iterations}")

    metrics: dict = saved.get("last_metrics", {})
    rows: list[dict] = []
    tracker.progress(cfg.iterations, done=start, unit="iteration")
    for it in range(start, cfg.iterations):
        sampler = accelerator.rollout_model(roles.policy)   # the weights after the last update
        metrics, rows = run_iteration(it, roles, prompts, tokenizer, algo, cfg, state, opt,
                                      accelerator, gold, pack, sampler)
        tracker.log(it + 1, metrics)
        if cfg.save_every > 0 and (it + 1) % cfg.save_every == 0 and it + 1 < cfg.iterations:
            save_checkpoint(accelerator, out, it + 1, cfg.keep_checkpoints,
                            {"last_metrics": metrics})
    if start < cfg.iterations:
        save_checkpoint(accelerator, out, cfg.iterations, cfg.keep_checkpoints,
                        {"last_metrics": metrics})

    final = {"algo": cfg.ppo.algo, "roles": cfg.roles, "iterations": cfg.iterations,
             "beta": state.kl.value, "packing": pack,
             **{f"last_{k}": v for k, v in metrics.items()}, **memory_report(roles), **initial,
             **accelerator.describe()}
    if evaluating:   # samples of the held-out evaluation, else of the last iteration
        evaluated, rows = _evaluate(roles, tokenizer, cfg, accelerator.rollout_model(roles.policy))
        final.update(evaluated)
    if rows and accelerator.is_main_process:
        write_jsonl(out / "samples.jsonl", rows)
    final.update(_save(roles, tokenizer, cfg, accelerator, out))
    return tracker.finish(final)


def _prepare(roles, opt: dict, cfg: Config, accelerator) -> dict:
    """The trained models and their optimisers through the strategy; the prepared optimisers."""
    if cfg.roles == "shared":   # one process: the adapters' optimisers span both modules
        names = sorted(opt)
        prepared = accelerator.prepare(*roles.modules().values(), *(opt[n] for n in names))
        return dict(zip(names, prepared[len(roles.modules()):]))
    # The frozen reference as the strategy keeps one: sharded under fsdp2 / zero3 (its forwards
    # run in the same lockstep as the policy's), whole on every process under ddp / zero2.
    roles.reference = accelerator.prepare_frozen(roles.reference)
    models = {}   # each trained model with its optimiser and schedule: one unit of the strategy each
    for name, module in roles.modules().items():
        models[name], opt[name], opt[f"{name}_sched"] = accelerator.prepare(
            module, opt[name], opt[f"{name}_sched"])
    roles.use_prepared(models)
    return opt


def _save(roles, tokenizer, cfg: Config, accelerator, out: Path) -> dict:
    """The final policy in ``model/`` (and the critic in ``value/``); their paths."""
    from alignkit.engine.models import save_model

    saved = {"model": str(out / "model")}
    if cfg.roles == "shared":
        roles.save_policy(out / "model", tokenizer)
        return saved
    # gathered on every process, saved by the main one; the critic beside the policy
    policy = accelerator.full_model(roles.policy)
    value = accelerator.full_model(roles.value_model) if roles.value is not None else None
    if value is not None:
        saved["value_model"] = str(out / "value")
    if accelerator.is_main_process:
        save_model(policy, tokenizer, out / "model")
        if value is not None:
            save_model(value.model, tokenizer, out / "value")
    accelerator.wait_for_everyone()
    return saved


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

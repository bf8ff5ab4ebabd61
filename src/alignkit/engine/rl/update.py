"""One RL iteration's update: ``ppo.epochs`` passes of clipped-surrogate steps over shuffled
minibatches of the iteration's experience, the policy (and, for PPO, the value model) stepped
through the training loop's :func:`~alignkit.engine.training.optimizer_step`.

The algorithm (:mod:`alignkit.engine.rl.algorithms`) gives the per-token loss and how it reduces;
the normalisers are those of the whole minibatch (:func:`alignkit.math.losses.reduce_loss`), so
the gradient does not depend on ``ppo.micro_batch_size``.

On ``N`` processes every process holds the whole experience (:func:`~alignkit.engine.rl.rollout.collect`
gathers it) and draws the same minibatches; process ``r`` computes rows ``r * m / N ..`` of each
minibatch of ``m`` rows. The normalisers are still the whole minibatch's, and
:func:`~alignkit.math.losses.reduce_loss`'s ``world_size`` factor undoes the strategy's average
of the gradients over processes (the one reduction, as the training loop's), so the step equals
one process's up to float summation order.
"""

from __future__ import annotations

import contextlib

import torch

from alignkit.engine.generation import rollout_logps
from alignkit.engine.rl.algorithms import Algorithm, PPOConfig, loss_weights
from alignkit.engine.rl.rollout import Experience
from alignkit.engine.training import OptimConfig, lr_lambda, make_optimizer, optimizer_step
from alignkit.math.advantages import kl_penalty
from alignkit.math.losses import ppo_clipped, ppo_value_loss, reduce_loss


def accumulate(roles, mb: Experience, algo: Algorithm, ppo: PPOConfig, beta: float,
               temperature: float, accelerator, pack: bool | str = False,
               measure_gap: bool = False) -> dict[str, float]:
    """Accumulate the gradients of one minibatch (policy and, for PPO, value) into ``.grad``.

    ``pack``: the rollout forwards' layout (``rollout_logps``). Returns summed metrics and their
    counts; ``measure_gap`` adds ``logprob_gap_max``, the largest |new - old| log-prob (before an
    update).
    """
    _, policy_norm = loss_weights(algo.reduction, mb.mask)
    value_norm = float(mb.mask.sum())
    world, rank = accelerator.num_processes, accelerator.process_index
    stats = {"policy_loss": 0.0, "value_loss": 0.0, "clipfrac": 0.0, "approx_kl": 0.0}
    share = len(mb) // world
    if world > 1:   # this process's rows of the minibatch (the normalisers stay the whole's)
        mb = mb.take(range(rank * share, (rank + 1) * share))
    starts = range(0, len(mb), ppo.micro_batch_size)
    # As the training loop: a sharded strategy marks accumulation in one process too.
    defer = world > 1 or getattr(accelerator, "name", "ddp") != "ddp"
    for start in starts:
        sub = mb.take(range(start, min(start + ppo.micro_batch_size, len(mb))))
        mask = sub.mask.float()
        last = start == starts[-1]
        with _accumulating(accelerator, roles.policy, defer and not last):
            with accelerator.autocast():
                new_logps = rollout_logps(roles.policy, sub.rollout, temperature, pack)
            weights, _ = loss_weights(algo.reduction, mask)
            loss = reduce_loss(algo.loss(new_logps, sub, beta, ppo).float(), weights, policy_norm,
                               world)
            accelerator.backward(loss, model=roles.policy)
        stats["policy_loss"] += float(loss.detach()) / world
        # Diagnostics, per token whatever the loss's weighting. approx_kl: k3 with samples from
        # the old policy, r = new / old, an estimate of KL(old || new) (Schulman 2020).
        stats["clipfrac"] += float((ppo_clipped(new_logps, sub.old_logps, sub.advantages,
                                                ppo.clip_eps) * mask).sum())
        stats["approx_kl"] += float((kl_penalty(sub.old_logps, new_logps.detach(), "k3") * mask).sum())
        if measure_gap:
            gap = float(((new_logps.detach() - sub.old_logps).abs() * mask).max())
            stats["logprob_gap_max"] = max(stats.get("logprob_gap_max", 0.0), gap)
        if algo.uses_value:
            with _accumulating(accelerator, roles.value_model, defer and not last):
                with accelerator.autocast():
                    values = roles.values(sub.rollout, pack)
                vloss = reduce_loss(ppo_value_loss(values, sub.values, sub.returns,
                                                   ppo.value_clip_eps), mask, value_norm, world)
                accelerator.backward(vloss, model=roles.value_model)
            stats["value_loss"] += float(vloss.detach()) / world
    if world > 1:   # sums over every process's rows; the gap's maximum
        names = sorted(k for k in stats if k != "logprob_gap_max")
        total = accelerator.reduce(torch.tensor([stats[k] for k in names], dtype=torch.float64,
                                                device=accelerator.device), reduction="sum")
        stats.update(zip(names, total.tolist()))
        if "logprob_gap_max" in stats:
            gap = torch.tensor([stats["logprob_gap_max"]], device=accelerator.device)
            torch.distributed.all_reduce(gap, op=torch.distributed.ReduceOp.MAX)
            stats["logprob_gap_max"] = float(gap)
    stats["tokens"] = value_norm
    return stats


def _accumulating(accelerator, model, defer: bool):
    """Inside: gradients accumulate without the strategy's reduction (not the step's last
    micro-batch)."""
    return accelerator.no_sync(model) if defer else contextlib.nullcontext()


def _step(accelerator, optimizer, scheduler, params, max_grad_norm) -> float:
    norm = optimizer_step(accelerator, optimizer, scheduler, params, max_grad_norm)
    return float(norm) if norm is not None else float("nan")


def optimise(roles, exp: Experience, algo: Algorithm, beta: float, opt: dict,
             generator: torch.Generator, accelerator, *, ppo: PPOConfig, optim: OptimConfig,
             value_optim: OptimConfig, temperature: float, pack: bool | str = False,
             reused_sampling_logps: bool = False) -> dict[str, float]:
    """``ppo.epochs`` passes over the experience in shuffled minibatches; mean metrics.

    ``reused_sampling_logps``: the old log-probs are those recorded while sampling, so the gap to
    the training forward is measured here, on the first minibatch, before an update."""
    totals: dict[str, float] = {}
    gap = None
    n_steps = 0
    roles.train(True)
    for _ in range(ppo.epochs):
        order = torch.randperm(len(exp), generator=generator).tolist()
        for s in range(0, len(exp), ppo.minibatch_size):
            stats = accumulate(roles, exp.take(order[s:s + ppo.minibatch_size]), algo, ppo, beta,
                               temperature, accelerator, pack,
                               measure_gap=reused_sampling_logps and n_steps == 0)
            if "logprob_gap_max" in stats:
                gap = stats.pop("logprob_gap_max")
            stats["grad_norm"] = _step(accelerator, opt["policy"], opt["policy_sched"],
                                       roles.policy_parameters(), optim.max_grad_norm)
            if algo.uses_value:
                stats["value_grad_norm"] = _step(accelerator, opt["value"], opt["value_sched"],
                                                 roles.value_parameters(),
                                                 value_optim.max_grad_norm)
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


def make_optimizers(roles, algo: Algorithm, *, optim: OptimConfig, value_optim: OptimConfig,
                    total_steps: int) -> dict:
    """AdamW and its schedule for the policy (``policy``, ``policy_sched``) and, for algorithms
    with a critic, the value model (``value``, ``value_sched``), over ``total_steps`` steps."""
    out = {}
    groups = [("policy", roles.policy_parameters(), optim)]
    if algo.uses_value:
        groups.append(("value", roles.value_parameters(), value_optim))
    for name, params, cfg in groups:
        opt = make_optimizer(torch.nn.ParameterList(params), cfg)
        out[name] = opt
        out[f"{name}_sched"] = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total_steps))
    return out


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    return float((x * mask).sum() / mask.sum().clamp_min(1))


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """``1 - Var[R - V] / Var[R]`` over real tokens: 1 is a perfect critic, <= 0 a useless one."""
    mask = mask.float()
    var_r = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    err = returns - values
    var_e = masked_mean((err - masked_mean(err, mask)) ** 2, mask)
    return 1.0 - var_e / var_r if var_r > 0 else float("nan")

"""The RL algorithms of ``alignkit ppo`` (its docstring states each one): PPO (Schulman et
al. 2017), RLOO (Ahmadian et al. 2024) and GRPO (Shao et al. 2024).

A variant is an entry of :data:`ALGORITHMS`, the one registry (``ppo.algo`` is validated against
it): whether it trains a value model, how scores become advantages, its per-token loss, and how
those losses reduce to one number. Each function takes plain values and its own config section.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch

from alignkit.config import require
from alignkit.engine.rl.rollout import Experience
from alignkit.math.advantages import (gae, grpo_advantages, kl_penalty, rloo_advantages,
                                      sequence_kl, shaped_rewards, whiten)
from alignkit.math.losses import grpo_loss, ppo_policy_loss, truncated_is_weights


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
    algo: str = "ppo"                  # an entry of ALGORITHMS: ppo | rloo | grpo
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
    # the models' attention allows (checked at start, as SFT's train.packing; the layout it
    # resolves to is logged and recorded as "packing" in metrics.json: true flat, "shared" with
    # the prompts shared, false padded); the same values within float error.
    packing: bool | str = True
    # Truncated importance sampling (Yao et al. 2025; verl/OpenRLHF "TIS"): weight each token's
    # policy-gradient term by min(pi_old_trainer / pi_sampler, tis_cap), correcting for the
    # sampling engine's numerics (sampling.engine=vllm); 0 = off. verl's default cap is 2.
    tis_cap: float = 0.0

    def __post_init__(self):
        require(self.algo in ALGORITHMS, f"ppo.algo {self.algo!r} is not one of {sorted(ALGORITHMS)}")
        require(self.epochs >= 1, "ppo.epochs must be >= 1")
        require(self.minibatch_size > 0 and self.micro_batch_size > 0,
                "ppo.minibatch_size and ppo.micro_batch_size must be > 0")
        require(self.clip_eps > 0, "ppo.clip_eps must be > 0")
        require(0 <= self.gamma <= 1 and 0 <= self.lam <= 1, "ppo.gamma and ppo.lam must be in [0, 1]")
        require(self.tis_cap >= 0, f"ppo.tis_cap must be >= 0 (0 = off), got {self.tis_cap}")
        require(self.packing in (True, False, "shared"),
                f"ppo.packing must be true, false or \"shared\", got {self.packing!r}")


@dataclass(frozen=True)
class Algorithm:
    uses_value: bool
    # (experience, training scores [B], beta, ppo section, KL estimator, samples per prompt)
    #   -> (advantages [B, R] or [B], returns [B, R] or None)
    advantages: Callable[[Experience, torch.Tensor, float, PPOConfig, str, int], tuple]
    # (new_logps, minibatch, beta, ppo section) -> per-token loss [B, R]
    loss: Callable[[torch.Tensor, Experience, float, PPOConfig], torch.Tensor]
    # How per-token losses become one number (see ``loss_weights``).
    reduction: Literal["token_mean", "sequence_sum", "sequence_mean"]
    # Samples per prompt it needs (a baseline from the prompt's other samples needs 2).
    min_samples_per_prompt: int = 1


def _ppo_advantages(exp, scores, beta, ppo, estimator, k):
    kl = kl_penalty(exp.old_logps, exp.ref_logps, estimator)
    rewards = shaped_rewards(scores, kl, exp.mask, beta)          # Stiennon et al. 2020, eq. 2
    advantages, returns = gae(rewards, exp.values, exp.mask, ppo.gamma, ppo.lam)
    if ppo.whiten_advantages:
        advantages = whiten(advantages, exp.mask)
    return advantages, returns


def _rloo_advantages(exp, scores, beta, ppo, estimator, k):
    # Ahmadian et al. 2024 treat the whole response as one action: its reward carries the KL.
    rewards = scores - beta * sequence_kl(exp.old_logps, exp.ref_logps, exp.mask, estimator)
    return rloo_advantages(rewards, k), None


def _grpo_advantages(exp, scores, beta, ppo, estimator, k):
    return grpo_advantages(scores, k, scale=ppo.grpo_scale), None


def _is_weights(mb, ppo):
    """TIS weights against the log-probs the sampling engine recorded (``ppo.tis_cap``), or None."""
    if not ppo.tis_cap:
        return None
    return truncated_is_weights(mb.old_logps, mb.rollout.logps, ppo.tis_cap)


def _clipped(new_logps, mb, beta, ppo):
    return ppo_policy_loss(new_logps, mb.old_logps, mb.advantages, ppo.clip_eps,
                           is_weights=_is_weights(mb, ppo))


def _grpo(new_logps, mb, beta, ppo):
    return grpo_loss(new_logps, mb.old_logps, mb.ref_logps, mb.advantages, ppo.clip_eps, beta,
                     is_weights=_is_weights(mb, ppo))


ALGORITHMS: dict[str, Algorithm] = {
    "ppo": Algorithm(True, _ppo_advantages, _clipped, "token_mean"),
    "rloo": Algorithm(False, _rloo_advantages, _clipped, "sequence_sum", min_samples_per_prompt=2),
    "grpo": Algorithm(False, _grpo_advantages, _grpo, "sequence_mean", min_samples_per_prompt=2),
}


def loss_weights(reduction: str, mask: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Weights of each token's loss and the normaliser of :func:`alignkit.math.losses.reduce_loss` for ``mask``.

    ``token_mean``: every token of the minibatch counts alike (PPO). ``sequence_sum``: sum over a
    response's tokens, mean over responses: REINFORCE of the sequence log-prob (RLOO).
    ``sequence_mean``: mean over a response's tokens, then over responses (GRPO, eq. 3).
    """
    mask = mask.float()
    if reduction == "sequence_mean":
        mask = mask / mask.sum(-1, keepdim=True).clamp_min(1)
    return mask, float(mask.sum()) if reduction == "token_mean" else float(mask.size(0))

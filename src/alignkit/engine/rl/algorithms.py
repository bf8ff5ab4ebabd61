"""The algorithms of :mod:`alignkit.stages.ppo` (its docstring states each one): PPO (Schulman et
al. 2017), RLOO (Ahmadian et al. 2024) and GRPO (Shao et al. 2024).

A variant is an entry, not a branch: whether it trains a value model, how scores become
advantages, its per-token loss, and how those losses reduce to one number.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Literal

import torch

from alignkit.math.advantages import (gae, grpo_advantages, kl_penalty, rloo_advantages,
                                 shaped_rewards, whiten)
from alignkit.math.losses import grpo_loss, ppo_policy_loss
from alignkit.engine.rl.rollout import Experience

if TYPE_CHECKING:
    from alignkit.stages.ppo import Config, PPOConfig


@dataclass(frozen=True)
class Algorithm:
    uses_value: bool
    # (experience, training scores [B], beta, cfg) -> (advantages [B, R] or [B], returns or None)
    advantages: Callable[[Experience, torch.Tensor, float, Config], tuple]
    # (new_logps, minibatch, beta, ppo cfg) -> per-token loss [B, R]
    loss: Callable[[torch.Tensor, Experience, float, PPOConfig], torch.Tensor]
    # How per-token losses become one number (see ``loss_weights``).
    reduction: Literal["token_mean", "sequence_sum", "sequence_mean"]


def sequence_kl(exp: Experience, estimator: str) -> torch.Tensor:
    """``sum_t KL_t`` per response ``[B]``, each token's KL estimated with ``estimator``."""
    return (kl_penalty(exp.old_logps, exp.ref_logps, estimator) * exp.mask).sum(-1)


def _ppo_advantages(exp, scores, beta, cfg):
    kl = kl_penalty(exp.old_logps, exp.ref_logps, cfg.kl.estimator)
    rewards = shaped_rewards(scores, kl, exp.mask, beta)          # Stiennon et al. 2020, eq. 2
    advantages, returns = gae(rewards, exp.values, exp.mask, cfg.ppo.gamma, cfg.ppo.lam)
    if cfg.ppo.whiten_advantages:
        advantages = whiten(advantages, exp.mask)
    return advantages, returns


def _rloo_advantages(exp, scores, beta, cfg):
    # Ahmadian et al. 2024 treat the whole response as one action: its reward carries the KL.
    rewards = scores - beta * sequence_kl(exp, cfg.kl.estimator)
    return rloo_advantages(rewards, cfg.rollout.samples_per_prompt), None


def _grpo_advantages(exp, scores, beta, cfg):
    return grpo_advantages(scores, cfg.rollout.samples_per_prompt, scale=cfg.ppo.grpo_scale), None


def _clipped(new_logps, mb, beta, ppo):
    return ppo_policy_loss(new_logps, mb.old_logps, mb.advantages, ppo.clip_eps)


def _grpo(new_logps, mb, beta, ppo):
    return grpo_loss(new_logps, mb.old_logps, mb.ref_logps, mb.advantages, ppo.clip_eps, beta)


ALGORITHMS: dict[str, Algorithm] = {
    "ppo": Algorithm(True, _ppo_advantages, _clipped, "token_mean"),
    "rloo": Algorithm(False, _rloo_advantages, _clipped, "sequence_sum"),
    "grpo": Algorithm(False, _grpo_advantages, _grpo, "sequence_mean"),
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

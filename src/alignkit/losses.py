"""Loss functions: pure functions of tensors.

Every loss here takes log-probabilities, rewards, values and masks -- never a model, trainer or
config -- and returns *unreduced* values (per token or per sequence). One function,
:func:`reduce_loss`, turns them into the scalar that is back-propagated, so gradient accumulation
and data-parallel scaling live in exactly one place.

Shapes: ``B`` batch, ``T`` tokens. ``*_logps`` always hold log-probabilities.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

LossFn = Callable[..., torch.Tensor]
LOSSES: dict[str, LossFn] = {}


def register(name: str) -> Callable[[LossFn], LossFn]:
    """Register a loss under ``name``; a variant is one function and one registry entry."""

    def wrap(fn: LossFn) -> LossFn:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} registered twice")
        LOSSES[name] = fn
        return fn

    return wrap


def get_loss(name: str) -> LossFn:
    try:
        return LOSSES[name]
    except KeyError:
        raise KeyError(f"unknown loss {name!r}; known: {sorted(LOSSES)}") from None


def reduce_loss(values: torch.Tensor, weights: torch.Tensor, global_weight: float | torch.Tensor,
                world_size: int = 1) -> torch.Tensor:
    """The one reduction: ``world_size * sum(values * weights) / global_weight``.

    ``global_weight`` is the sum of ``weights`` over the *whole* optimiser step: every
    accumulation micro-batch on every data-parallel rank. Data-parallel back-ends average
    gradients over ranks, hence the ``world_size`` factor. With this, one process with batch 8,
    2 micro-batches of 4, and 2 ranks of 4 give the same gradient (up to summation order).

    values, weights: same shape (``[B, T]`` per token or ``[B]`` per sequence).
    """
    total = (values * weights).sum()
    return total * (world_size / global_weight)


@register("sft")
def sft_loss(policy_logps: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood per token: ``-log pi(y_t | x, y_<t)``.

    policy_logps: ``[B, T]`` log-probs of the target tokens; masking happens in the reduction.
    Returns ``[B, T]``.
    """
    return -policy_logps


@register("bradley_terry")
def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                       margin: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Bradley-Terry reward-model loss, per pair.

    ``P(y_w > y_l | x) = sigmoid(r(x, y_w) - r(x, y_l))`` (Bradley & Terry 1952; Ouyang et al.
    2022, eq. 1), so ``loss = -log sigmoid(r_w - r_l - m)``, with an optional margin ``m``
    (Touvron et al. 2023, Llama 2, eq. 2).

    chosen_rewards, rejected_rewards: ``[B]``. margin: scalar or ``[B]``. Returns ``[B]``.
    """
    return -F.logsigmoid(chosen_rewards - rejected_rewards - margin)

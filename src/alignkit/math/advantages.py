"""Advantages, returns, reward shaping and KL control for on-policy RL (PPO, RLOO, GRPO).

Pure functions of tensors, like :mod:`alignkit.math.losses`; the KL controllers are the only state and
they serialise to a plain dict for resume.

Shapes: ``B`` batch (rows), ``T`` response tokens, ``k`` samples per prompt. ``mask`` is 1 on
real response tokens and 0 on padding; each row's real tokens form one contiguous block (left or
right padding), and the row ends at its last real token.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = [
    "KL_ESTIMATORS", "AdaptiveKLController", "FixedKLController", "gae", "grpo_advantages",
    "kl_penalty", "rloo_advantages", "sequence_kl", "shaped_rewards", "whiten",
]


@torch.no_grad()
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16), by a reverse scan.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` and
    ``A_t = sum_l (gamma * lam)^l delta_{t+l} = delta_t + gamma * lam * A_{t+1}``;
    the return (value target) is ``R_t = A_t + V_t``.

    The episode ends at the last real token: ``V`` and ``A`` after it are 0 (no bootstrapping
    past the end of the response), and rewards/values on padding are ignored, whatever they hold.

    rewards, values, mask: ``[B, T]``. Returns ``(advantages, returns)``, both ``[B, T]``,
    detached, and 0 where ``mask`` is 0.
    """
    mask = mask.to(values.dtype)
    rewards = rewards.detach() * mask
    values = values.detach() * mask
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        # Multiplying by the mask zeroes padding, so the recursion restarts at the last real token.
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        next_value = values[:, t]
        advantages[:, t] = next_advantage
    return advantages, (advantages + values) * mask


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
           eps: float = 1e-8) -> torch.Tensor:
    """Normalise ``x`` to zero mean and unit variance over the positions where ``mask`` is 1.

    ``(x - mean) / sqrt(var + eps)`` with the masked mean and the *unbiased* masked variance
    ``sum(mask * (x - mean)^2) / (n - 1)``, ``n = sum(mask)`` (as TRL's ``masked_whiten``). With
    ``shift_mean=False`` the mean is added back: only the scale changes (used for rewards, whose
    sign carries meaning). Statistics are per call: for data-parallel runs, whiten the gathered
    batch.

    x, mask: same shape. Returns that shape, 0 where ``mask`` is 0. Raises if ``n < 2``.
    """
    mask = mask.to(x.dtype)
    n = mask.sum()
    if n < 2:
        raise ValueError("whiten needs at least 2 unmasked values for an unbiased variance")
    mean = (x * mask).sum() / n
    var = (((x - mean) ** 2) * mask).sum() / (n - 1)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


# KL estimators of Schulman (2020), "Approximating KL divergence", with samples y ~ pi and
# log r = log ref(y) - log pi(y). k1 is unbiased, k2 biased with low variance, k3 unbiased,
# non-negative and low-variance.
def _k1(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    return logps - ref_logps  # -log r


def _k2(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    return 0.5 * (logps - ref_logps) ** 2  # (log r)^2 / 2


def _k3(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    log_r = ref_logps - logps
    # (r - 1) - log r, with expm1 so that r close to 1 keeps its precision.
    return torch.expm1(log_r) - log_r


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "k1": _k1, "k2": _k2, "k3": _k3,
}


def kl_penalty(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of ``KL(pi || ref)`` from tokens sampled from ``pi`` (Schulman 2020).

    With ``log r = ref_logps - logps``:
    ``k1 = -log r``, ``k2 = (log r)^2 / 2``, ``k3 = (r - 1) - log r``.
    ``E_pi[k1] = E_pi[k3] = KL(pi || ref)``; k2 is biased but close for nearby distributions.

    logps, ref_logps: ``[B, T]`` log-probs of the sampled tokens. Returns ``[B, T]``.
    """
    try:
        fn = KL_ESTIMATORS[estimator]
    except KeyError:
        raise KeyError(f"unknown KL estimator {estimator!r}; "
                       f"known: {sorted(KL_ESTIMATORS)}") from None
    return fn(logps, ref_logps)


def sequence_kl(logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor,
                estimator: str) -> torch.Tensor:
    """``sum_t KL_t`` per response ``[B]``: each token's :func:`kl_penalty` with ``estimator``,
    summed over the response's real tokens (``mask`` ``[B, T]``). With ``k1`` this is the
    sequence-level ``log pi(y|x) - log ref(y|x)``, an unbiased estimate of the sequence KL."""
    return (kl_penalty(logps, ref_logps, estimator) * mask).sum(-1)

def _last_token_index(mask: torch.Tensor) -> torch.Tensor:
    if not bool(mask.bool().any(dim=-1).all()):
        raise ValueError("every row needs at least one real token to carry its score")
    T = mask.shape[-1]
    # Index of the last 1 in each row: the first 1 of the flipped row, counted from the end.
    return T - 1 - mask.bool().flip(-1).int().argmax(dim=-1)


def shaped_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor,
                   beta: float | torch.Tensor) -> torch.Tensor:
    """KL-shaped per-token reward (Ziegler et al. 2019, §2.2; Stiennon et al. 2020, eq. 2).

    ``R(x, y) = r(x, y) - beta * log(pi(y|x) / ref(y|x))``, spread over tokens: every real token
    gets ``-beta * kl_t`` and the last real token also gets the sequence score ``r(x, y)``.

    scores: ``[B]``. kl: ``[B, T]`` per-token KL estimates (see :func:`kl_penalty`).
    mask: ``[B, T]``. Returns ``[B, T]``, 0 where ``mask`` is 0.
    """
    mask = mask.to(kl.dtype)
    rewards = -beta * kl * mask
    last = _last_token_index(mask)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] = rewards[rows, last] + scores.to(rewards.dtype)
    return rewards


def _groups(scores: torch.Tensor, k: int) -> torch.Tensor:
    if scores.dim() != 1 or scores.shape[0] % k != 0:
        raise ValueError(f"scores must be [B] with B a multiple of k={k}; "
                         f"got {tuple(scores.shape)}")
    return scores.view(-1, k)


def rloo_advantages(scores: torch.Tensor, k: int) -> torch.Tensor:
    """REINFORCE leave-one-out advantages (Ahmadian et al. 2024, eq. 5; Kool et al. 2019).

    ``A_i = r_i - 1/(k-1) * sum_{j != i} r_j``, over the ``k`` samples of the same prompt; this
    equals ``k/(k-1) * (r_i - mean_j r_j)``, so each group's advantages sum to 0.

    scores: ``[B]``, rows grouped as consecutive blocks of ``k`` samples of one prompt
    (``B = n_prompts * k``). Returns ``[B]``.
    """
    if k < 2:
        raise ValueError("rloo_advantages needs k >= 2 samples per prompt")
    r = _groups(scores, k)
    baseline = (r.sum(dim=1, keepdim=True) - r) / (k - 1)
    return (r - baseline).reshape(-1)


def grpo_advantages(scores: torch.Tensor, k: int, eps: float = 1e-4,
                    scale: bool = True) -> torch.Tensor:
    """Group-relative advantages of GRPO (Shao et al. 2024, DeepSeekMath, §4.1.2).

    ``A_i = (r_i - mean(r_group)) / (std(r_group) + eps)`` with the unbiased standard deviation
    (as TRL and OpenRLHF). ``scale=False`` keeps only ``r_i - mean(r_group)`` (Liu et al. 2025,
    "Understanding R1-Zero-like training", Dr. GRPO), which avoids up-weighting prompts that are
    nearly always right or wrong. A group of equal scores gets advantage 0.

    scores: ``[B]``, consecutive blocks of ``k`` samples per prompt. Returns ``[B]``.
    """
    r = _groups(scores, k)
    centred = r - r.mean(dim=1, keepdim=True)
    if scale:
        if k < 2:
            raise ValueError("grpo_advantages with scale=True needs k >= 2")
        centred = centred / (r.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


class FixedKLController:
    """A constant KL coefficient ``beta``; same interface as :class:`AdaptiveKLController`."""

    def __init__(self, beta: float):
        self.value = float(beta)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Proportional controller steering the observed KL to ``target`` (Ziegler et al. 2019, §2.2).

    ``e = clip(KL / target - 1, -0.2, 0.2)``; ``beta <- beta * (1 + e * n_steps / horizon)``,
    where ``n_steps`` counts the samples (or steps) since the last update and ``horizon`` sets how
    fast ``beta`` moves.
    """

    def __init__(self, init_beta: float, target: float, horizon: float):
        if target <= 0 or horizon <= 0:
            raise ValueError("target and horizon must be > 0")
        self.value = float(init_beta)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> float:
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])

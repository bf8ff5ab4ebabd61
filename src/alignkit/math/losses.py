"""Loss functions: pure functions of tensors.

Every loss here takes log-probabilities, rewards, values and masks -- never a model, trainer or
config -- and returns *unreduced* values (per token or per sequence). One function,
:func:`reduce_loss`, turns them into the scalar that is back-propagated, so gradient accumulation
and data-parallel scaling live in exactly one place.

Shapes: ``B`` batch, ``T`` tokens. ``*_logps`` always hold log-probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from alignkit.math.advantages import kl_penalty

LossFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class DAPNeeds:
    """What a direct-alignment (DAP) loss needs from its data, declared where it is registered.

    ``paired``: chosen/rejected pairs (else unpaired completions labelled desirable or not, as KTO
    reads them). ``reference``: log-probs of a frozen reference model (computed once, before
    training); reference-free losses never load one. The engine calls the loss with keyword
    arguments by name from what a batch provides (``alignkit.engine.dap_loss``): paired,
    ``policy_chosen_logps``/``policy_rejected_logps`` (summed), ``chosen_lengths``/
    ``rejected_lengths`` and ``ref_chosen_logps``/``ref_rejected_logps``; unpaired,
    ``policy_logps``, ``ref_logps``, ``is_desirable`` and ``kl_ref_point``; and the
    hyperparameters of the loss config under their own names (``beta``, ``gamma``, ...)."""

    paired: bool = True
    reference: bool = True


LOSSES: dict[str, LossFn] = {}         # every loss, by name
DAP_LOSSES: dict[str, DAPNeeds] = {}   # the direct-alignment losses among them, and their needs


def register(name: str, dap: DAPNeeds | None = None) -> Callable[[LossFn], LossFn]:
    """Register a loss under ``name``; a variant is one function and one registry entry. ``dap``:
    a direct-alignment loss that the ``dpo`` stage trains with, and what it needs."""

    def wrap(fn: LossFn) -> LossFn:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} registered twice")
        LOSSES[name] = fn
        if dap is not None:
            DAP_LOSSES[name] = dap
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


# ---------------------------------------------------------------------------------------------
# Direct alignment from preferences (DAP). Inputs are *summed* sequence log-probs ``[B]`` unless a
# docstring says otherwise; every loss returns ``[B]`` per pair (or per example for KTO).
# ---------------------------------------------------------------------------------------------

def preference_log_ratio(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                         ref_chosen_logps: torch.Tensor,
                         ref_rejected_logps: torch.Tensor) -> torch.Tensor:
    """``h = log[pi(y_w) ref(y_l) / (pi(y_l) ref(y_w))]`` (Azar et al. 2023, h_pi of eq. 17).

    ``= (pi_w - ref_w) - (pi_l - ref_l)`` in log space. All inputs ``[B]``; returns ``[B]``.
    """
    return (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)


def dpo_implicit_rewards(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                         ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
                         beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DPO's implicit rewards ``r(x, y) = beta * log(pi(y|x) / ref(y|x))`` (Rafailov et al. 2023,
    eq. 5, without the prompt-only ``beta log Z(x)``), for metrics: reward accuracy and margins.

    All inputs ``[B]``. Returns ``(chosen_rewards, rejected_rewards)``, each ``[B]``, detached.
    """
    chosen = beta * (policy_chosen_logps - ref_chosen_logps)
    rejected = beta * (policy_rejected_logps - ref_rejected_logps)
    return chosen.detach(), rejected.detach()


@register("dpo", dap=DAPNeeds())
def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
             beta: float) -> torch.Tensor:
    """Direct preference optimisation (Rafailov et al. 2023, eq. 7).

    ``L = -log sigmoid(beta * [(pi_w - ref_w) - (pi_l - ref_l)])``, with ``pi_w = log pi(y_w|x)``
    etc. summed over the response tokens.

    All log-prob inputs ``[B]``. Returns ``[B]``.
    """
    h = preference_log_ratio(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                             ref_rejected_logps)
    return -F.logsigmoid(beta * h)


@register("cdpo", dap=DAPNeeds())
def cdpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
              ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float,
              label_smoothing: float) -> torch.Tensor:
    """Conservative DPO: DPO with labels flipped with probability ``eps`` (Mitchell 2023, "A note
    on DPO with noisy preferences & relationship to IPO", the cDPO loss).

    ``L = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``, ``h`` as in
    :func:`preference_log_ratio`. ``eps = label_smoothing`` in ``[0, 0.5)``; ``eps = 0`` is DPO.

    All log-prob inputs ``[B]``. Returns ``[B]``.
    """
    h = preference_log_ratio(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                             ref_rejected_logps)
    eps = label_smoothing
    return -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)


@register("ipo", dap=DAPNeeds())
def ipo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
             beta: float) -> torch.Tensor:
    """Identity preference optimisation (Azar et al. 2023, eq. 17).

    ``L = (h - 1 / (2 tau))^2``, ``h`` as in :func:`preference_log_ratio`; ``tau = beta`` (the
    paper's regularisation strength, named ``beta`` here so every DAP loss is called alike).
    The paper writes ``h`` with sequence log-probs (sums); some implementations pass per-token
    averages instead, which changes the scale of ``h`` and therefore the meaning of ``tau``.
    This function takes whatever log-probs it is given.

    All log-prob inputs ``[B]``. Returns ``[B]``.
    """
    h = preference_log_ratio(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                             ref_rejected_logps)
    return (h - 1 / (2 * beta)) ** 2


@register("hinge", dap=DAPNeeds())
def hinge_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
               ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
               beta: float) -> torch.Tensor:
    """Hinge loss: SLiC-HF's calibration loss (Zhao et al. 2023, L_cal) in the reference-normalised
    form of RSO (Liu et al. 2024, "Statistical rejection sampling improves preference
    optimization", the hinge-norm loss).

    ``L = max(0, 1 - beta h)``, ``h`` as in :func:`preference_log_ratio` (margin ``delta = 1/beta``
    in SLiC's notation).

    All log-prob inputs ``[B]``. Returns ``[B]``.
    """
    h = preference_log_ratio(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                             ref_rejected_logps)
    return torch.relu(1 - beta * h)


def kto_reference_point(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO reference point ``z0 = max(0, mean_j [log pi(y_j|x_i) - log ref(y_j|x_i)])``
    (Ethayarajh et al. 2024, eq. 8 and §4.1), a biased batch estimate of ``KL(pi || ref)``.

    The pairs ``(x_i, y_j)`` are mismatched on purpose: each prompt with another example's
    completion, so the estimate does not reward the policy for its own completions. ``z0`` is not
    back-propagated (detached). In data-parallel runs the mean should be taken over all ranks.

    policy_kl_logps, ref_kl_logps: ``[B]`` summed log-probs of the mismatched completions.
    Returns a scalar tensor.
    """
    return (policy_kl_logps - ref_kl_logps).mean().clamp(min=0).detach()


@register("kto", dap=DAPNeeds(paired=False))
def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, is_desirable: torch.Tensor,
             kl_ref_point: torch.Tensor | float, beta: float, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> torch.Tensor:
    """Kahneman-Tversky optimisation on unpaired feedback (Ethayarajh et al. 2024, eq. 8).

    ``r = log pi(y|x) - log ref(y|x)``, ``z0 = kl_ref_point`` (see :func:`kto_reference_point`);
    value ``v = lambda_D sigmoid(beta (r - z0))`` if ``y`` is desirable, else
    ``lambda_U sigmoid(beta (z0 - r))``; ``L = lambda_y - v``, i.e.
    desirable: ``lambda_D (1 - sigmoid(beta (r - z0)))``,
    undesirable: ``lambda_U (1 - sigmoid(beta (z0 - r)))``.

    policy_logps, ref_logps: ``[B]`` summed log-probs. is_desirable: ``[B]`` bool.
    kl_ref_point: scalar (detached here too: the paper does not back-propagate through ``z0``).
    Returns ``[B]``.
    """
    z0 = torch.as_tensor(kl_ref_point, dtype=policy_logps.dtype, device=policy_logps.device)
    log_ratio = policy_logps - ref_logps
    margin = beta * (log_ratio - z0.detach())
    # 1 - sigmoid(m) = sigmoid(-m): one form for both branches, no cancellation.
    desirable = desirable_weight * torch.sigmoid(-margin)
    undesirable = undesirable_weight * torch.sigmoid(margin)
    return torch.where(is_desirable.bool(), desirable, undesirable)


@register("simpo", dap=DAPNeeds(reference=False))
def simpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
               chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor, beta: float,
               gamma: float) -> torch.Tensor:
    """Simple preference optimisation, reference-free (Meng et al. 2024, eq. 6).

    ``L = -log sigmoid(beta / |y_w| * log pi(y_w|x) - beta / |y_l| * log pi(y_l|x) - gamma)``:
    length-normalised sequence log-probs as the implicit reward, target margin ``gamma``.

    policy_chosen_logps, policy_rejected_logps: ``[B]`` *summed* log-probs.
    chosen_lengths, rejected_lengths: ``[B]`` response token counts. Returns ``[B]``.
    """
    chosen = beta * policy_chosen_logps / chosen_lengths
    rejected = beta * policy_rejected_logps / rejected_lengths
    return -F.logsigmoid(chosen - rejected - gamma)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, accurate everywhere (Maechler 2012, "Accurately
    computing log(1 - exp(-|a|))").

    ``log(-expm1(x))`` for ``x > -log 2``, ``log1p(-exp(x))`` otherwise. ``x`` is clamped to
    ``<= -tiny`` (the smallest normal number of its dtype), so ``x = 0`` gives a large finite
    value with zero gradient instead of ``-inf``/NaN. Same shape as ``x``.
    """
    x = x.clamp(max=-torch.finfo(x.dtype).tiny)
    near_zero = x > -0.6931471805599453
    # Each branch sees only inputs in its own safe range, so the unused branch of the `where`
    # cannot produce inf and poison the gradient with 0 * inf = NaN.
    small = torch.log(-torch.expm1(torch.where(near_zero, x, -1.0)))
    large = torch.log1p(-torch.exp(torch.where(near_zero, -1.0, x)))
    return torch.where(near_zero, small, large)


def orpo_log_odds_ratio(policy_chosen_logps: torch.Tensor,
                        policy_rejected_logps: torch.Tensor) -> torch.Tensor:
    """``log(odds(y_w) / odds(y_l))`` of ORPO (Hong et al. 2024, eq. 7), with
    ``log odds(y) = log p - log(1 - p)`` and ``log p`` the mean per-token log-prob.

    Inputs ``[B]`` mean per-token log-probs (``<= 0``). Returns ``[B]`` (also a useful metric).
    """
    chosen = policy_chosen_logps - log1mexp(policy_chosen_logps)
    rejected = policy_rejected_logps - log1mexp(policy_rejected_logps)
    return chosen - rejected


@register("orpo", dap=DAPNeeds(reference=False))
def orpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
              chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor,
              orpo_lambda: float) -> torch.Tensor:
    """Odds-ratio preference optimisation, reference-free (Hong et al. 2024, eq. 6-7).

    ``L = L_SFT + lambda * L_OR``, ``L_OR = -log sigmoid(log(odds(y_w) / odds(y_l)))``,
    ``odds(y) = p / (1 - p)`` with ``p = exp(mean_t log pi(y_t | x, y_<t))`` (length-normalised,
    as in the paper); ``L_SFT`` is the chosen response's mean per-token NLL. ``log(1 - p)`` uses
    :func:`log1mexp`, which stays accurate as ``log p -> 0``.

    policy_chosen_logps, policy_rejected_logps: ``[B]`` *summed* log-probs.
    chosen_lengths, rejected_lengths: ``[B]`` response token counts. Returns ``[B]``.
    """
    chosen = policy_chosen_logps / chosen_lengths
    rejected = policy_rejected_logps / rejected_lengths
    log_odds = orpo_log_odds_ratio(chosen, rejected)
    return -chosen - orpo_lambda * F.logsigmoid(log_odds)


# ---------------------------------------------------------------------------------------------
# Policy-gradient losses. Per token: inputs and outputs ``[B, T]``; masking (and the choice of
# token-level vs sequence-level averaging) happens in ``reduce_loss`` through the weights.
# ---------------------------------------------------------------------------------------------

def _per_token(advantages: torch.Tensor, logps: torch.Tensor) -> torch.Tensor:
    # A per-sequence advantage [B] applies to every token of its row; without this, [B] would
    # broadcast against the *token* axis of [B, T].
    return advantages.unsqueeze(-1) if advantages.dim() == logps.dim() - 1 else advantages


def truncated_is_weights(old_logps: torch.Tensor, sampler_logps: torch.Tensor,
                         cap: float) -> torch.Tensor:
    """Truncated importance-sampling weights of tokens drawn by an inference engine whose
    numerics differ from the trainer's (Yao, Liu et al. 2025, "Your efficient RL framework
    secretly brings you off-policy RL training"; verl's and OpenRLHF's "TIS"), per token:

    ``w_t = min(pi_old(y_t) / pi_sampler(y_t), C) = min(exp(old_logps - sampler_logps), C)``,

    ``pi_old`` the trainer's policy before the update (its recomputed log-probs), ``pi_sampler``
    what the engine drew the token from. The policy gradient then reads
    ``E_{y ~ pi_sampler}[w_t * grad min(rho_t A_t, clip(rho_t) A_t)]``, ``rho_t = pi / pi_old``:
    an unbiased estimate of the on-policy gradient but for the cap ``C``, which bounds the
    variance a rare token the engine under-weights would bring. Detached: a weight, not a
    function of the parameters. Shapes ``[B, T]``; ``cap > 0``.
    """
    if not cap > 0:
        raise ValueError(f"the truncation cap must be > 0, got {cap}")
    return torch.exp(old_logps - sampler_logps).clamp(max=cap).detach()


@register("ppo_policy")
def ppo_policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                    clip_eps: float, dual_clip: float | None = None,
                    is_weights: torch.Tensor | None = None) -> torch.Tensor:
    """PPO clipped surrogate, negated to a loss (Schulman et al. 2017, eq. 7), per token.

    ``rho = exp(logps - old_logps)``;
    ``L = max(-A rho, -A clip(rho, 1 - eps, 1 + eps))``.
    With ``dual_clip = c > 1`` (Ye et al. 2020, "Mastering complex control in MOBA games"),
    tokens with ``A < 0`` are capped at ``L = min(L, -c A)`` so a huge ratio cannot blow up.
    ``is_weights`` ``[B, T]`` (e.g. :func:`truncated_is_weights`): ``L_t`` is multiplied by them,
    the correction for tokens sampled by another engine than the trainer.

    logps, old_logps: ``[B, T]``. advantages: ``[B, T]``, or ``[B]`` per sequence (applied to all
    tokens). Returns ``[B, T]``. See :func:`ppo_clipped` for the clip-fraction metric.
    """
    advantages = _per_token(advantages, logps)
    ratio = torch.exp(logps - old_logps)
    loss = torch.maximum(-advantages * ratio,
                         -advantages * ratio.clamp(1 - clip_eps, 1 + clip_eps))
    if dual_clip is not None:
        if dual_clip <= 1:
            raise ValueError("dual_clip must be > 1")
        loss = torch.where(advantages < 0, torch.minimum(loss, -dual_clip * advantages), loss)
    return loss if is_weights is None else loss * is_weights


def ppo_clipped(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                clip_eps: float) -> torch.Tensor:
    """Per-token indicator (float 0/1) that the clip of :func:`ppo_policy_loss` binds: the clipped
    term is strictly the larger, so the token contributes no gradient. Reduce it with the loss
    mask to get the usual ``clipfrac`` metric.

    Shapes as :func:`ppo_policy_loss`. Returns ``[B, T]``, detached.
    """
    advantages = _per_token(advantages, logps).detach()
    ratio = torch.exp(logps - old_logps).detach()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_eps, 1 + clip_eps)
    return (clipped > unclipped).to(logps.dtype)


@register("ppo_value")
def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                   clip_eps: float | None) -> torch.Tensor:
    """Clipped value loss of PPO implementations (Schulman et al. 2017 baselines; Huang et al.
    2022, "The 37 implementation details of PPO", detail 9), per token.

    ``V_clip = clip(V, V_old - eps, V_old + eps)``;
    ``L = 0.5 * max((V - R)^2, (V_clip - R)^2)``. ``clip_eps=None``: ``0.5 (V - R)^2``.

    values, old_values, returns: ``[B, T]``. Returns ``[B, T]``.
    """
    unclipped = (values - returns) ** 2
    if clip_eps is None:
        return 0.5 * unclipped
    values_clipped = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
    return 0.5 * torch.maximum(unclipped, (values_clipped - returns) ** 2)


@register("grpo")
def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor,
              advantages: torch.Tensor, clip_eps: float, beta: float,
              is_weights: torch.Tensor | None = None) -> torch.Tensor:
    """GRPO per-token loss (Shao et al. 2024, DeepSeekMath, eq. 3-4).

    ``L_t = max(-A rho_t, -A clip(rho_t, 1 - eps, 1 + eps)) + beta * D_t``, with
    ``rho_t = exp(logps - old_logps)`` and the KL term of eq. 4 (Schulman 2020's k3)
    ``D_t = ref/pi - log(ref/pi) - 1`` evaluated at the sampled token.

    The paper's ``1/G sum_i 1/|o_i| sum_t`` is a reduction: weights ``mask / |o_i|`` and
    ``global_weight = G`` in :func:`reduce_loss` (or weights ``mask`` for token-level averaging).

    ``is_weights`` multiply the policy-gradient term only (:func:`truncated_is_weights`), not
    the KL term, which the trainer computes on its own log-probs.

    logps, old_logps, ref_logps: ``[B, T]``. advantages: ``[B]`` group-normalised (see
    :func:`alignkit.math.advantages.grpo_advantages`) or ``[B, T]``. Returns ``[B, T]``.
    """
    surrogate = ppo_policy_loss(logps, old_logps, advantages, clip_eps, is_weights=is_weights)
    return surrogate + beta * kl_penalty(logps, ref_logps, "k3")

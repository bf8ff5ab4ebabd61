"""The language-modelling objective of a causal LM on a batch: SFT, pretraining, ReST's Improve
(plain or reward-weighted behaviour cloning) and the judge LM all train on it.

``loss_fn(model, batch) -> LossOutput`` for :func:`alignkit.engine.training.train`: the per-token
NLL of the labelled (completion) tokens (:func:`alignkit.math.losses.sft_loss`), unreduced; the
training loop's one reduction divides by the step's target-token count (``n_targets``).
"""

from __future__ import annotations

from functools import partial

import torch

from alignkit.engine.forward import labelled_logps
from alignkit.engine.training import LossOutput
from alignkit.math.logprobs import IGNORE_INDEX
from alignkit.math.losses import sft_loss


def causal_lm_loss(model, batch, token_weights: torch.Tensor | None = None,
                   last_rows_only: bool = False) -> LossOutput:
    """Per-token NLL of the labelled (completion) tokens; prompt and padding weigh 0.

    The values cover the positions that have a target (``labelled_logps``), not every position;
    ``token_weights`` ``[R, T-1]`` (aligned with ``labels[:, 1:]``) scale each token's weight;
    ``last_rows_only``: see ``labelled_logps`` and :func:`loss_for`."""
    logps, targets, positions = labelled_logps(model, batch, last_rows_only)
    weights = (targets != IGNORE_INDEX).float()
    if token_weights is not None:
        weights = weights * token_weights[:, positions]
    return LossOutput(values=sft_loss(logps), weights=weights)


def weighted_causal_lm_loss(model, batch, last_rows_only: bool = False) -> LossOutput:
    """:func:`causal_lm_loss` with each sequence's tokens weighted by ``batch["weight"]`` [B].

    Weight 1 is plain behaviour cloning; the normalised reward gives reward-weighted BC (Peters &
    Schaal 2007's reward-weighted regression with the reward as the weight). The normaliser stays
    the token count (``n_targets``), so the loss is ``sum_i w_i NLL_i / tokens`` and zero weights
    are safe.
    """
    weight = batch["weight"].float()
    if "sequence_index" in batch:  # packed: each token takes its sequence's weight (filler: 0)
        owner = batch["sequence_index"][:, 1:]
        per_token = torch.where(owner >= 0, weight[owner.clamp_min(0)], 0.0)
    else:
        per_token = weight[:, None].expand(-1, batch["labels"].size(1) - 1)
    return causal_lm_loss(model, batch, per_token, last_rows_only)


def collate_weighted(examples: list[dict], pad_id: int, pack: str | None = None) -> dict:
    """LM rows (padded, or packed given a layout) and each example's ``weight`` ``[B]``."""
    from alignkit.data.collate import collate_rows

    batch = collate_rows(examples, pad_id, pack)
    batch["weight"] = torch.tensor([e["weight"] for e in examples], dtype=torch.float32)
    return batch


def supports_last_rows_only(model, pack: str | None) -> bool:
    """Whether ``labelled_logps`` gives the same log-probs with ``last_rows_only`` on ``model``
    (``forward.rows_only_agrees``), checked on two random sequences with targets on their second
    half, in layout ``pack`` (right-padded for None)."""
    from alignkit.data.collate import collate_rows, to_device
    from alignkit.engine.forward import probe_sequences, rows_only_agrees

    rows = [{"input_ids": s, "labels": [IGNORE_INDEX] * (len(s) // 2) + s[len(s) // 2:]}
            for s in probe_sequences(model, (7, 10))]
    batch = to_device(collate_rows(rows, 0, pack), next(model.parameters()).device)
    return rows_only_agrees(model, lambda only: labelled_logps(model, batch, only)[0])


def loss_for(model, pack: str | None, loss=None):
    """``loss`` (default :func:`causal_lm_loss`; or :func:`weighted_causal_lm_loss`) for
    ``model``, with its last MLP at the targets only where that is checked to give the same
    values (:func:`supports_last_rows_only`)."""
    return partial(loss or causal_lm_loss, last_rows_only=supports_last_rows_only(model, pack))


def n_targets(example: dict) -> int:
    """The loss terms an example contributes: its target tokens (the loop's ``weight_of``)."""
    return sum(1 for t in example["labels"][1:] if t != IGNORE_INDEX)


@torch.no_grad()
def eval_loss(model, examples: list[dict], pad_id: int, batch_size: int = 32) -> dict:
    """Mean NLL per target token over ``examples`` and its perplexity."""
    from alignkit.data.collate import collate_sft, to_device

    device = next(model.parameters()).device
    total, count = 0.0, 0
    for s in range(0, len(examples), batch_size):
        batch = to_device(collate_sft(examples[s:s + batch_size], pad_id), device)
        out = causal_lm_loss(model, batch)
        total += float((out.values * out.weights).sum())
        count += int(out.weights.sum())
    nll = total / max(count, 1)
    return {"loss": nll, "perplexity": float(torch.exp(torch.tensor(nll)))}

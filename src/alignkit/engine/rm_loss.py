"""The Bradley-Terry objective of a reward model on a batch of preference pairs.

Chosen and rejected sequences go through one forward pass (2B rows; packed: each pair's prompt
once, and the last layer's MLP only at the scored tokens); the loss is
``-log sigmoid(r_w - r_l - margin)`` per pair (:func:`alignkit.math.losses.bradley_terry_loss`).
"""

from __future__ import annotations

import torch

from alignkit.engine.forward import last_mlp, packed_inputs, rows_only
from alignkit.engine.training import LossOutput
from alignkit.math.losses import bradley_terry_loss


def pair_rewards(model, batch, last_rows_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of the chosen (first half) and rejected (second half) sequences of one forward
    pass over a padded or a packed batch (``last_rows_only``: see ``packed_scores``)."""
    if "sequence_index" in batch:
        scores = packed_scores(model, batch, last_rows_only)
    else:
        scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       use_cache=False).logits[:, 0].float()
    half = scores.shape[0] // 2
    return scores[:half], scores[half:]


def score_head(model) -> torch.nn.Module | None:
    """The scalar head of a sequence-classification model (``score`` in transformers' decoder
    classes; through PEFT, its outermost wrapper), or None."""
    return next((m for name, m in model.named_modules() if name.split(".")[-1] == "score"), None)


def packed_scores(model, batch, last_rows_only: bool = False) -> torch.Tensor:
    """Score ``[N]`` of every sequence of a packed batch: the head's output at each sequence's
    last token, read by a hook (the model's own pooling picks one token per row).
    ``last_rows_only``: the last layer's MLP runs at those tokens only (``rows_only``; check a
    model with ``supports_last_rows_only`` first)."""
    head = score_head(model)
    owner = batch["sequence_index"].reshape(-1)
    keep = owner >= 0
    where = torch.arange(owner.numel(), device=owner.device)
    last = torch.full((int(batch["num_sequences"]),), -1, dtype=torch.long, device=owner.device)
    last = last.scatter_reduce(0, owner[keep], where[keep], reduce="amax")
    per_token = []
    hook = head.register_forward_hook(lambda mod, args, out: per_token.append(out))
    try:
        with rows_only(last_mlp(model) if last_rows_only else None, last):
            model(**packed_inputs(batch))
    finally:
        hook.remove()
    return per_token[0].reshape(owner.numel(), -1)[last, 0].float()


def supports_last_rows_only(model, pack: str) -> bool:
    """Whether ``packed_scores`` gives the same scores with ``last_rows_only`` on ``model``
    (``forward.rows_only_agrees``), checked on two random pairs in layout ``pack``."""
    from alignkit.data.collate import collate_preference, to_device
    from alignkit.engine.forward import probe_sequences, rows_only_agrees

    ids = probe_sequences(model, (6, 9, 5, 7))
    pairs = [{"chosen_input_ids": a, "chosen_labels": a, "rejected_input_ids": b,
              "rejected_labels": b} for a, b in (ids[:2], ids[2:])]
    batch = to_device(collate_preference(pairs, 0, pack), next(model.parameters()).device)
    return rows_only_agrees(model, lambda only: packed_scores(model, batch, only))


def make_loss(margin: float, last_rows_only: bool = False):
    def loss_fn(model, batch) -> LossOutput:
        chosen, rejected = pair_rewards(model, batch, last_rows_only)
        values = bradley_terry_loss(chosen, rejected, margin)
        correct = (chosen > rejected).float()
        return LossOutput(values=values, weights=torch.ones_like(values),
                          metrics={"accuracy": (correct.sum(), len(correct)),
                                   "margin": ((chosen - rejected).sum(), len(correct))})
    return loss_fn


@torch.no_grad()
def evaluate_pairs(model, examples: list[dict], pad_id: int, gold_margin: list[float] | None,
                   batch_size: int = 32) -> dict:
    """Pair accuracy vs the labels, and vs the gold ordering when ``gold_margin`` is given."""
    from alignkit.data.collate import collate_preference, to_device

    device = next(model.parameters()).device
    diffs = []
    for s in range(0, len(examples), batch_size):
        batch = to_device(collate_preference(examples[s:s + batch_size], pad_id), device)
        chosen, rejected = pair_rewards(model, batch)
        diffs.append(chosen - rejected)
    diff = torch.cat(diffs)
    out = {"pair_accuracy": float((diff > 0).float().mean()), "margin": float(diff.mean())}
    if gold_margin is not None:
        gold = torch.tensor(gold_margin, device=diff.device)
        decided = gold != 0
        agree = ((diff > 0) == (gold > 0)) & decided
        out["gold_pair_accuracy"] = float(agree.sum() / decided.sum().clamp_min(1))
        out["label_gold_agreement"] = float(((gold > 0) & decided).sum() / decided.sum().clamp_min(1))
    return out

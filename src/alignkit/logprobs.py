"""Token log-probabilities from logits, without materialising a log-softmax copy of the vocabulary.

``log p(y_t) = z_t[y_t] - logsumexp(z_t)``: one gather and one reduction per position; the only
``[B, T, V]`` tensor kept for the backward pass is ``exp(z - max z)``, in place of the logits.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref

import torch

IGNORE_INDEX = -100


def next_token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of token ``t + 1`` under position ``t``'s logits: ``([B, T-1], targets [B, T-1])``
    for logits ``[B, T, V]`` and labels ``[B, T]`` (``IGNORE_INDEX`` where there is no target).

    The labels move, not the logits: slicing ``logits[:, :-1]`` would make autograd fill a
    ``[B, T, V]`` tensor of zeros and copy the gradient into it. Here the last position gets no
    target, and only the ``[B, T]`` result is sliced."""
    targets = labels[:, 1:]
    padded = torch.cat([targets, targets.new_full((labels.size(0), 1), IGNORE_INDEX)], dim=1)
    return token_logps(logits, padded)[:, :-1], targets


class _PickedLogProb(torch.autograd.Function):
    """``z[y] - logsumexp(z)`` per row of ``z`` ``[N, V]`` (fp32), labels ``y`` ``[N]``.

    Forward: ``m = max z``, ``e = exp(z - m)``, ``s = sum e``: ``z[y] - m - log s``. Backward, with
    ``g`` the incoming gradient: ``d/dz = g * (onehot(y) - e / s)`` (the softmax Jacobian of
    ``log p(y)``), computed from the saved ``e`` in one pass plus a scatter at the labels. Autograd
    through ``logsumexp`` and ``gather`` would recompute ``exp(z - lse)``, fill a zero tensor for
    the gather and add the two ``[N, V]`` gradients: 2.5-3x slower here at a vocabulary of 1,024 or
    8,192. The saved ``e`` replaces the saved logits, so memory is unchanged."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        m = z.amax(-1, keepdim=True)
        e = torch.sub(z, m).exp_()
        s = e.sum(-1, keepdim=True)
        ctx.save_for_backward(e, s, labels)
        return (z.gather(-1, labels[:, None]) - m - s.log()).squeeze(-1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: torch.Tensor):
        e, s, labels = ctx.saved_tensors
        g = g[:, None]
        grad = e * (g / s).neg_()
        return grad.scatter_add_(1, labels[:, None], g), None


def token_logps(logits: torch.Tensor, labels: torch.Tensor, chunk: int = 0) -> torch.Tensor:
    """Log-probability of each label under ``logits`` (already aligned, no shifting here).

    logits: ``[B, T, V]`` (any float dtype; computed in fp32), labels: ``[B, T]`` with
    ``IGNORE_INDEX`` where there is no target. Returns ``[B, T]`` fp32 with 0 at ignored positions.
    ``chunk`` > 0 processes that many rows of ``B * T`` at a time to bound the fp32 up-cast.
    """
    mask = labels != IGNORE_INDEX
    safe = labels.masked_fill(~mask, 0)
    flat_logits = logits.reshape(-1, logits.size(-1))
    flat_labels = safe.reshape(-1)
    n = flat_logits.size(0)
    if n == 0:
        return flat_logits.new_zeros(labels.shape, dtype=torch.float32)
    if chunk <= 0 or chunk >= n:  # no slice: its backward would copy into a [N, V] of zeros
        logps = _PickedLogProb.apply(flat_logits.float(), flat_labels)
    else:
        logps = torch.cat([_PickedLogProb.apply(flat_logits[i:i + chunk].float(),
                                                flat_labels[i:i + chunk])
                           for i in range(0, n, chunk)])
    return logps.view(labels.shape) * mask


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the next-token distribution per position, ``[B, T, V] -> [B, T]`` (fp32)."""
    z = logits.float()
    logz = torch.logsumexp(z, dim=-1, keepdim=True)
    p = torch.exp(z - logz)
    return (logz.squeeze(-1) - (p * z).sum(-1))


def sequence_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   labels: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token log-probs ``[B, T-1]`` of ``labels[:, 1:]`` under a causal LM's forward pass.

    Left- or right-padded batches both work: position ids are derived from the attention mask
    when not given, so a token's log-prob does not depend on how much padding precedes it.
    """
    if position_ids is None:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                use_cache=False)
    return next_token_logps(out.logits, labels)[0]


_last_boundaries: tuple = (None, -1, [])  # (weak reference, version, lengths): see below


def sequence_lengths(cu_seq_lens: torch.Tensor) -> list[int]:
    """The sequence lengths of a flat row, as a list. ``packed_inputs`` and every attention layer
    of the forward (``alignkit.attention``) read the same boundaries tensor, so the list read for
    it is kept: one device-to-host read per forward, not one per layer (each a synchronisation on
    a GPU). The tensor's identity and version (bumped by any in-place write) decide whether the
    kept list still holds."""
    global _last_boundaries
    ref, version, lengths = _last_boundaries
    if ref is None or ref() is not cu_seq_lens or version != cu_seq_lens._version:
        lengths = cu_seq_lens.diff().tolist()
        _last_boundaries = (weakref.ref(cu_seq_lens), cu_seq_lens._version, lengths)
    return lengths


def packed_inputs(batch: dict) -> dict:
    """Model inputs of a packed batch (``collate_packed``): ids and per-sequence position ids, no
    attention mask; a flat row also passes its sequence boundaries under the names flash
    attention's varlen path reads (``alignkit.attention`` reads them on CPU)."""
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"],
              "use_cache": False}
    if "cu_seq_lens" in batch:
        cu = batch["cu_seq_lens"].to(device=batch["input_ids"].device, dtype=torch.int32)
        longest = max(sequence_lengths(cu))
        inputs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                      max_length_q=longest, max_length_k=longest)
    if "shared_prefix_lens" in batch:  # collate_shared: only alignkit_sdpa reads it
        inputs["shared_prefix_lens"] = batch["shared_prefix_lens"]
    return inputs


def causal_logits(model, batch: dict, **kw) -> torch.Tensor:
    """Logits ``[R, T, V]`` of a right-padded batch (``attention_mask``) or a packed one
    (``position_ids`` restarting at every sequence, no mask: see ``collate_packed``); ``kw`` go
    to the forward (e.g. ``logits_to_keep``)."""
    if "sequence_index" in batch:
        return model(**packed_inputs(batch), **kw).logits
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 use_cache=False, **kw).logits


def labelled_logps(model, batch: dict,
                   last_rows_only: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Next-token log-probs at the positions of a batch that have a target (``labels[:, t + 1]``
    not ``IGNORE_INDEX`` in some row), those targets, and the positions: ``([R, K], [R, K],
    [K])``, log-prob 0 and target ``IGNORE_INDEX`` where a row has none; the positions index the
    ``T - 1`` next-token axis (``labels[:, 1:]``). Where the forward takes ``logits_to_keep`` as
    indices (transformers' causal LMs), the LM head runs at those K positions only: a prompt's
    tokens (SFT), or all but the verdict of a judge's prompt, get no logits; ``last_rows_only``
    runs the last layer's MLP there only too (``models.rows_only``; check the model with
    ``sft.supports_last_rows_only`` first). Otherwise K = T - 1 (:func:`next_token_logps`)."""
    labels = batch["labels"]
    if "logits_to_keep" not in forward_parameters(model):
        logps, targets = next_token_logps(causal_logits(model, batch), labels)
        return logps, targets, torch.arange(targets.size(1), device=targets.device)
    keep = (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero().squeeze(-1)
    targets = labels[:, 1:][:, keep]
    context = contextlib.nullcontext()
    if last_rows_only:
        from alignkit.models import last_mlp, rows_only

        starts = torch.arange(labels.size(0), device=keep.device)[:, None] * labels.size(1)
        context = rows_only(last_mlp(model), (starts + keep).reshape(-1))  # every row's K
    with context:
        logits = causal_logits(model, batch, logits_to_keep=keep)
    return token_logps(logits, targets), targets, keep


def forward_parameters(model) -> frozenset[str]:
    """The names ``model.forward`` declares (empty if its signature cannot be read). A PEFT
    wrapper whose adapters replace layers passes its keyword arguments through to the wrapped
    model (:func:`adapter_base`), so the wrapped model's names count too (``logits_to_keep``
    above all); prompt-learning wrappers build their own inputs and count as they declare."""
    def declared(fn) -> frozenset[str]:
        try:
            return frozenset(inspect.signature(fn).parameters)
        except (TypeError, ValueError):
            return frozenset()

    names = declared(model.forward)
    base = adapter_base(model)
    return names | declared(base.forward) if base is not None and base is not model else names


def adapter_base(model):
    """The transformers model under a PEFT wrapper whose adapters replace layers (LoRA and kin:
    the adapter layers stay in place inside it, and the wrapper passes its keyword arguments
    through); ``model`` itself when it is no PEFT wrapper; ``None`` under prompt-learning
    adapters (prefix/prompt tuning build their own inputs and cache)."""
    configs = getattr(model, "peft_config", None)
    if not configs or not hasattr(model, "get_base_model"):
        return model
    if any(getattr(c, "is_prompt_learning", True) for c in configs.values()):
        return None
    return model.get_base_model()


def target_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of each sequence's targets and their count, ``([N], [N])``, for a batch
    that lists its targets (``collate_shared``: ``target_positions``, ``target_ids``,
    ``target_owner``). The LM head runs at the target positions only where the model's forward
    takes ``logits_to_keep`` as indices (transformers' causal LMs)."""
    where = batch["target_positions"]
    if "logits_to_keep" in forward_parameters(model):
        logits = model(**packed_inputs(batch), logits_to_keep=where).logits.squeeze(0)
    else:
        logits = model(**packed_inputs(batch)).logits[0, where]
    per_token = token_logps(logits, batch["target_ids"])
    owner, n = batch["target_owner"], int(batch["num_sequences"])
    return (per_token.new_zeros(n).index_add(0, owner, per_token),
            per_token.new_zeros(n).index_add(0, owner, torch.ones_like(per_token)))


def sum_per_sequence(values: torch.Tensor, batch: dict) -> torch.Tensor:
    """Sum next-token values ``[R, T-1]`` (aligned with ``labels[:, 1:]``) per sequence: ``[N]``.

    A padded batch has one sequence per row; a packed one says which sequence owns each token
    (``sequence_index``), and the value predicting token ``t + 1`` belongs to that token's owner.
    """
    if "sequence_index" not in batch:
        return values.sum(-1)
    owner = batch["sequence_index"][:, 1:]
    keep = owner >= 0
    out = values.new_zeros(int(batch["num_sequences"]))
    return out.index_add(0, owner[keep], values[keep])

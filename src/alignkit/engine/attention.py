"""Scaled-dot-product attention that runs each sequence of a flat packed row on its own.

A packed batch can hold its sequences in rows as wide as the longest one (attention then runs
densely over each row, masked to the blocks of its sequences) or in one flat row with no filler
at all. Flat is the cheaper layout only if attention costs each sequence its own length
squared, as flash attention's variable-length kernels do on GPU. PyTorch's SDPA on CPU has no
such kernel: given a flat row it would compute the full row-by-row score matrix under a
block-diagonal mask. This module registers ``alignkit_sdpa`` with transformers'
``AttentionInterface``: given the sequence boundaries that flash attention reads
(``cu_seq_lens_q``, passed through the model's forward kwargs, see
``alignkit.engine.forward.packed_inputs``), it calls causal SDPA once per sequence, except that short
sequences of similar lengths (a rollout's) are gathered into one padded batch per call, where the
per-call cost would dominate (``_plan``); without boundaries it is transformers' own SDPA, so
generation, padded batches and anything else run unchanged.

Given ``shared_prefix_lens`` too (``alignkit.data.collate.collate_shared``: a pair's prompt
written once; ``Rollout.packed_shared``: a sampling group's), a segment with a shared length
``s`` attends to the first ``s`` tokens of the segment before it, then to itself causally, with
its positions continuing from ``s``: the second answer of a pair sees the prompt and not the
first answer.

It also defers the mask transformers builds for a single unpadded row (``DeferredMask``): a flat
row's mask is block-diagonal, ``T x T`` for the whole row, and the per-sequence path never reads it.

It also runs a bf16 training step's per-sequence attention in fp32: PyTorch's CPU flash kernel
is about twice as slow backward in bf16 as in fp32 (its forward is faster in bf16, which is what
sampling uses), and fp32 is the more accurate of the two.
"""
from __future__ import annotations

import functools
import itertools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from alignkit.engine.forward import sequence_lengths

NAME = "alignkit_sdpa"


class DeferredMask:
    """SDPA's mask for one unpadded row, built on first use by an attention call that needs it.

    transformers builds a packed row's mask before any layer runs: ``[1, 1, T, T]`` booleans
    from the packed position ids, through index tensors of the same size (on 2 CPU cores ~2 ms
    at T = 1,100 and ~7 ms at T = 2,200: quadratic in T). ``sequence_sdpa`` given the row's
    boundaries never reads it; any other path (no boundaries reached the attention call) builds
    it here, once per forward, with the arguments transformers gave: the same mask.
    """

    def __init__(self, arguments: dict):
        self._arguments, self._mask = arguments, None

    def build(self):
        if self._arguments is not None:
            self._mask, self._arguments = sdpa_mask(**self._arguments), None
        return self._mask


def deferred_sdpa_mask(*args, **kwargs):
    """transformers' mask interface for ``alignkit_sdpa``: SDPA's mask, deferred for one unpadded
    row without a cache (a training forward; packed rows are these), built at once otherwise."""
    one_row = (not args and kwargs.get("batch_size") == 1 and kwargs.get("attention_mask") is None
               and kwargs.get("q_length", 0) > 1 and kwargs.get("q_length") == kwargs.get("kv_length")
               and all(type(kwargs.get(k, 0)) is int and kwargs.get(k, 0) == 0  # not a cache's tensor
                       for k in ("q_offset", "kv_offset")))
    return DeferredMask(kwargs) if one_row else sdpa_mask(*args, **kwargs)


def sequence_sdpa(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask, dropout: float = 0.0, scaling: float | None = None,
                  cu_seq_lens_q: torch.Tensor | None = None, **kwargs):
    """Attention of ``query`` ``[1, H, T, D]`` over ``key``/``value`` ``[1, H_kv, T, D]``, causal
    within each sequence ``cu_seq_lens_q[i]:cu_seq_lens_q[i+1]`` of the flat row; the output is
    ``[1, T, H, D]`` as transformers' attention functions return it."""
    # With boundaries given, the mask transformers built from the packed position ids is their
    # block-diagonal causal mask, which the per-sequence calls apply by construction.
    flat = (cu_seq_lens_q is not None and query.shape[0] == 1
            and getattr(module, "is_causal", True) and kwargs.get("sliding_window") is None
            and getattr(module, "sliding_window", None) is None)
    if isinstance(attention_mask, DeferredMask):
        attention_mask = None if flat else attention_mask.build()
    if not flat:  # anything else keeps transformers' SDPA path (masks, caches, windows)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    device = query.device.type
    # Under autocast the inputs can differ (Llama's rotary embedding returns fp32 queries and keys
    # beside bf16 values); SDPA would run in the autocast dtype, and so does the output here.
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else query.dtype
    compute = dtype
    if dtype == torch.bfloat16 and device == "cpu" and torch.is_grad_enabled():
        compute = torch.float32
    lengths = sequence_lengths(cu_seq_lens_q)
    plan = _plan(tuple(lengths), tuple(kwargs.get("shared_prefix_lens") or ()), query.device)
    # [T, H, D] token-major views: a bucket gathers its rows' tokens along the first dimension.
    q, k, v = (t.to(compute)[0].transpose(0, 1) for t in (query, key, value))
    out = []
    with torch.autocast(device, enabled=False):
        for rows, width, keys in plan.buckets:  # rows of equal padded width, one causal SDPA call
            qb, kb, vb = (t.index_select(0, keys).view(rows, width, *t.shape[1:]).transpose(1, 2)
                          for t in (q, k, v))
            o = F.scaled_dot_product_attention(qb, kb, vb, dropout_p=dropout, scale=scaling, is_causal=True)
            out.append(o.transpose(1, 2).reshape(rows * width, o.size(1), o.size(3)))
        if plan.singles:
            # split (not slicing) so that backward concatenates the gradients once instead of
            # scattering each sequence's into a zero tensor of the whole row.
            own = list(zip(*(t.split(lengths) for t in (q, k, v))))
        for j, prefix in plan.singles:  # own queries; a shared prefix's keys before its own
            qs, ks, vs = own[j]
            if prefix is not None:
                ks, vs = k.index_select(0, prefix.keys), v.index_select(0, prefix.keys)
            mask = ({"attn_mask": _continuing(qs.size(0), prefix.length, q.device)} if prefix is not None
                    else {"is_causal": True})
            o = F.scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in (qs, ks, vs)),
                                               dropout_p=dropout, scale=scaling, **mask)
            out.append(o[0].transpose(0, 1))
    # [1, T, H, D], the layout the caller reshapes to [1, T, H * D] without a copy.
    flat = torch.cat(out) if len(out) > 1 else out[0].contiguous()
    if plan.take is not None:
        flat = flat.index_select(0, plan.take)
    return flat[None].to(dtype), None


class _Prefix(NamedTuple):
    length: int            # shared tokens before the segment's own
    keys: torch.Tensor     # flat-row indices of the segment's keys: the prefix's, then its own


class _Plan(NamedTuple):
    buckets: list          # (rows, width, flat-row indices [rows * width] of each row's tokens)
    singles: list          # (segment, _Prefix | None): segments attended on their own
    take: torch.Tensor | None  # row of the concatenated outputs that holds each flat token's


# What batching pays for is the per-call cost of SDPA, which short rows do not amortise: at a
# rollout's shapes (32 rows of ~70 tokens, 4 heads of 32, 2 CPU cores) one call over the rows padded
# to the longest is ~2x faster forward + backward than a call per row; rows of ~200 tokens gain
# nothing (and pay the gather), and neither do buckets of two or three. So rows up to _WIDTH tokens
# are batched, _ROWS or more per call, with padding up to _SLACK of a bucket's real tokens.
_WIDTH, _ROWS, _SLACK = 128, 4, 0.25


@functools.lru_cache(maxsize=8)
def _plan(lengths: tuple, shared: tuple, device) -> _Plan:
    """How ``sequence_sdpa`` runs a flat row's segments (``lengths``, each continuing ``shared[j]``
    tokens of the one before it, see the module docstring): each segment is a causal row of
    its keys' flat indices (the prefix's, then its own). Rows of similar length go into buckets,
    padded to the bucket's longest with the row's last index (a padded query's output is dropped,
    and causal attention never lets a real query see a padded key, so real outputs and all
    gradients are exact); a prefix's queries are then computed again, so a segment whose prefix is
    longer than itself, and a bucket of fewer than ``_ROWS``, run on their own. Cached: a
    forward's layers share it."""
    shared = shared or (0,) * len(lengths)
    starts = [0, *itertools.accumulate(lengths[:-1])]
    rows = []  # per segment: its keys' flat indices
    for j, (start, n, s) in enumerate(zip(starts, lengths, shared)):
        rows.append((rows[j - 1][:s] if s else []) + list(range(start, start + n)))
    order = sorted((j for j in range(len(lengths)) if shared[j] <= lengths[j] and len(rows[j]) <= _WIDTH),
                   key=lambda j: -len(rows[j]))
    groups, i = [], 0
    while i < len(order):
        width = real = len(rows[order[i]])
        end = i + 1
        while end < len(order) and (end - i + 1) * width <= (1 + _SLACK) * (real + len(rows[order[end]])):
            real += len(rows[order[end]])
            end += 1
        groups.append(order[i:end])
        i = end
    buckets, singles, where, offset = [], [], {}, 0   # where[j]: row of segment j's first own output
    for group in groups:
        if len(group) < _ROWS:
            continue
        width = len(rows[group[0]])
        keys = [index for r in (rows[j] for j in group) for index in r + [r[-1]] * (width - len(r))]
        buckets.append((len(group), width, torch.tensor(keys, device=device)))
        for row, j in enumerate(group):
            where[j] = offset + row * width + shared[j]
        offset += len(group) * width
    for j, (start, n, s) in enumerate(zip(starts, lengths, shared)):
        if j not in where:
            prefix = _Prefix(s, torch.tensor(rows[j], device=device)) if s else None
            singles.append((j, prefix))
            where[j] = offset
            offset += n
    if not buckets:  # every segment on its own, in order: the concatenation is the flat row
        return _Plan([], singles, None)
    # Flat token t of segment j is output row where[j] + (t - starts[j]).
    shift = torch.tensor([where[j] - start for j, start in enumerate(starts)], device=device)
    take = torch.arange(sum(lengths), device=device) + shift.repeat_interleave(
        torch.tensor(lengths, device=device))
    return _Plan(buckets, singles, take)


@functools.lru_cache(maxsize=256)
def _continuing(length: int, shared: int, device) -> torch.Tensor:
    """``[length, shared + length]`` causal mask of a segment's own queries over the ``shared``
    keys before them and its own (query ``i`` sits at position ``shared + i``)."""
    return torch.ones(length, shared + length, dtype=torch.bool, device=device).tril(shared)


def register() -> str:
    """Register ``alignkit_sdpa`` with transformers (idempotent); its masks are SDPA's (deferred
    for one unpadded row: ``DeferredMask``)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, sequence_sdpa)
    AttentionMaskInterface.register(NAME, deferred_sdpa_mask)
    return NAME


def flat_packing(model) -> bool:
    """Switch a model on transformers' SDPA to ``alignkit_sdpa``; True if its attention now runs
    per sequence on a flat packed row (``alignkit_sdpa`` or flash attention's varlen kernels)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    implementation = getattr(config, "_attn_implementation", None)
    if implementation == "sdpa" and hasattr(base, "set_attn_implementation"):
        base.set_attn_implementation(register())
        implementation = config._attn_implementation
    return implementation == NAME or str(implementation).startswith("flash_attention")

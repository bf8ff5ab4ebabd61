"""Batching: padding, preference stacking and length-grouped batch order.

Padding side is part of correctness, not taste:

- training batches are padded on the **right**, so a sequence's tokens sit at the same positions
  as when it was alone, and padded positions carry ``IGNORE_INDEX`` labels and mask 0;
- generation batches are padded on the **left**, so every prompt ends at the last column and the
  sampled token is appended right after its own prompt, not after another row's padding.

The attention mask, never ``input_ids == pad_id``, says what is padding: the pad id may be any
token (even EOS in some tokenizers), and a real EOS target must stay a target.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Literal

import torch

from alignkit.math.logprobs import IGNORE_INDEX

Side = Literal["right", "left"]
Packing = Literal["rows", "flat", "shared"]


def pad_sequences(seqs: Sequence[Sequence[int]], pad_value: int, side: Side = "right") -> torch.Tensor:
    """Stack ``seqs`` into a ``[B, max_len]`` LongTensor, filling with ``pad_value`` on ``side``."""
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    width = max((len(s) for s in seqs), default=0)
    out = torch.full((len(seqs), width), pad_value, dtype=torch.long)
    for row, s in enumerate(seqs):
        if len(s) == 0:
            continue
        values = torch.as_tensor(list(s), dtype=torch.long)
        if side == "right":
            out[row, :len(s)] = values
        else:
            out[row, width - len(s):] = values
    return out


def _mask(lengths: Sequence[int], side: Side) -> torch.Tensor:
    return pad_sequences([[1] * n for n in lengths], 0, side)


def collate_sft(examples: Sequence[Mapping], pad_id: int, side: Side = "right") -> dict[str, torch.Tensor]:
    """Batch ``{input_ids, labels}`` rows: ``input_ids``, ``attention_mask``, ``labels`` ``[B, T]``.

    Rows that also carry a boolean ``label`` (unpaired/KTO data) get a ``label`` bool tensor ``[B]``.
    """
    ids = [e["input_ids"] for e in examples]
    for i, e in enumerate(examples):
        if len(e["labels"]) != len(e["input_ids"]):
            raise ValueError(f"example {i}: {len(e['labels'])} labels for {len(e['input_ids'])} tokens")
    batch = {
        "input_ids": pad_sequences(ids, pad_id, side),
        "attention_mask": _mask([len(s) for s in ids], side),
        "labels": pad_sequences([e["labels"] for e in examples], IGNORE_INDEX, side),
    }
    if examples and all("label" in e for e in examples):
        batch["label"] = torch.tensor([bool(e["label"]) for e in examples], dtype=torch.bool)
    return batch


def pack_bins(lengths: Sequence[int], width: int) -> list[list[int]]:
    """First-fit-decreasing bins of sequence indices whose lengths sum to at most ``width``.

    Deterministic: ties keep index order. A sequence longer than ``width`` gets a bin of its own.
    """
    bins: list[list[int]] = []
    fill: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        slot = next((b for b, used in enumerate(fill) if used + lengths[i] <= width), None)
        if slot is None:
            bins.append([i])
            fill.append(lengths[i])
        else:
            bins[slot].append(i)
            fill[slot] += lengths[i]
    return bins


def collate_packed(examples: Sequence[Mapping], layout: Packing = "rows",
                   width: int = 0) -> dict[str, torch.Tensor]:
    """Pack ``{input_ids, labels}`` rows without padding between them (padding-free batching).

    ``layout="rows"``: sequences are placed into rows of at most ``width`` tokens
    (:func:`pack_bins`; default: the longest sequence, so no row is wider than a padded batch
    and attention, which then runs densely over each row, costs no more than padded). The row
    tail is filler with labels ``IGNORE_INDEX``. ``layout="flat"``: all sequences, in order, in
    one row with no filler, plus ``cu_seq_lens`` (``[N + 1]``, where each sequence starts, then
    the row's end); for attention that runs per sequence given those boundaries (flash
    attention's varlen kernels, :mod:`alignkit.engine.attention`), see ``logprobs.packed_inputs``.

    Each sequence keeps its own position ids (0, 1, ...), which is how Hugging Face models
    recognise packed sequences and confine attention to each one (``attention_mask`` must then be
    absent). The first label of every sequence is ignored: unpacked, it is never a target, and
    packed it would be predicted from the end of the previous sequence.

    Returns ``input_ids``, ``labels``, ``position_ids`` and ``sequence_index`` (``[R, T]``: which
    example each token belongs to, -1 on the filler) and ``num_sequences``.
    """
    lengths = [len(e["input_ids"]) for e in examples]
    if layout == "flat":
        bins = [list(range(len(examples)))]
    elif layout == "rows":
        bins = pack_bins(lengths, width or max(lengths))
    else:
        raise ValueError(f"unknown packing layout {layout!r}; expected 'rows' or 'flat'")
    ids, labels, positions, owner = [], [], [], []
    for members in bins:
        row_ids, row_labels, row_pos, row_owner = [], [], [], []
        for i in members:
            e = examples[i]
            if len(e["labels"]) != lengths[i]:
                raise ValueError(f"example {i}: {len(e['labels'])} labels for {lengths[i]} tokens")
            row_ids += list(e["input_ids"])
            row_labels += [IGNORE_INDEX] + list(e["labels"][1:])
            row_pos += list(range(lengths[i]))
            row_owner += [i] * lengths[i]
        ids.append(row_ids)
        labels.append(row_labels)
        positions.append(row_pos)
        owner.append(row_owner)
    used = max(len(r) for r in ids)
    # The tail is inert: no real token attends to it and it has no labels. Its ids repeat the
    # row's first token rather than the pad id (transformers warns about pad ids without an
    # attention mask); its positions are all 0, so each filler token is a sequence of its own
    # and no position exceeds those of real sequences (learned position tables end there).
    ids = [r + [r[0]] * (used - len(r)) for r in ids]
    positions = [p + [0] * (used - len(p)) for p in positions]
    batch = {
        "input_ids": torch.tensor(ids),
        "labels": pad_sequences(labels, IGNORE_INDEX),
        "position_ids": torch.tensor(positions),
        "sequence_index": pad_sequences(owner, -1),
        "num_sequences": torch.tensor(len(examples)),
    }
    if layout == "flat":
        batch["cu_seq_lens"] = torch.tensor([0] + lengths).cumsum(0)
    return batch


def collate_shared(pairs: Sequence[tuple[Mapping, Mapping]]) -> dict:
    """Pack pairs of ``{input_ids, labels}`` sequences into one flat row, the tokens both members
    of a pair start with written once (prefix sharing: Wang & Hegde 2024, arXiv:2410.20305).

    Pair ``i = (a, b)`` (a chosen and a rejected answer: their prompt is the common prefix)
    becomes two segments of the row: ``a`` whole, then ``b`` without the first ``s`` tokens it
    shares with ``a`` (``s`` = their longest common prefix, at most each length - 1, so both
    segments keep a token of their own). ``b``'s positions continue from ``s``. Attention must
    then let each ``b`` segment see the first ``s`` tokens of the segment before it and nothing
    else of it: ``shared_prefix_lens`` (per segment, 0 for ``a``), read by ``alignkit_sdpa``
    (:mod:`alignkit.engine.attention`); a model whose attention cannot is not given this layout
    (``forward.supports_packing``). The shared tokens' forward and backward run once per pair.

    Sequences are numbered ``a_0..a_{B-1}, b_0..b_{B-1}`` (the order of ``collate_preference``);
    ``sequence_index`` gives each token its sequence, the shared tokens to ``a``. The next-token
    shift of ``labels`` does not hold across segments, so there are none: each labelled token
    ``j >= 1`` of a sequence is a target, ``target_ids``, predicted at row position
    ``target_positions`` (its token ``j - 1``'s), owned by ``target_owner``. Also
    ``position_ids``, ``num_sequences`` and ``cu_seq_lens`` (the segment boundaries).
    """
    half = len(pairs)
    ids, positions, owner, seg_lens, shared = [], [], [], [], []
    t_pos, t_ids, t_owner = [], [], []
    for i, (a, b) in enumerate(pairs):
        for k, e in ((i, a), (half + i, b)):
            if len(e["labels"]) != len(e["input_ids"]):
                raise ValueError(f"sequence {k}: {len(e['labels'])} labels for "
                                 f"{len(e['input_ids'])} tokens")
        a_ids, b_ids = list(a["input_ids"]), list(b["input_ids"])
        s = 0
        limit = min(len(a_ids), len(b_ids)) - 1
        while s < limit and a_ids[s] == b_ids[s]:
            s += 1
        start_a = len(ids)
        start_b = start_a + len(a_ids)
        ids += a_ids + b_ids[s:]
        positions += list(range(len(a_ids))) + list(range(s, len(b_ids)))
        owner += [i] * len(a_ids) + [half + i] * (len(b_ids) - s)
        seg_lens += [len(a_ids), len(b_ids) - s]
        shared += [0, s]
        for k, e, where in ((i, a, lambda j: start_a + j),
                            (half + i, b, lambda j: start_a + j if j < s else start_b + j - s)):
            for j in range(1, len(e["labels"])):
                if e["labels"][j] != IGNORE_INDEX:
                    t_pos.append(where(j - 1))
                    t_ids.append(e["labels"][j])
                    t_owner.append(k)
    return {
        "input_ids": torch.tensor([ids]),
        "position_ids": torch.tensor([positions]),
        "sequence_index": torch.tensor([owner]),
        "num_sequences": torch.tensor(2 * half),
        "cu_seq_lens": torch.tensor([0] + seg_lens).cumsum(0),
        "shared_prefix_lens": tuple(shared),
        "target_positions": torch.tensor(t_pos, dtype=torch.long),
        "target_ids": torch.tensor(t_ids, dtype=torch.long),
        "target_owner": torch.tensor(t_owner, dtype=torch.long),
    }


def to_device(batch: Mapping, device) -> dict:
    """The batch with its tensors on ``device`` (other values, e.g. ``shared_prefix_lens``, as
    they are)."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def collate_prompts(prompt_id_lists: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded generation batch: ``input_ids`` and ``attention_mask`` ``[B, T]``."""
    return {
        "input_ids": pad_sequences(prompt_id_lists, pad_id, "left"),
        "attention_mask": _mask([len(s) for s in prompt_id_lists], "left"),
    }


def collate_preference(examples: Sequence[Mapping], pad_id: int,
                       pack: Packing | None = None) -> dict[str, torch.Tensor]:
    """Stack chosen and rejected into one right-padded batch of ``2B`` rows.

    Rows ``0..B-1`` are the chosen answers and rows ``B..2B-1`` the rejected ones, in the same
    order, so ``logps[:B]`` / ``logps[B:]`` are ``policy_chosen_logps`` / ``policy_rejected_logps``.
    One forward pass then serves both halves (and both see the same weights, dropout mode and
    padding width), which is the layout DPO-family losses and reward models expect.
    ``pack`` (a layout) packs the ``2B`` sequences instead, in the same order
    (:func:`collate_packed`; ``"shared"``: each pair's common prefix once, :func:`collate_shared`).
    """
    rows = [{"input_ids": e["chosen_input_ids"], "labels": e["chosen_labels"]} for e in examples]
    rows += [{"input_ids": e["rejected_input_ids"], "labels": e["rejected_labels"]} for e in examples]
    return collate_rows(rows, pad_id, pack)


def collate_rows(rows: Sequence[Mapping], pad_id: int,
                 pack: Packing | None = None) -> dict[str, torch.Tensor]:
    """Right-padded (:func:`collate_sft`) or, given a layout, packed (:func:`collate_packed`;
    ``"shared"``: :func:`collate_shared`, row ``i`` paired with row ``i + len(rows) // 2``)."""
    if pack == "shared":
        half = len(rows) // 2
        if 2 * half != len(rows):
            raise ValueError(f"the shared layout packs pairs; got an odd number of rows "
                             f"({len(rows)})")
        return collate_shared(list(zip(rows[:half], rows[half:])))
    return collate_packed(rows, pack) if pack else collate_sft(rows, pad_id, "right")


def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int, shuffle: bool = True,
                           mega_batches: int = 50) -> list[list[int]]:
    """Batches of indices with similar lengths, to cut padding waste.

    The indices are permuted by ``seed`` (when ``shuffle``), cut into chunks of
    ``mega_batches * batch_size``, sorted by length (longest first) inside each chunk and split
    into batches; then the batch order is shuffled by ``seed``. Sorting only inside chunks keeps
    batches random across the dataset while their members are alike. Every index appears exactly
    once; one batch (the tail of the last chunk) may be smaller. Without ``shuffle`` the order is a pure function of
    ``lengths`` (chunks in index order, batches in chunk order).
    """
    if batch_size < 1 or mega_batches < 1:
        raise ValueError(f"batch_size and mega_batches must be >= 1, got {batch_size}, {mega_batches}")
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    if shuffle:
        rng.shuffle(order)
    chunk = batch_size * mega_batches
    batches = []
    for start in range(0, len(order), chunk):
        # sorted() is stable, so equal lengths keep their (shuffled) order: deterministic per seed.
        members = sorted(order[start:start + chunk], key=lambda i: -lengths[i])
        batches += [members[j:j + batch_size] for j in range(0, len(members), batch_size)]
    if shuffle:
        rng.shuffle(batches)
    return batches

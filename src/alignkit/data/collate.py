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

from alignkit.logprobs import IGNORE_INDEX

Side = Literal["right", "left"]


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


def collate_prompts(prompt_id_lists: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded generation batch: ``input_ids`` and ``attention_mask`` ``[B, T]``."""
    return {
        "input_ids": pad_sequences(prompt_id_lists, pad_id, "left"),
        "attention_mask": _mask([len(s) for s in prompt_id_lists], "left"),
    }


def collate_preference(examples: Sequence[Mapping], pad_id: int) -> dict[str, torch.Tensor]:
    """Stack chosen and rejected into one right-padded batch of ``2B`` rows.

    Rows ``0..B-1`` are the chosen answers and rows ``B..2B-1`` the rejected ones, in the same
    order, so ``logps[:B]`` / ``logps[B:]`` are ``policy_chosen_logps`` / ``policy_rejected_logps``.
    One forward pass then serves both halves (and both see the same weights, dropout mode and
    padding width), which is the layout DPO-family losses and reward models expect.
    """
    rows = [{"input_ids": e["chosen_input_ids"], "labels": e["chosen_labels"]} for e in examples]
    rows += [{"input_ids": e["rejected_input_ids"], "labels": e["rejected_labels"]} for e in examples]
    return collate_sft(rows, pad_id, "right")


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

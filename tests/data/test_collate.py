import random

import pytest
import torch

from alignkit.data.collate import (
    collate_packed, collate_preference, collate_prompts, collate_rows, collate_sft, collate_shared,
    length_grouped_batches, pack_bins, pad_sequences,
)
from alignkit.data.formats import build_dataset
from alignkit.math.logprobs import IGNORE_INDEX as IGN


def test_pad_sequences_right_and_left():
    seqs = [[1, 2, 3], [4], []]
    assert pad_sequences(seqs, 0, "right").tolist() == [[1, 2, 3], [4, 0, 0], [0, 0, 0]]
    assert pad_sequences(seqs, 9, "left").tolist() == [[1, 2, 3], [9, 9, 4], [9, 9, 9]]
    assert pad_sequences(seqs, 0).dtype == torch.long
    assert pad_sequences([], 0).shape == (0, 0)
    with pytest.raises(ValueError, match="side"):
        pad_sequences(seqs, 0, "middle")


def test_collate_sft_right_pads_with_ignored_labels():
    examples = [{"input_ids": [1, 7, 8, 2], "labels": [IGN, IGN, 8, 2]},
                {"input_ids": [1, 9, 2], "labels": [IGN, 9, 2]}]
    batch = collate_sft(examples, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 7, 8, 2], [1, 9, 2, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert batch["labels"].tolist() == [[IGN, IGN, 8, 2], [IGN, 9, 2, IGN]]
    assert "label" not in batch


def test_real_eos_target_survives_even_when_pad_equals_eos():
    # GPT-2-style tokenizers have pad == eos; a collator that masks "input_ids == pad" would
    # silently stop training the model to end its answers.
    eos = 2
    batch = collate_sft([{"input_ids": [1, 5, eos], "labels": [IGN, 5, eos]},
                         {"input_ids": [1, 5, 6, 7, eos], "labels": [IGN, 5, 6, 7, eos]}], pad_id=eos)
    assert batch["labels"][0].tolist() == [IGN, 5, eos, IGN, IGN]
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 0, 0]
    assert batch["labels"][1, -1].item() == eos


def test_tokenizer_data_keeps_eos_targets_distinct_from_padding(tok):
    rows, _ = build_dataset([{"prompt": "the cat", "completion": " sat."},
                             {"prompt": "the", "completion": " big red dog runs fast."}], tok, max_length=64)
    batch = collate_sft(rows, tok.pad_token_id)
    assert tok.pad_token_id != tok.eos_token_id
    for row, n in zip(range(2), [len(r["input_ids"]) for r in rows]):
        assert batch["labels"][row, n - 1].item() == tok.eos_token_id  # last real token: EOS target
        assert (batch["input_ids"][row, n:] == tok.pad_token_id).all()
        assert (batch["labels"][row, n:] == IGN).all()
        assert (batch["input_ids"][row] == tok.eos_token_id).sum().item() == 1
        assert (batch["input_ids"][row] == tok.bos_token_id).sum().item() == 1


def test_collate_sft_rejects_misaligned_labels_and_carries_unpaired_label():
    with pytest.raises(ValueError, match="example 0: 1 labels for 2 tokens"):
        collate_sft([{"input_ids": [1, 2], "labels": [2]}], 0)
    batch = collate_sft([{"input_ids": [1], "labels": [1], "label": True},
                         {"input_ids": [1], "labels": [1], "label": False}], 0)
    assert batch["label"].tolist() == [True, False] and batch["label"].dtype == torch.bool


def test_collate_prompts_left_pads_so_prompts_end_together():
    batch = collate_prompts([[1, 5, 6, 7], [1, 8]], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 7], [0, 0, 1, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]


def test_collate_preference_stacks_chosen_then_rejected():
    examples = [
        {"chosen_input_ids": [1, 3, 4], "chosen_labels": [IGN, 3, 4],
         "rejected_input_ids": [1, 3, 5, 6, 7], "rejected_labels": [IGN, 3, 5, 6, 7]},
        {"chosen_input_ids": [1, 8], "chosen_labels": [IGN, 8],
         "rejected_input_ids": [1, 9], "rejected_labels": [IGN, 9]},
    ]
    batch = collate_preference(examples, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 3, 4, 0, 0], [1, 8, 0, 0, 0],
                                           [1, 3, 5, 6, 7], [1, 9, 0, 0, 0]]
    assert batch["labels"].tolist() == [[IGN, 3, 4, IGN, IGN], [IGN, 8, IGN, IGN, IGN],
                                        [IGN, 3, 5, 6, 7], [IGN, 9, IGN, IGN, IGN]]
    assert batch["attention_mask"].sum(1).tolist() == [3, 2, 5, 2]


def test_padding_side_does_not_change_what_a_model_sees(tok):
    # Invariance with a real causal LM: right-padded training rows and left-padded generation
    # rows give, at every real position, the logits of the same sequence run alone.
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                         max_position_embeddings=64)).eval()
    seqs = [tok("the cat sat on the mat.").input_ids, tok("a dog.").input_ids]
    alone = [model(torch.tensor([s])).logits[0] for s in seqs]
    for side, batch in (("right", collate_sft([{"input_ids": s, "labels": s} for s in seqs], tok.pad_token_id)),
                        ("left", collate_prompts(seqs, tok.pad_token_id))):
        mask = batch["attention_mask"]
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions).logits
        for row, ref in enumerate(alone):
            real = mask[row].bool()
            torch.testing.assert_close(logits[row][real], ref.detach(), atol=1e-5, rtol=1e-5)
            if side == "left":  # generation reads the last column: it must be each prompt's last token
                torch.testing.assert_close(logits[row, -1], ref[-1].detach(), atol=1e-5, rtol=1e-5)


def test_length_grouped_batches_hand_computed_without_shuffle():
    lengths = [3, 1, 2, 5, 4]
    assert length_grouped_batches(lengths, batch_size=2, seed=0, shuffle=False, mega_batches=1) == \
        [[0, 1], [3, 2], [4]]
    # One mega-chunk holding everything: a global sort, longest first.
    assert length_grouped_batches(lengths, batch_size=2, seed=0, shuffle=False, mega_batches=10) == \
        [[3, 4], [0, 2], [1]]


def test_length_grouped_batches_cover_every_index_once_and_depend_only_on_seed():
    rng = random.Random(1)
    lengths = [rng.randint(1, 500) for _ in range(1003)]
    batches = length_grouped_batches(lengths, batch_size=8, seed=7)
    assert sorted(i for b in batches for i in b) == list(range(1003))
    assert sorted(len(b) for b in batches)[1:] == [8] * (len(batches) - 1)
    assert batches == length_grouped_batches(lengths, batch_size=8, seed=7)
    assert batches != length_grouped_batches(lengths, batch_size=8, seed=8)
    # Batch order is shuffled too: unshuffled, each chunk's batches would run longest first.
    longest = [max(lengths[i] for i in b) for b in batches[:50]]
    assert longest != sorted(longest, reverse=True)


def test_length_grouping_reduces_padding():
    rng = random.Random(2)
    lengths = [rng.randint(1, 500) for _ in range(2000)]

    def padded(batches):
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)

    order = list(range(2000))
    random.Random(3).shuffle(order)
    plain = [order[i:i + 8] for i in range(0, 2000, 8)]
    grouped = length_grouped_batches(lengths, batch_size=8, seed=3)
    # Random batches pad to about 8/9 of the maximum; sorted chunks of 400 to within a few percent.
    assert padded(grouped) < 0.6 * padded(plain)
    assert padded(grouped) < 1.05 * sum(lengths)


def test_pack_bins_first_fit_decreasing_hand_computed():
    # Longest first: 9 opens bin 0; 7 opens bin 1; 5 opens bin 2; 3 fills bin 1 (7+3=10);
    # 2 does not fit bins 0 (11) or 1 (12), so it joins bin 2 (5+2).
    assert pack_bins([5, 9, 3, 7, 2], width=10) == [[1], [3, 2], [0, 4]]
    assert pack_bins([4, 12], width=10) == [[1], [0]]  # too long: a bin of its own


def test_collate_packed_layout_hand_computed():
    rows = [{"input_ids": [1, 3, 4], "labels": [IGN, 3, 4]},
            {"input_ids": [1, 5, 6, 7, 8], "labels": [1, 5, 6, 7, 8]},
            {"input_ids": [1, 9], "labels": [IGN, 9]}]
    batch = collate_packed(rows)  # width: the longest, 5
    # bins: [1] (5 tokens), [0, 2] (3 + 2): row 1's sequences restart their positions
    assert batch["input_ids"].tolist() == [[1, 5, 6, 7, 8], [1, 3, 4, 1, 9]]
    # the first label of every sequence is dropped (it was never a next-token target)
    assert batch["labels"].tolist() == [[IGN, 5, 6, 7, 8], [IGN, 3, 4, IGN, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 0, 1]]
    assert batch["sequence_index"].tolist() == [[1, 1, 1, 1, 1], [0, 0, 0, 2, 2]]
    assert "attention_mask" not in batch and int(batch["num_sequences"]) == 3
    # a row shorter than the widest gets an inert tail: no owner, no label, position 0
    tail = collate_packed(rows[:1] + rows[2:])
    assert tail["input_ids"].tolist() == [[1, 3, 4], [1, 9, 1]]
    assert tail["labels"].tolist() == [[IGN, 3, 4], [IGN, 9, IGN]]
    assert tail["position_ids"].tolist() == [[0, 1, 2], [0, 1, 0]]
    assert tail["sequence_index"].tolist() == [[0, 0, 0], [1, 1, -1]]
    # a wider row packs more: both sequences share one row
    wide = collate_packed(rows[:1] + rows[2:], width=5)
    assert wide["input_ids"].tolist() == [[1, 3, 4, 1, 9]]
    assert wide["position_ids"].tolist() == [[0, 1, 2, 0, 1]]


def test_collate_rows_pads_or_packs():
    rows = [{"input_ids": [1, 3, 4], "labels": [IGN, 3, 4]}, {"input_ids": [1, 9], "labels": [IGN, 9]}]
    assert "attention_mask" in collate_rows(rows, pad_id=0)
    assert collate_rows(rows, pad_id=0, pack="rows")["input_ids"].tolist() == [[1, 3, 4], [1, 9, 1]]
    assert collate_rows(rows, pad_id=0, pack="flat")["input_ids"].tolist() == [[1, 3, 4, 1, 9]]
    with pytest.raises(ValueError, match="unknown packing layout 'wide'"):
        collate_rows(rows, pad_id=0, pack="wide")


def test_collate_packed_flat_layout_hand_computed():
    rows = [{"input_ids": [1, 3, 4], "labels": [IGN, 3, 4]},
            {"input_ids": [1, 5, 6, 7, 8], "labels": [1, 5, 6, 7, 8]},
            {"input_ids": [1, 9], "labels": [IGN, 9]}]
    batch = collate_packed(rows, "flat")  # in order, one row, no filler
    assert batch["input_ids"].tolist() == [[1, 3, 4, 1, 5, 6, 7, 8, 1, 9]]
    assert batch["labels"].tolist() == [[IGN, 3, 4, IGN, 5, 6, 7, 8, IGN, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4, 0, 1]]
    assert batch["sequence_index"].tolist() == [[0, 0, 0, 1, 1, 1, 1, 1, 2, 2]]
    assert batch["cu_seq_lens"].tolist() == [0, 3, 8, 10]
    assert "cu_seq_lens" not in collate_packed(rows, "rows")


def test_collate_shared_writes_each_common_prefix_once_hand_computed():
    a0 = {"input_ids": [1, 7, 8, 3, 4], "labels": [IGN, IGN, IGN, 3, 4]}
    b0 = {"input_ids": [1, 7, 8, 5], "labels": [IGN, IGN, IGN, 5]}
    a1 = {"input_ids": [1, 9, 6], "labels": [IGN, 9, 6]}  # b1 is a prefix of a1: shares 1 token,
    b1 = {"input_ids": [1, 9], "labels": [IGN, 9]}        # so that b1 keeps one of its own
    batch = collate_shared([(a0, b0), (a1, b1)])
    assert batch["input_ids"].tolist() == [[1, 7, 8, 3, 4, 5, 1, 9, 6, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3, 0, 1, 2, 1]]
    assert batch["sequence_index"].tolist() == [[0, 0, 0, 0, 0, 2, 1, 1, 1, 3]]
    assert batch["cu_seq_lens"].tolist() == [0, 5, 6, 9, 10]
    assert batch["shared_prefix_lens"] == (0, 3, 0, 1)
    assert int(batch["num_sequences"]) == 4
    # target j of a sequence is predicted at its token j - 1: a0's 3 at row 2, b0's 5 at row 2
    # too (its token 2 is the shared 8), a1's 9 and 6 at rows 6 and 7, b1's 9 at row 6.
    assert batch["target_positions"].tolist() == [2, 3, 2, 6, 7, 6]
    assert batch["target_ids"].tolist() == [3, 4, 5, 9, 6, 9]
    assert batch["target_owner"].tolist() == [0, 0, 2, 1, 1, 3]
    assert collate_rows([a0, a1, b0, b1], pad_id=0, pack="shared")["input_ids"].equal(
        batch["input_ids"])
    with pytest.raises(ValueError, match="odd number of rows"):
        collate_rows([a0, a1, b0], pad_id=0, pack="shared")
    with pytest.raises(ValueError, match="sequence 1: 1 labels for 4 tokens"):
        collate_shared([(a0, {"input_ids": [1, 7, 8, 5], "labels": [5]})])

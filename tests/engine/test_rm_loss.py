"""Reward-model stage: packed batches score every sequence as padded batches do."""

import pytest
import torch

from alignkit.engine.attention import flat_packing
from alignkit.data.collate import collate_preference
from alignkit.engine.forward import last_mlp
from alignkit.engine.rm_loss import (make_loss, pair_rewards, score_head,
                                    supports_last_rows_only)

pytestmark = pytest.mark.usefixtures("one_thread")


def pairs(n=5, seed=0):
    """Pairs of answers to a shared prompt of 0-4 tokens; the last pair's rejected answer is a
    prefix of its chosen one."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ex = {}
        prompt = torch.randint(1, 30, (int(torch.randint(0, 5, (1,), generator=g)),), generator=g)
        for key in ("chosen_", "rejected_"):
            ids = torch.randint(1, 30, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g)
            ex[f"{key}input_ids"] = prompt.tolist() + ids.tolist()
            ex[f"{key}labels"] = prompt.tolist() + ids.tolist()
        out.append(ex)
    out[-1]["rejected_input_ids"] = out[-1]["rejected_labels"] = out[-1]["chosen_input_ids"][:-2]
    return out


@pytest.mark.parametrize("last_rows_only", [False, True])
@pytest.mark.parametrize("layout", ["rows", "flat", "shared"])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "llama-gqa"])
def test_packed_scores_and_gradients_equal_padded(arch, layout, last_rows_only, tiny_lm):
    from transformers import AutoModelForSequenceClassification

    config = tiny_lm(arch).config
    config.num_labels = 1
    scores, grads = [], []
    for pack in (None, layout):
        torch.manual_seed(1)
        model = AutoModelForSequenceClassification.from_config(config)
        assert flat_packing(model) or pack != "flat"  # flat rows run alignkit_sdpa
        batch = collate_preference(pairs(), pad_id=0, pack=pack)
        only = last_rows_only and pack is not None
        chosen, rejected = pair_rewards(model, batch, only)
        out = make_loss(0.0, only)(model, batch)
        (out.values.sum() + (chosen * torch.arange(1.0, 6.0)).sum()).backward()
        scores.append(torch.cat([chosen, rejected]).detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    rows = batch["input_ids"].shape[0]  # 10 sequences really were packed into fewer rows
    assert rows == 1 if layout != "rows" else 1 < rows < 10
    if layout == "shared":  # each prompt once
        assert batch["input_ids"].numel() == sum(
            len(e["chosen_input_ids"]) + len(e["rejected_input_ids"]) for e in pairs()) - sum(
            batch["shared_prefix_lens"]) and sum(batch["shared_prefix_lens"]) >= 12
    assert torch.allclose(scores[0], scores[1], atol=1e-5, rtol=0)
    assert torch.allclose(grads[0], grads[1], atol=1e-5, rtol=1e-4)
    assert score_head(model) is model.score


def test_packed_scores_through_a_lora_reward_model(tiny_lm):
    from transformers import AutoModelForSequenceClassification

    from alignkit.engine.models import LoraSpec, apply_lora

    config = tiny_lm("llama").config
    config.num_labels = 1
    torch.manual_seed(1)
    model = apply_lora(AutoModelForSequenceClassification.from_config(config),
                       LoraSpec(enabled=True, r=4), task_type="SEQ_CLS")
    torch.nn.init.normal_(score_head(model).modules_to_save["default"].weight)
    padded = torch.cat(pair_rewards(model, collate_preference(pairs(), pad_id=0)))
    for layout in ("rows", "flat", "shared"):
        flat_packing(model)
        assert supports_last_rows_only(model, layout)  # the adapted MLP is still per token
        for only in (False, True):
            batch = collate_preference(pairs(), pad_id=0, pack=layout)
            packed = torch.cat(pair_rewards(model, batch, only))
            assert torch.allclose(padded, packed, atol=1e-5, rtol=0)


def test_the_last_mlp_runs_at_the_scored_tokens_only(tiny_lm):
    from transformers import AutoModelForSequenceClassification

    config = tiny_lm("gpt2").config
    config.num_labels = 1
    model = AutoModelForSequenceClassification.from_config(config)
    flat_packing(model)
    mlp = last_mlp(model)
    assert mlp is model.transformer.h[-1].mlp
    seen = []
    hook = mlp.c_fc.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[-2]))
    batch = collate_preference(pairs(), pad_id=0, pack="flat")
    pair_rewards(model, batch, last_rows_only=True)
    pair_rewards(model, batch)
    hook.remove()
    assert seen == [10, batch["input_ids"].shape[1]]  # 10 sequences: 10 last tokens, then all
    assert supports_last_rows_only(model, "flat") and supports_last_rows_only(model, "shared")
    # A last layer whose MLP mixes tokens (a running sum over positions) fails the check.
    inner = model.transformer.h[-1].mlp

    class Mixing(torch.nn.Module):
        def forward(self, x):
            return inner(x).cumsum(-2)

    model.transformer.h[-1].mlp = Mixing()
    assert not supports_last_rows_only(model, "flat")

    class Routed(torch.nn.Module):  # returns (output, router logits), as some experts layers do
        def forward(self, x):
            return inner(x), x[..., :2]

    model.transformer.h[-1].mlp = Routed()
    assert not supports_last_rows_only(model, "flat")
    model.transformer.h[-1].mlp = inner
    model.gradient_checkpointing_enable()  # would re-run the MLP in backward, unhooked
    assert not supports_last_rows_only(model, "flat")

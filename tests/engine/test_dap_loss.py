"""DAP losses on batches: reference caching, no reference calls in training steps, every registered loss runs."""

import pytest
import torch

from alignkit.data.collate import to_device
from alignkit.math.losses import dpo_loss
from alignkit.engine.dap_loss import (LossConfig, add_kto_mismatch, cache_reference, collate_dap,
                                      completion_logps, make_loss, unpair)
from alignkit.math.losses import DAP_LOSSES, kto_reference_point
from alignkit.engine.training import LoopConfig, OptimConfig, make_accelerator, train
from alignkit.tracking import Tracker

PAD = 0


def tiny_model(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=30, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=4, pad_token_id=PAD))


def pref_examples(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        prompt = torch.randint(3, 30, (int(torch.randint(2, 5, (1,), generator=g)),), generator=g).tolist()
        ex = {}
        for key in ("chosen_", "rejected_"):
            comp = torch.randint(3, 30, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g).tolist()
            ex[f"{key}input_ids"] = prompt + comp
            ex[f"{key}labels"] = [-100] * len(prompt) + comp
        out.append(ex)
    return out


def unpaired_examples(n=8):
    out = []
    for i, ex in enumerate(pref_examples(n)):
        out.append({"input_ids": ex["chosen_input_ids"], "labels": ex["chosen_labels"],
                    "label": i % 2 == 0})
    return out


@pytest.mark.parametrize("pack", [None, "rows", "flat", "shared"])
def test_cached_reference_is_deterministic_and_matches_inline_forward(pack):
    from alignkit.engine.attention import flat_packing

    ref = tiny_model()
    flat_packing(ref)
    a, b = pref_examples(), pref_examples()
    cache_reference(ref, a, PAD, batch_size=3, pack=pack)
    cache_reference(ref, b, PAD, batch_size=3, pack=pack)
    assert [e["ref_chosen_logps"] for e in a] == [e["ref_chosen_logps"] for e in b]  # bit-identical
    # Independent formulation: one unpadded sequence at a time, log_softmax written out.
    for e in a:
        ids = torch.tensor([e["chosen_input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(ref(input_ids=ids).logits[0, :-1].double(), -1)
        labels = e["chosen_labels"][1:]
        expect = sum(float(logp[t, y]) for t, y in enumerate(labels) if y != -100)
        assert e["ref_chosen_logps"] == pytest.approx(expect, abs=2e-5)


def test_dpo_loss_through_the_stage_equals_the_pure_function():
    ref, policy = tiny_model(0), tiny_model(1)
    ex = pref_examples(4)
    cache_reference(ref, ex, PAD)
    batch = collate_dap(ex, PAD)
    out = make_loss(LossConfig(name="dpo", beta=0.3))(policy, batch)
    logps, _ = completion_logps(policy, batch)
    expect = dpo_loss(logps[:4], logps[4:], batch["ref_chosen_logps"].float(),
                      batch["ref_rejected_logps"].float(), 0.3)
    assert torch.allclose(out.values, expect, atol=1e-6)
    # policy == reference gives h = 0 and loss = log 2 for every pair
    same = make_loss(LossConfig(name="dpo", beta=0.3))(ref, batch)
    assert torch.allclose(same.values, torch.full((4,), 0.6931472), atol=1e-5)


class CountingModel(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)


@pytest.mark.parametrize("name", sorted(DAP_LOSSES))
def test_every_loss_trains_without_calling_the_reference(tmp_path, name):
    ref = CountingModel(tiny_model(0))
    needs = DAP_LOSSES[name]
    ex = pref_examples(8) if needs.paired else unpaired_examples(8)
    if not needs.paired:
        add_kto_mismatch(ex)
    if needs.reference:
        cache_reference(ref, ex, PAD)
    calls_after_cache = ref.calls
    policy = tiny_model(0)
    before = make_loss(LossConfig(name=name))(policy, collate_dap(ex, PAD)).values.mean().item()
    acc = make_accelerator("no")
    result = train(policy, ex, lengths=[len(e.get("input_ids", e.get("chosen_input_ids"))) for e in ex],
                   collate=lambda b: collate_dap(b, PAD), weight_of=lambda e: 1.0,
                   loss_fn=make_loss(LossConfig(name=name)),
                   loop=LoopConfig(max_steps=8, batch_size=8, micro_batch_size=4, mixed_precision="no",
                                   log_every=100),
                   optim=OptimConfig(lr=3e-3), out_dir=tmp_path, tracker=Tracker(tmp_path, enabled=False),
                   accelerator=acc)
    assert ref.calls == calls_after_cache  # no reference forward in any training step
    if name == "kto":   # totals of the step, not means: 4 desirable and 4 undesirable of 8
        assert (result.last_metrics["count/chosen"], result.last_metrics["count/rejected"]) == (4, 4)
    trained = acc.unwrap_model(policy)  # on the accelerator's device (a GPU where there is one)
    batch = to_device(collate_dap(ex, PAD), next(trained.parameters()).device)
    after = make_loss(LossConfig(name=name))(trained, batch).values.mean().item()
    assert after < before - 1e-3, (name, before, after)
    assert result.step == 8


def test_a_registered_dap_loss_trains_with_nothing_else_to_edit(monkeypatch):
    """A new DAP loss is one registered function: its config name validates, it is called by the
    names it declares (here the policy's and reference's summed log-probs and beta), and paired
    losses report the implicit rewards."""
    from alignkit.math import losses

    monkeypatch.setattr(losses, "LOSSES", dict(losses.LOSSES))
    monkeypatch.setattr(losses, "DAP_LOSSES", dict(losses.DAP_LOSSES))
    monkeypatch.setattr("alignkit.engine.dap_loss.DAP_LOSSES", losses.DAP_LOSSES)

    @losses.register("squared_margin", dap=losses.DAPNeeds())
    def squared_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                       ref_rejected_logps, beta):
        margin = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
        return (beta * margin - 1.0) ** 2

    ex = pref_examples(4)
    cache_reference(tiny_model(1), ex, PAD)
    batch = collate_dap(ex, PAD)
    out = make_loss(LossConfig(name="squared_margin", beta=0.5))(tiny_model(0), batch)
    chosen, rejected = completion_logps(tiny_model(0), batch)[0].chunk(2)
    margin = (chosen - batch["ref_chosen_logps"].float()) - (rejected - batch["ref_rejected_logps"].float())
    torch.testing.assert_close(out.values, (0.5 * margin - 1.0) ** 2)
    assert set(out.metrics) == {"rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy"}


def test_kto_mismatch_pairs_prompt_with_next_completion():
    ex = unpaired_examples(3)
    add_kto_mismatch(ex)
    p0 = [t for t, l in zip(ex[0]["input_ids"], ex[0]["labels"]) if l == -100]
    c1 = [t for t, l in zip(ex[1]["input_ids"], ex[1]["labels"]) if l != -100]
    assert ex[0]["kl_input_ids"] == p0 + c1
    assert ex[0]["kl_labels"] == [-100] * len(p0) + c1


def test_unpaired_preference_pairs_mismatch_across_prompts():
    pairs = pref_examples(3)
    ex = unpair(pairs)
    assert [e["label"] for e in ex] == [True, False] * 3
    assert ex[2]["input_ids"] == pairs[1]["chosen_input_ids"]
    assert ex[3]["labels"] == pairs[1]["rejected_labels"]
    add_kto_mismatch(ex)

    def split(ids, labels):
        return ([t for t, l in zip(ids, labels) if l == -100], [t for t, l in zip(ids, labels) if l != -100])

    # the next example shares the prompt (same pair): its mismatch comes from the next pair
    expect = [2, 2, 4, 4, 0, 0]
    for i, e in enumerate(ex):
        prompt, completion = split(e["kl_input_ids"], e["kl_labels"])
        assert prompt == split(e["input_ids"], e["labels"])[0]
        assert completion == split(ex[expect[i]]["input_ids"], ex[expect[i]]["labels"])[1]
    # one prompt for all: nothing to mismatch with, so the next example
    same = unpair(pref_examples(1))
    add_kto_mismatch(same)
    assert same[0]["kl_input_ids"] == same[1]["input_ids"] and same[1]["kl_input_ids"] == same[0]["input_ids"]


def test_kto_metrics_are_trl_s_by_hand():
    ref, policy = tiny_model(0), tiny_model(1)
    ex = unpaired_examples(6)
    ex[4]["label"] = False   # desirable 0, 2; undesirable 1, 3, 4, 5
    add_kto_mismatch(ex)
    cache_reference(ref, ex, PAD)
    batch = collate_dap(ex, PAD)
    out = make_loss(LossConfig(name="kto", beta=0.2))(policy, batch)
    with torch.no_grad():
        logps = completion_logps(policy, batch)[0]
    ref_logps = torch.tensor([e["ref_logps"] for e in ex])
    rewards = 0.2 * (logps[:6] - ref_logps)
    m = {k: (float(s), c) for k, (s, c) in out.metrics.items()}
    assert m["rewards/chosen"][1] == 2 and m["rewards/rejected"][1] == 4
    assert m["rewards/chosen"][0] == pytest.approx(float(rewards[0] + rewards[2]), abs=1e-5)
    assert m["rewards/rejected"][0] == pytest.approx(float(rewards[[1, 3, 4, 5]].sum()), abs=1e-5)
    assert m["logps/chosen"][0] == pytest.approx(float(logps[0] + logps[2]), abs=1e-5)
    z0 = kto_reference_point(logps[6:], torch.tensor([e["ref_kl_logps"] for e in ex]))
    assert m["kl"] == (pytest.approx(float(z0), abs=1e-6), 1)
    assert (m["count/chosen"], m["count/rejected"]) == ((2.0, None), (4.0, None))


@pytest.mark.parametrize("layout", ["rows", "flat", "shared"])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "llama-gqa"])
def test_packed_batch_gives_the_padded_log_probs_and_gradients(arch, layout, tiny_lm):
    from alignkit.engine.attention import flat_packing

    ex = pref_examples(6)
    # Shared beyond the prompt: answers that start alike, and one that is the other's prefix.
    ex[1]["rejected_input_ids"][-2:] = ex[1]["chosen_input_ids"][-2:]
    ex[1]["rejected_labels"][-2:] = ex[1]["chosen_labels"][-2:]
    ex[2]["rejected_input_ids"] = ex[2]["chosen_input_ids"][:len(ex[2]["chosen_input_ids"]) - 1]
    ex[2]["rejected_labels"] = ex[2]["chosen_labels"][:len(ex[2]["chosen_input_ids"]) - 1]
    grads, sums = [], []
    for pack in (None, layout):
        model = tiny_lm(arch)
        flat_packing(model)
        batch = collate_dap(ex, PAD, pack)
        logps, counts = completion_logps(model, batch)
        (logps * torch.arange(1.0, 13.0)).sum().backward()
        sums.append((logps.detach(), counts))
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert "sequence_index" in collate_dap(ex, PAD, layout)
    assert torch.equal(sums[0][1], sums[1][1])
    assert torch.allclose(sums[0][0], sums[1][0], atol=1e-5, rtol=0)
    assert torch.allclose(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_shared_layout_log_probs_without_logits_to_keep(tiny_lm):
    """A forward that does not take ``logits_to_keep`` (e.g. a wrapper) gets all the logits and
    the targets are read from them: the same log-probs."""
    from alignkit.engine.attention import flat_packing

    class Wrapped(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, **kwargs):
            assert "logits_to_keep" not in kwargs
            return self.inner(**kwargs)

    model = tiny_lm("gpt2")
    flat_packing(model)
    batch = collate_dap(pref_examples(4), PAD, "shared")
    direct, wrapped = completion_logps(model, batch), completion_logps(Wrapped(model), batch)
    assert torch.equal(direct[1], wrapped[1])
    assert torch.allclose(direct[0], wrapped[0], atol=1e-6, rtol=0)

"""ReST: reward-weighted BC against a direct formulation, and the stage end to end: resume skips
finished Grow/Improve steps and equals an uninterrupted run; the guard keeps the best model when
it stops a run. (Filtering: tests/engine/rl/test_filtering.py; the guard itself: tests/engine/rl/test_guard.py.)"""

import json
import math

import pytest
import torch

from alignkit.config import build
from alignkit.stages import rest

# ---------------------------------------------------------------------------------------------
# Reward-weighted BC through the one reduction.


def _tiny_lm(vocab=64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=4, pad_token_id=0))


@pytest.mark.parametrize("pack", [None, "rows", "flat"])
def test_reward_weighted_bc_matches_direct_formula_and_bc_is_weight_one(pack):
    from alignkit.engine.attention import flat_packing
    from alignkit.math.losses import reduce_loss
    from alignkit.engine.lm_loss import (causal_lm_loss, collate_weighted, n_targets,
                                         weighted_causal_lm_loss)

    model = _tiny_lm().eval()
    flat_packing(model)
    ex = [{"input_ids": [1, 5, 6, 7, 2], "labels": [-100, -100, 6, 7, 2], "weight": 1.0},
          {"input_ids": [1, 9, 3, 2], "labels": [-100, 3, 3, 2], "weight": 0.25},
          {"input_ids": [1, 8], "labels": [-100, 8], "weight": 0.5}]
    batch = collate_weighted(ex, pad_id=0, pack=pack)
    # rows: [5], [4 + filler], [2 + filler]; flat: one row of 11
    assert batch["input_ids"].shape == {None: (3, 5), "rows": (3, 5), "flat": (1, 11)}[pack]
    out = weighted_causal_lm_loss(model, batch)
    tokens = sum(n_targets(e) for e in ex)
    loss = reduce_loss(out.values, out.weights, tokens)
    # Direct: per-sequence summed NLL from a plain log_softmax, weighted, over all target tokens.
    expected = 0.0
    for e in ex:
        logits = model(input_ids=torch.tensor([e["input_ids"]])).logits[0, :-1]
        logp = torch.log_softmax(logits.double(), -1)
        nll = sum(-logp[t, y] for t, y in enumerate(e["labels"][1:]) if y != -100)
        expected += e["weight"] * float(nll.detach())
    assert float(loss.detach()) == pytest.approx(expected / tokens, rel=1e-5)
    ones = collate_weighted([{**e, "weight": 1.0} for e in ex], pad_id=0, pack=pack)
    bc, plain = weighted_causal_lm_loss(model, ones), causal_lm_loss(model, ones)
    assert torch.equal(bc.weights, plain.weights) and torch.equal(bc.values, plain.values)


# ---------------------------------------------------------------------------------------------
# The stage end to end on a tiny model (rewards from a Python function: response length).

PROXY_MODULE = '''
def length(prompts, responses):
    return [float(len(r)) for r in responses]
'''


@pytest.fixture
def proxy_module(tmp_path, monkeypatch):
    (tmp_path / "rest_test_rewards.py").write_text(PROXY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "python:rest_test_rewards:length"


def _cfg(model, out, reward, **extra):
    data = {
        "model": str(model), "out_dir": str(out), "reward": reward, "task": "sentiment",
        "grow_steps": 2,
        "grow": {"num_prompts": 6, "samples_per_prompt": 4, "sampling": {"max_new_tokens": 10}},
        "filter": {"schedule": "percentile", "thresholds": [25, 50], "require_finished": False},
        "improve": {"lr_decay": 0.5, "max_length": 96, "optim": {"lr": 3e-3, "warmup_steps": 0},
                    "train": {"epochs": 1.0, "batch_size": 4, "micro_batch_size": 4,
                              "mixed_precision": "no", "log_every": 1}},
        "eval": {"num_prompts": 4, "success_at": 0.0, "sampling": {"max_new_tokens": 10}},
        **extra}
    return build(rest.Config, data)


def _weights(path):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(path))
    return torch.cat([p.detach().flatten() for p in m.parameters()])


def _counting(monkeypatch, name):
    calls = []
    real = getattr(rest, name)

    def wrapped(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(rest, name, wrapped)
    return calls, real


def test_rest_resume_skips_finished_steps_and_equals_uninterrupted(tiny_base, tmp_path,
                                                                   proxy_module, monkeypatch):
    grows, _ = _counting(monkeypatch, "grow")
    straight = rest.main(_cfg(tiny_base, tmp_path / "straight", proxy_module))
    assert len(grows) == 2 and straight["steps"] == 4
    rows = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert [r["lr"] for r in rows[1:]] == pytest.approx([3e-3, 1.5e-3, 3e-3, 1.5e-3])
    assert all(rows[k]["kept"] < rows[k - 1]["kept"] for k in (2, 4))   # tau rises within a Grow
    assert rows[0]["kl_to_ref"] == 0.0 and rows[4]["kl_to_ref"] != 0.0   # k1 on 4 samples: any sign
    grown = (tmp_path / "straight" / "grow_1" / "grown.jsonl").read_text().splitlines()
    assert len(grown) == 24 and {"prompt", "response", "reward", "gold_reward"} <= set(json.loads(grown[0]))
    last = [json.loads(x) for x in
            (tmp_path / "straight" / "grow_1" / "improve_1" / "samples.jsonl").read_text().splitlines()]
    assert rows[4]["gold_success_mean"] == pytest.approx(
        sum(r["gold_reward"] >= 0.0 for r in last) / len(last))

    # Crash in the first Improve step of Grow 1 (step 3), after that Grow step wrote its data.
    grows.clear()
    real_improve = rest.improve

    def crash_at_step_3(policy, examples, cfg, i, k, *a, **kw):
        if k == 3:
            raise RuntimeError("killed")
        return real_improve(policy, examples, cfg, i, k, *a, **kw)

    monkeypatch.setattr(rest, "improve", crash_at_step_3)
    with pytest.raises(RuntimeError, match="killed"):
        rest.main(_cfg(tiny_base, tmp_path / "resumed", proxy_module))
    assert len(grows) == 2
    grows.clear()
    monkeypatch.setattr(rest, "improve", real_improve)
    trains, _ = _counting(monkeypatch, "improve")
    resumed = rest.main(_cfg(tiny_base, tmp_path / "resumed", proxy_module))
    assert len(grows) == 0                          # grow_1/grown.jsonl was reused
    assert len(trains) == 2                         # only steps 3 and 4 trained again
    assert torch.equal(_weights(tmp_path / "straight" / "model"), _weights(tmp_path / "resumed" / "model"))
    assert resumed["proxy_reward_mean"] == pytest.approx(straight["proxy_reward_mean"])
    again = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in again] == [0, 1, 2, 3, 4]   # no duplicated rows
    # A finished run does nothing on a third call.
    grows.clear(), trains.clear()
    rest.main(_cfg(tiny_base, tmp_path / "resumed", proxy_module))
    assert grows == [] and trains == []


def test_guard_stop_keeps_the_best_heldout_model(tiny_base, tmp_path, proxy_module, monkeypatch):
    # (proxy, held-out) per evaluation: step 0 = SFT, then held-out peaks at step 1.
    script = iter([(0.0, 0.50), (1.0, 0.60), (2.0, 0.55), (3.0, 0.50), (4.0, 0.45)])

    def scripted(policy, reference, tokenizer, prompts, cfg, judges):
        p, h = next(script)
        return {"proxy_reward_mean": p, "gold_reward_mean": h, "kl_to_ref": p / 10}, []

    monkeypatch.setattr(rest, "evaluate", scripted)
    out = tmp_path / "run"
    summary = rest.main(_cfg(tiny_base, out, proxy_module, guard={"patience": 2, "stop": True}))
    assert summary["guard_fired_at"] == 3 and summary["guard_stopped"] is True
    assert summary["final_step"] == 1 and summary["gold_reward_mean"] == pytest.approx(0.60)
    assert not (out / "grow_1" / "improve_1").exists()          # stopped before step 4
    assert torch.equal(_weights(out / "model"), _weights(out / "grow_0" / "improve_0" / "model"))
    assert not torch.equal(_weights(out / "model"), _weights(out / "grow_1" / "improve_0" / "model"))
    figs = rest.figures(out)
    assert len(figs) == 1 and "guard fired" in figs[0][0]
    assert math.isclose(json.loads((out / "metrics.json").read_text())["kl_to_ref"], 0.1)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_grown_data_round_trips_through_disk(tmp_path, fmt):
    rows = [{"prompt": "p", "response": "r", "reward": 0.25, "finished": True, "sample": 0},
            {"prompt": "q", "response": "s t", "reward": -1.5, "finished": False, "sample": 1}]
    path = rest.grown_path(tmp_path, 3, fmt)
    rest.save_grown(rows, path)
    assert path.name == f"grown.{fmt}" and path.parent.name == "grow_3"
    assert rest.load_grown(path) == rows
    assert not list(path.parent.glob("*.tmp"))

"""ReST: normalisation and threshold schedules (hand values), the reward-hacking guard on
scripted sequences, reward-weighted BC against a direct formulation, and the stage end to end:
resume skips finished Grow/Improve steps and equals an uninterrupted run; the guard keeps the
best model when it stops a run."""

import json
import math

import numpy as np
import pytest
import torch

from alignkit.config import ConfigError, build
from alignkit.stages import rest
from alignkit.stages.rest import FilterConfig, HackingGuard, keep_mask, normalize_rewards, select

# ---------------------------------------------------------------------------------------------
# Normalisation and filtering.


def test_minmax_normalisation_hand_values():
    np.testing.assert_allclose(normalize_rewards([1.0, 2.0, 3.0, 5.0], "minmax"),
                               [0.0, 0.25, 0.5, 1.0], atol=1e-12)
    np.testing.assert_allclose(normalize_rewards([-3.0, -1.0], "minmax"), [0.0, 1.0])
    # All equal: no ranking, everything maps to 0 (so an absolute threshold keeps nothing).
    np.testing.assert_array_equal(normalize_rewards([0.7, 0.7, 0.7], "minmax"), [0.0, 0.0, 0.0])


def test_range_normalisation_is_fixed_and_clipped():
    np.testing.assert_allclose(normalize_rewards([-1.0, 5.0, 12.0, 2.5], "range", [0.0, 10.0]),
                               [0.0, 0.5, 1.0, 0.25], atol=1e-12)
    # Independent of the other samples in the set (unlike min-max).
    assert normalize_rewards([5.0], "range", [0.0, 10.0])[0] == pytest.approx(0.5)


def test_prompt_minmax_normalises_within_each_prompt_and_selects_the_best_per_prompt():
    rewards = [1.0, 3.0, 2.0, 10.0, 30.0, 20.0, 5.0, 5.0]
    groups = ["a", "a", "a", "b", "b", "b", "c", "c"]
    np.testing.assert_allclose(normalize_rewards(rewards, "prompt_minmax", groups=groups),
                               [0.0, 1.0, 0.5, 0.0, 1.0, 0.5, 0.0, 0.0], atol=1e-12)
    grown = [{"prompt": g, "response": "x", "reward": r, "finished": True}
             for g, r in zip(groups, rewards)]
    raft = FilterConfig(normalize="prompt_minmax", thresholds=[0.99])   # RAFT: best of N per prompt
    assert select(grown, raft, 0)[0] == [1, 4]


def test_absolute_threshold_is_strict():
    norm = np.array([0.0, 0.25, 0.5, 1.0])
    assert keep_mask(norm, 0.5, "absolute").tolist() == [False, False, False, True]
    assert keep_mask(norm, 0.0, "absolute").tolist() == [False, True, True, True]
    assert keep_mask(norm, 0.2, "absolute").tolist() == [False, True, True, True]


def test_percentile_threshold_hand_values_and_ties():
    norm = np.array([0.0, 0.25, 0.5, 1.0])
    # 50th percentile of (0, .25, .5, 1) is .375 (linear interpolation).
    assert keep_mask(norm, 50, "percentile").tolist() == [False, False, True, True]
    assert keep_mask(norm, 0, "percentile").all()
    assert keep_mask(norm, 100, "percentile").tolist() == [False, False, False, True]
    # Verifier-style ties at the cut: every tied sample stays.
    ties = np.array([0.0, 1.0, 1.0, 1.0])
    assert keep_mask(ties, 50, "percentile").tolist() == [False, True, True, True]


def _grown(rewards, finished=None, responses=None):
    n = len(rewards)
    finished = finished or [True] * n
    responses = responses or [f"r{j}" for j in range(n)]
    return [{"prompt": "p", "response": r, "reward": x, "finished": f}
            for x, f, r in zip(rewards, finished, responses)]


def test_rising_schedule_keeps_nested_shrinking_sets():
    rewards = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0]
    cfg = FilterConfig(schedule="absolute", thresholds=[0.0, 0.45, 0.85])
    kept = [select(_grown(rewards), cfg, i)[0] for i in range(3)]
    assert kept[0] == list(range(1, 11))
    assert kept[1] == [5, 6, 7, 8, 9, 10]          # normalised .5 .. 1 > .45
    assert kept[2] == [9, 10]                      # .9, 1 > .85
    assert set(kept[2]) < set(kept[1]) < set(kept[0])
    pct = FilterConfig(schedule="percentile", thresholds=[0, 50, 90])
    assert [len(select(_grown(rewards), pct, i)[0]) for i in range(3)] == [11, 6, 2]


def test_select_drops_unfinished_and_empty_responses():
    grown = _grown([1.0, 9.0, 8.0, 7.0], finished=[True, False, True, True],
                   responses=["a", "b", "   ", "d"])
    cfg = FilterConfig(thresholds=[0.0])
    assert select(grown, cfg, 0)[0] == [3]         # 9 unfinished, 8 empty, 1 is the minimum
    keep_cut = FilterConfig(thresholds=[0.0], require_finished=False)
    assert select(grown, keep_cut, 0)[0] == [1, 3]


@pytest.mark.parametrize("section, message", [
    ({"thresholds": [0.5, 0.3]}, "must rise"),
    ({"thresholds": [0.5, 1.5]}, "lie in"),
    ({"schedule": "percentile", "thresholds": [50, 120]}, "lie in"),
    ({"thresholds": []}, "one threshold"),
    ({"normalize": "range"}, "filter.range"),
])
def test_filter_config_refuses_bad_schedules(section, message):
    with pytest.raises(ConfigError, match=message):
        build(FilterConfig, section)


# ---------------------------------------------------------------------------------------------
# The guard.


def _run_guard(seq, **kw):
    g = HackingGuard(**kw)
    return [g.update(p, h) for p, h in seq]


def test_guard_fires_when_heldout_falls_while_proxy_rises():
    # SFT, then gold up twice (healthy), then proxy up + gold down three times (hacking).
    seq = [(0.0, 0.40), (0.5, 0.50), (1.0, 0.55), (1.5, 0.52), (2.0, 0.48), (2.5, 0.40)]
    d = _run_guard(seq, patience=2)
    assert [x.streak for x in d] == [0, 0, 0, 1, 2, 3]
    assert [x.fired for x in d] == [False, False, False, False, True, True]
    assert not any(x.stop for x in d)              # warn only unless configured to stop
    assert d[-1].best_step == 2 and d[-1].best_heldout == pytest.approx(0.55)
    stopped = _run_guard(seq, patience=2, stop=True)
    assert [x.stop for x in stopped].index(True) == 4


def test_guard_quiet_on_a_healthy_run_and_on_interrupted_declines():
    healthy = [(0.0, 0.40), (0.3, 0.45), (0.6, 0.47), (0.9, 0.52), (1.2, 0.55)]
    assert not any(x.fired for x in _run_guard(healthy, patience=1))
    # Both fall (a bad step, not hacking) and a decline broken by a recovery: the streak resets.
    mixed = [(0.0, 0.5), (0.5, 0.45), (0.4, 0.40), (0.8, 0.38), (1.0, 0.45), (1.2, 0.44)]
    d = _run_guard(mixed, patience=2)
    assert [x.streak for x in d] == [0, 1, 0, 1, 0, 1]
    assert not any(x.fired for x in d)


def test_guard_min_delta_ignores_noise():
    seq = [(0.0, 0.50), (1.0, 0.495), (2.0, 0.49), (3.0, 0.485)]
    assert _run_guard(seq, patience=2)[-1].fired
    assert not _run_guard(seq, patience=2, min_delta=0.01)[-1].fired


# ---------------------------------------------------------------------------------------------
# Reward-weighted BC through the one reduction.


def _tiny_lm(vocab=64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=4, pad_token_id=0))


def test_reward_weighted_bc_matches_direct_formula_and_bc_is_weight_one():
    from alignkit.losses import reduce_loss
    from alignkit.stages.sft import causal_lm_loss, n_targets

    model = _tiny_lm().eval()
    ex = [{"input_ids": [1, 5, 6, 7, 2], "labels": [-100, -100, 6, 7, 2], "weight": 1.0},
          {"input_ids": [1, 9, 3, 2], "labels": [-100, 3, 3, 2], "weight": 0.25}]
    batch = rest.collate_weighted(ex, pad_id=0)
    out = rest.weighted_causal_lm_loss(model, batch)
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
    ones = rest.collate_weighted([{**e, "weight": 1.0} for e in ex], pad_id=0)
    bc, plain = rest.weighted_causal_lm_loss(model, ones), causal_lm_loss(model, ones)
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
        "eval": {"num_prompts": 4, "sampling": {"max_new_tokens": 10}},
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

"""Online / iterative DPO: rounds on disk, resume (a finished round is never redone, an
interrupted one reuses its labels, resumed == uninterrupted), the labelers (simulated, reward
source, pairwise judge) and the preference store."""

import json

import pytest
import torch

from alignkit.config import ConfigError, build
from alignkit.data.store import PreferenceStore
from alignkit.stages import dpo
from alignkit.feedback.labelers import label_with, store_source
from alignkit.stages.dpo import round_prompts
from alignkit.tasks import get_task

PER_ROUND = 6


def n_chars_parity(prompts, responses):
    """A ``python:`` reward source with many ties: 1 for an odd-length response, else 0."""
    return [float(len(r) % 2) for r in responses]


def n_words(prompts, responses):
    return [float(len(r.split())) for r in responses]


def _cfg(model, out, **online):
    return build(dpo.Config, {
        "model": str(model), "out_dir": str(out),
        "data": {"train": "online", "max_length": 64},
        "online": {"rounds": 2, "prompts_per_round": PER_ROUND, "labeler": "simulated",
                   "sampling": {"max_new_tokens": 8}, **online},
        "eval": {"task": "sentiment", "num_prompts": 2, "sampling": {"max_new_tokens": 4}},
        "train": {"epochs": 1.0, "batch_size": 4, "micro_batch_size": 4, "mixed_precision": "no",
                  "log_every": 1},
        "optim": {"lr": 3e-3, "warmup_steps": 0}})


def _weights(path):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(path))
    return torch.cat([p.detach().flatten() for p in m.parameters()])


def _records(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def _spy_sampling(mp, calls):
    """Record every round's sampled pairs and the policy weights they were sampled from."""
    import alignkit.engine.sampling as sampling

    real = sampling.sample_pairs

    def spy(policy, *args, **kwargs):
        pairs = real(policy, *args, **kwargs)
        calls.append({"weights": torch.cat([p.detach().flatten() for p in policy.parameters()]),
                      "pairs": pairs})
        return pairs

    mp.setattr(sampling, "sample_pairs", spy)


def _valid(pairs):
    return [p for p in pairs if p["response_a"].strip() and p["response_b"].strip()
            and p["response_a"] != p["response_b"]]


def _pair_keys(records):
    return {(r["prompt"], frozenset((r["chosen"], r["rejected"]))) for r in records}


@pytest.fixture(scope="module")
def straight(tiny_base, tmp_path_factory):
    """An uninterrupted 2-round run with the simulated labeler and a store."""
    root = tmp_path_factory.mktemp("online_straight")
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        _spy_sampling(mp, calls)
        summary = dpo.main(_cfg(tiny_base, root / "run", store=str(root / "prefs.db")))
    return {"out": root / "run", "store": root / "prefs.db", "summary": summary, "calls": calls}


# ---------------------------------------------------------------------------------------------
# Pure helpers.


def test_round_prompts_take_consecutive_slices_and_wrap():
    prompts = ["p0", "p1", "p2", "p3", "p4"]
    assert round_prompts(prompts, 0, 2) == ["p0", "p1"]
    assert round_prompts(prompts, 1, 2) == ["p2", "p3"]
    assert round_prompts(prompts, 2, 2) == ["p4", "p0"]
    assert round_prompts(prompts, 0, 7) == prompts          # never a prompt twice in a round


def test_reward_labeler_chooses_the_higher_score_and_drops_ties():
    label = label_with(f"python:{__name__}:n_words", None, 0.2, 0)
    prompts = ["p0", "p1", "p2", "p3"]
    a = ["one two three", "x", "u v", "same words"]
    b = ["four", "y z", "w q", "other words"]
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in label(prompts, a, b)] == [
        ("p0", "one two three", "four"), ("p1", "y z", "x")]        # p2, p3 tie on 2 words


def test_store_source_of_each_labeler():
    assert store_source("simulated") == "simulated"
    assert store_source("gold:sentiment") == "simulated"    # a noiseless simulated annotator
    for spec in ("model:runs/rm/model", "python:m:f", "judge:j.yaml", "pairwise-judge:j.yaml"):
        assert store_source(spec) == "ai"


def test_pairwise_judge_spec_routes_to_the_pairwise_labeler(monkeypatch):
    import alignkit.engine.judges as judges

    from alignkit.engine.workers import WorkersConfig

    seen = []

    def fake(spec, workers=None):
        seen.append((spec, workers))
        return lambda p, a, b: [{"prompt": p[0], "chosen": b[0], "rejected": a[0]}]

    monkeypatch.setattr(judges, "make_judge_labeler", fake)
    workers = WorkersConfig(backend="ray", num=3)    # the stage's workers reach the judge
    label = label_with("pairwise-judge:configs/judge.yaml", None, 0.2, 0, workers=workers)
    assert seen == [("configs/judge.yaml", workers)]
    assert label(["p"], ["a"], ["b"]) == [{"prompt": "p", "chosen": "b", "rejected": "a"}]


@pytest.mark.parametrize("chat", [False, True])
def test_training_examples_start_with_the_prompt_tokens_the_policy_sampled_from(tiny_base, chat):
    """Sampling and training tokenise a prompt alike (chat template or plain text), so DPO's
    log-probs are those of the responses the policy actually wrote."""
    from alignkit.data.formats import build_dataset
    from alignkit.engine.models import load_tokenizer
    from alignkit.engine.sampling import encode_prompts

    tok = load_tokenizer(tiny_base)
    records = [{"prompt": "I watched it", "chosen": " a great film.", "rejected": " dull."}]
    [ex], _ = build_dataset(records, tok, format="preference", max_length=64, chat=chat)
    [sampled] = encode_prompts(["I watched it"], tok, chat)
    n = len(sampled)
    for key in ("chosen", "rejected"):
        assert ex[f"{key}_input_ids"][:n] == sampled
        assert ex[f"{key}_labels"][:n] == [-100] * n and ex[f"{key}_labels"][n] != -100
    # The two encodings differ (the chat template wraps the prompt): the switch matters.
    [other] = encode_prompts(["I watched it"], tok, not chat)
    assert other != sampled


def test_online_config_refuses_a_fixed_resume_path_and_a_missing_task(tiny_base, tmp_path):
    with pytest.raises(ConfigError, match="train.resume"):
        build(dpo.Config, {"model": str(tiny_base), "online": {"rounds": 2},
                           "eval": {"task": "sentiment"}, "train": {"resume": "ckpt/step_4"}})
    with pytest.raises(ConfigError, match="eval.task"):
        build(dpo.Config, {"model": str(tiny_base), "online": {"rounds": 2}})


# ---------------------------------------------------------------------------------------------
# The stage end to end.


def test_two_rounds_write_pairs_metrics_and_models(straight, tiny_base):
    out, calls = straight["out"], straight["calls"]
    assert len(calls) == 2                                  # one sampling per round
    task_prompts = get_task("sentiment").prompts("train", 2 * PER_ROUND)
    weights = [_weights(tiny_base)]
    for r in range(2):
        rd = out / f"round_{r}"
        records = _records(rd / "pairs.jsonl")
        samples = {p["prompt"]: p for p in _valid(calls[r]["pairs"])}
        assert [p["prompt"] for p in calls[r]["pairs"]] == round_prompts(task_prompts, r, PER_ROUND)
        # Bradley-Terry at temperature 0.2 never ties: every valid pair is labelled, once, and its
        # chosen/rejected are the two samples, the label naming the sampled slot that won.
        assert len(records) == len(samples) > 0
        for rec in records:
            s = samples[rec["prompt"]]
            assert {rec["chosen"], rec["rejected"]} == {s["response_a"], s["response_b"]}
            assert rec["chosen"] == s["response_a" if rec["label"] == "a" else "response_b"]
            assert rec["chosen"] != rec["rejected"] and 0.0 < rec["label_prob"] < 1.0
        metrics = json.loads((rd / "metrics.json").read_text())
        assert metrics["round"] == r and metrics["pairs"] == len(records)
        assert "gold_reward_mean" in metrics and "kl_to_ref" in metrics
        weights.append(_weights(rd / "model"))
    # Each round trained: base != round 0 != round 1 == final model.
    assert not torch.equal(weights[0], weights[1]) and not torch.equal(weights[1], weights[2])
    assert torch.equal(weights[2], _weights(out / "model"))
    assert torch.equal(calls[1]["weights"], weights[1])    # round 1 sampled round 0's policy
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(x["step"], x["round"]) for x in rows] == [(1, 0), (2, 1)]
    assert straight["summary"]["rounds"] == 2 and straight["summary"]["round"] == 1


def test_store_records_every_labelled_pair_as_simulated(straight):
    records = [rec for r in range(2) for rec in _records(straight["out"] / f"round_{r}" / "pairs.jsonl")]
    with PreferenceStore(straight["store"]) as store:
        rows = store.comparisons()
        assert len(rows) == store.count("comparisons") == len(records) == len(_pair_keys(records))
        assert {(c["source"], c["annotator"]) for c in rows} == {("simulated", "online-dpo:simulated")}
        exported = list(store.export(source="simulated"))
    assert sorted((x["prompt"], x["chosen"], x["rejected"]) for x in exported) == \
        sorted((x["prompt"], x["chosen"], x["rejected"]) for x in records)


def test_resume_skips_finished_rounds_and_equals_an_uninterrupted_run(straight, tiny_base,
                                                                       tmp_path, monkeypatch):
    out, db = tmp_path / "run", str(tmp_path / "prefs.db")
    dpo.main(_cfg(tiny_base, out, store=db, rounds=1))
    round0 = [out / "round_0" / f for f in ("pairs.jsonl", "metrics.json", "model/model.safetensors")]
    before = [(p.read_bytes(), p.stat().st_mtime_ns) for p in round0]

    # Round 1 is killed in training, after it sampled and labelled its pairs.
    calls = []
    _spy_sampling(monkeypatch, calls)
    real_fit = dpo.fit

    def killed(*args, **kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr(dpo, "fit", killed)
    with pytest.raises(RuntimeError, match="killed"):
        dpo.main(_cfg(tiny_base, out, store=db))
    assert len(calls) == 1                                  # round 0 was not sampled again
    assert torch.equal(calls[0]["weights"], _weights(out / "round_0" / "model"))
    assert not torch.equal(calls[0]["weights"], _weights(tiny_base))
    assert (out / "round_1" / "pairs.jsonl").exists() and not (out / "round_1" / "metrics.json").exists()

    calls.clear()
    fits = []
    monkeypatch.setattr(dpo, "fit", lambda *a, **kw: fits.append(1) or real_fit(*a, **kw))
    summary = dpo.main(_cfg(tiny_base, out, store=db))
    assert calls == [] and len(fits) == 1                   # labels reused; only round 1 trained
    assert [(p.read_bytes(), p.stat().st_mtime_ns) for p in round0] == before
    # Resumed == uninterrupted: same pairs, same weights, same metrics.
    for r in range(2):
        strip = lambda recs: [{k: v for k, v in x.items() if k != "model"} for x in recs]  # noqa: E731
        assert strip(_records(out / f"round_{r}" / "pairs.jsonl")) == \
            strip(_records(straight["out"] / f"round_{r}" / "pairs.jsonl"))
    assert torch.equal(_weights(out / "model"), _weights(straight["out"] / "model"))
    assert summary["gold_reward_mean"] == pytest.approx(straight["summary"]["gold_reward_mean"])
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows] == [1, 2]
    # Round 1 went into the store twice (before the kill and after): recorded once.
    with PreferenceStore(db) as store:
        assert store.count("comparisons") == sum(
            len(_records(out / f"round_{r}" / "pairs.jsonl")) for r in range(2))

    # A finished run does nothing on a third call.
    fits.clear()
    dpo.main(_cfg(tiny_base, out, store=db))
    assert calls == [] and fits == []


def test_reward_source_labeler_in_the_stage_and_its_store(tiny_base, tmp_path, monkeypatch):
    out, db = tmp_path / "run", str(tmp_path / "prefs.db")
    spec = f"python:{__name__}:n_chars_parity"
    calls = []
    _spy_sampling(monkeypatch, calls)
    cfg = _cfg(tiny_base, out, rounds=1, prompts_per_round=16, labeler=spec, store=db)
    dpo.main(cfg)
    records = _records(out / "round_0" / "pairs.jsonl")
    pairs = _valid(calls[0]["pairs"])
    sa = n_chars_parity(None, [p["response_a"] for p in pairs])
    sb = n_chars_parity(None, [p["response_b"] for p in pairs])
    decided = [(p["prompt"], *((p["response_a"], p["response_b"]) if x > y
                                else (p["response_b"], p["response_a"])))
               for p, x, y in zip(pairs, sa, sb) if x != y]
    assert 0 < len(decided) < len(pairs)                    # both decided pairs and ties occurred
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in records] == decided
    assert all(n_chars_parity(None, [r["chosen"]]) > n_chars_parity(None, [r["rejected"]])
               for r in records)
    with PreferenceStore(db) as store:
        rows = store.comparisons()
    assert len(rows) == len(records)
    assert {(c["source"], c["annotator"]) for c in rows} == {("ai", f"online-dpo:{spec}")}
    assert all(c["label"] == ("a" if c["response_a"] == rec["chosen"] else "b")
               for c, rec in zip(rows, records))
    # Redoing the round (its done-marker removed) imports its pairs again: nothing is added.
    (out / "round_0" / "metrics.json").unlink()
    dpo.main(cfg)
    with PreferenceStore(db) as store:
        assert store.count("comparisons") == len(records)
    assert len(calls) == 1                                  # the redo reused pairs.jsonl


def test_pairwise_judge_labels_the_rounds_end_to_end(tiny_base, tmp_path, monkeypatch):
    from alignkit.engine.judges import make_judge_labeler

    judge = tmp_path / "judge.yaml"
    judge.write_text(f"judge:\n  model: {tiny_base}\n  batch_size: 8\n")
    out, db = tmp_path / "run", str(tmp_path / "prefs.db")
    calls = []
    _spy_sampling(monkeypatch, calls)
    dpo.main(_cfg(tiny_base, out, rounds=1, labeler=f"pairwise-judge:{judge}", store=db))
    records = _records(out / "round_0" / "pairs.jsonl")
    pairs = _valid(calls[0]["pairs"])
    # The same judge, called on its own, labels the sampled pairs exactly as the round did.
    expected = make_judge_labeler(str(judge))([p["prompt"] for p in pairs],
                                              [p["response_a"] for p in pairs],
                                              [p["response_b"] for p in pairs])
    assert [{k: v for k, v in r.items() if k != "model"} for r in records] == expected
    assert records and all(set(r) == {"prompt", "chosen", "rejected", "label", "label_prob", "model"}
                           and r["label_prob"] > 0.5 for r in records)
    with PreferenceStore(db) as store:
        rows = store.comparisons()
    assert len(rows) == len(records)
    assert {(c["source"], c["annotator"]) for c in rows} == {("ai", f"online-dpo:pairwise-judge:{judge}")}

"""``alignkit evaluate``: the reported numbers are the statistics of the samples it wrote."""

import json
import math

import pytest

from alignkit.config import load_config
from alignkit.engine.evaluation import success_metrics
from alignkit.stages import evaluate


def _run(tiny_base, out, *extra):
    cfg = load_config(evaluate.Config, None, [
        f"policy={tiny_base}", "task=sentiment", "num_prompts=6", "samples_per_prompt=2",
        "sampling.max_new_tokens=8", f"out_dir={out}", *extra])
    return evaluate.main(cfg), [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]


def test_metrics_are_the_statistics_of_the_written_samples(tiny_base, tmp_path):
    metrics, rows = _run(tiny_base, tmp_path / "a", f"reference={tiny_base}", "success_at=0.3",
                         "proxy_reward=gold:sentiment")
    gold = [r["gold_reward"] for r in rows]
    assert len(rows) == 12 and rows[0]["prompt"] == rows[1]["prompt"]
    mean = sum(gold) / 12
    std = math.sqrt(sum((g - mean) ** 2 for g in gold) / 11)
    assert metrics["gold_reward_mean"] == pytest.approx(mean)
    assert metrics["gold_reward_std"] == pytest.approx(std)
    assert metrics["gold_reward_sem"] == pytest.approx(std / math.sqrt(12))
    assert metrics["gold_success_mean"] == pytest.approx(sum(g >= 0.3 for g in gold) / 12)
    assert [r["proxy_reward"] for r in rows] == pytest.approx(gold)   # the same function
    assert metrics["kl_to_ref"] == pytest.approx(0.0, abs=1e-6)      # the policy is its reference
    # Same seed, same samples: a second evaluation of the same policy agrees exactly.
    again, rows2 = _run(tiny_base, tmp_path / "b")
    assert [r["response"] for r in rows2] == [r["response"] for r in rows]
    assert "gold_success_mean" not in again and "proxy_reward_mean" not in again


def test_success_metrics_hand_computed():
    # gold [1, 0.1, 1, 0] at 1.0 -> successes [1, 0, 1, 0]: mean 0.5, sample std sqrt(1/3).
    m = success_metrics([1.0, 0.1, 1.0, 0.0], 1.0)
    assert m == pytest.approx({"gold_success_mean": 0.5, "gold_success_std": math.sqrt(1 / 3),
                               "gold_success_sem": math.sqrt(1 / 12)})
    assert success_metrics([1.0], None) == {}


def n_words(prompts, responses):
    return [float(len(r.split())) for r in responses]


def test_own_prompts_and_reward_sources_without_a_task(tiny_base, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "The film"}\n{"messages": [{"role": "user", "content": "A plot"}]}\n')
    metrics, rows = _run(tiny_base, tmp_path / "own", "task=null", f"prompts={prompts}",
                         f"rewards=[words=python:{__name__}:n_words, python:{__name__}:n_words]")
    assert [r["prompt"] for r in rows] == ["The film", "The film", "A plot", "A plot"]
    words = [len(r["response"].split()) for r in rows]
    assert [r["words"] for r in rows] == words == [r[f"python_{__name__}_n_words"] for r in rows]
    assert metrics["words_mean"] == pytest.approx(sum(words) / 4)
    assert "gold_reward_mean" not in metrics                   # no task, no gold
    from alignkit.config import ConfigError

    with pytest.raises(ConfigError, match="set task .* or prompts"):
        load_config(evaluate.Config, None, [f"policy={tiny_base}"])


def test_win_rate_against_a_baseline_judged_both_ways(tiny_base, tmp_path):
    judge = tmp_path / "judge.yaml"
    judge.write_text(f"judge:\n  model: {tiny_base}\n  batch_size: 8\n")
    args = (f"baseline={tiny_base}", f"judge={judge}")
    # Against itself, with the same seed: the same responses, and a judge that sees each pair in
    # both orders cannot prefer either: every pair is exactly a coin flip.
    same, rows = _run(tiny_base, tmp_path / "self", *args)
    assert [r["baseline_response"] for r in rows] == [r["response"] for r in rows]
    assert all(r["win_prob"] == pytest.approx(0.5, abs=1e-6) for r in rows)
    assert same["win_rate_mean"] == pytest.approx(0.5, abs=1e-6) and same["win_pairs_judged"] == 12
    # Another baseline: the metric is the mean of the rows' probabilities.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "base2")
    AutoTokenizer.from_pretrained(tiny_base).save_pretrained(tmp_path / "base2")
    other, rows = _run(tiny_base, tmp_path / "other", f"baseline={tmp_path / 'base2'}",
                       f"judge={judge}")
    probs = [r["win_prob"] for r in rows]
    assert len(set(probs)) > 1 and other["win_rate_mean"] == pytest.approx(sum(probs) / len(probs))

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
                         f"proxy_reward=gold:sentiment")
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

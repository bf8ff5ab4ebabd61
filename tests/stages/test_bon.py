"""Best-of-n: the analytic KL bound and the plug-in estimate by hand; selection probabilities
against brute-force enumeration (with and without replacement, with ties); the stage end to end."""

import itertools
import json
import math

import numpy as np
import pytest

from alignkit.config import build
from alignkit.stages import bon
from alignkit.stages.bon import expected_best, kl_bound, kl_plugin, selection_probs


def test_kl_bound_hand_values():
    assert kl_bound(1) == 0.0
    assert kl_bound(2) == pytest.approx(math.log(2) - 0.5, abs=1e-15)
    assert kl_bound(4) == pytest.approx(math.log(4) - 0.75, abs=1e-15)
    assert kl_bound(16) == pytest.approx(1.8350887222397811, abs=1e-12)


def test_kl_plugin_hand_values():
    # Two distinct samples, best of 2 with replacement: picks the better one w.p. 3/4.
    expected = 0.25 * math.log(2 * 0.25) + 0.75 * math.log(2 * 0.75)
    assert kl_plugin([0.3, 0.9], 2) == pytest.approx(expected, abs=1e-12)
    assert kl_plugin([0.3, 0.9, 0.1], 1) == pytest.approx(0.0, abs=1e-12)
    assert kl_plugin([0.5, 0.5, 0.5, 0.5], 8) == pytest.approx(0.0, abs=1e-12)   # all tied: no change


def test_kl_plugin_approaches_the_bound_for_distinct_rewards_and_stays_below_with_ties():
    rewards = np.random.default_rng(0).normal(size=20000)
    for n in (2, 4, 16):
        assert kl_plugin(rewards, n) == pytest.approx(kl_bound(n), abs=2e-3)
        assert kl_plugin(rewards, n) <= kl_bound(n)
    # A verifier with 30% of answers correct: best-of-n only moves mass onto the correct level,
    # KL = P log(P / 0.3) + (1 - P) log((1 - P) / 0.7) with P = 1 - 0.7^n, far below the bound.
    ties = np.array([1.0] * 30 + [0.0] * 70)
    for n in (2, 8):
        p = 1 - 0.7 ** n
        exact = p * math.log(p / 0.3) + (1 - p) * math.log((1 - p) / 0.7)
        assert kl_plugin(ties, n) == pytest.approx(exact, abs=1e-12)
        assert kl_plugin(ties, n) < kl_bound(n)


def _brute(rewards, n, replace):
    """Probability each sample is picked, by enumerating every draw; a tie between drawn
    positions is broken uniformly among those positions."""
    m = len(rewards)
    draws = list(itertools.product(range(m), repeat=n) if replace
                 else itertools.combinations(range(m), n))
    p = np.zeros(m)
    for d in draws:
        best = max(rewards[j] for j in d)
        winners = [j for j in d if rewards[j] == best]
        for j in winners:
            p[j] += 1.0 / len(winners) / len(draws)
    return p


@pytest.mark.parametrize("rewards", [[3.0, 1.0, 2.0], [0.2, 0.9, 0.9, 0.1, 0.5], [1.0, 0.0, 1.0, 0.0, 0.0, 1.0]])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_selection_probs_match_enumeration(rewards, n):
    for replace in (True, False):
        np.testing.assert_allclose(selection_probs(rewards, n, replace), _brute(rewards, n, replace),
                                   atol=1e-12)


def test_selection_without_replacement_hand_values_and_expected_best():
    # Subsets of {3, 1, 2} of size 2: {3,1} -> 3, {3,2} -> 3, {1,2} -> 2.
    np.testing.assert_allclose(selection_probs([3.0, 1.0, 2.0], 2, replace=False), [2 / 3, 0, 1 / 3])
    gold = [10.0, 0.0, 4.0]
    assert expected_best([3.0, 1.0, 2.0], gold, 2) == pytest.approx(2 / 3 * 10 + 1 / 3 * 4)
    assert expected_best([3.0, 1.0, 2.0], gold, 1) == pytest.approx(np.mean(gold))
    assert expected_best([3.0, 1.0, 2.0], gold, 3) == pytest.approx(10.0)


PROXY_MODULE = '''
def length(prompts, responses):
    return [float(len(r)) for r in responses]
'''


def test_bon_stage_end_to_end(tiny_base, tmp_path, monkeypatch):
    (tmp_path / "bon_test_rewards.py").write_text(PROXY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "bon"
    cfg = build(bon.Config, {"policy": str(tiny_base), "reward": "python:bon_test_rewards:length",
                             "task": "sentiment", "num_prompts": 5, "n": [1, 2, 4],
                             "out_dir": str(out), "sampling": {"max_new_tokens": 12}})
    summary = bon.main(cfg)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["n"] for r in rows] == [1, 2, 4]
    assert [r["kl_bound"] for r in rows] == pytest.approx([0.0, math.log(2) - 0.5, math.log(4) - 0.75])
    assert rows[0]["kl_plugin"] == pytest.approx(0.0, abs=1e-12)
    # Averaged over all subsets, the best of more samples is never worse under the selector.
    proxy = [r["proxy_reward_mean"] for r in rows]
    assert proxy[0] <= proxy[1] <= proxy[2]
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 20 and {"proxy_reward", "gold_reward"} <= set(samples[0])
    assert proxy[0] == pytest.approx(np.mean([s["proxy_reward"] for s in samples]))
    chosen = [json.loads(x) for x in (out / "chosen.jsonl").read_text().splitlines()]
    assert len(chosen) == 5
    for c in chosen:
        mine = [s["proxy_reward"] for s in samples if s["prompt"] == c["prompt"]]
        assert c["proxy_reward"] == max(mine)
    assert np.mean([c["proxy_reward"] for c in chosen]) == pytest.approx(proxy[2])
    assert summary["n4/gold_reward_mean"] == pytest.approx(rows[2]["gold_reward_mean"])
    assert summary["gold_reward_gain"] == pytest.approx(rows[2]["gold_reward_mean"] - rows[0]["gold_reward_mean"])
    assert len(bon.figures(out)) == 1

"""ReST filtering: normalisation and threshold schedules (hand values), selection of the kept
samples, and the config's refusals."""

import numpy as np
import pytest

from alignkit.config import ConfigError, build
from alignkit.engine.rl.filtering import FilterConfig, keep_mask, normalize_rewards, select


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

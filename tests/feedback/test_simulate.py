import math

import numpy as np
import pytest

from alignkit.feedback.simulate import SimulatedAnnotator, label_pairs
from alignkit.tasks import get_task


def test_prob_a_hand_values():
    ann = SimulatedAnnotator(temperature=1.0)
    p = ann.prob_a([0.0, 1.0, 0.0, 2.5], [0.0, 0.0, 1.0, 2.0])
    # sigmoid(0) = 0.5, sigmoid(1) = 1 / (1 + e^-1), sigmoid(-1), sigmoid(0.5)
    assert p == pytest.approx([0.5, 0.7310585786300049, 0.2689414213699951, 0.6224593312018546],
                              abs=1e-12)
    # Temperature divides the gap: (1 - 0) / 2 -> sigmoid(0.5).
    assert SimulatedAnnotator(temperature=2.0).prob_a([1.0], [0.0]) == pytest.approx(
        [0.6224593312018546], abs=1e-12)


def test_prob_a_is_antisymmetric_and_stable():
    ann = SimulatedAnnotator(temperature=0.3)
    a, b = [0.1, -0.7, 1.2], [0.4, 0.2, -1.0]
    assert np.add(ann.prob_a(a, b), ann.prob_a(b, a)) == pytest.approx([1.0] * 3, abs=1e-12)
    with np.errstate(all="raise"):  # huge gaps neither overflow nor give NaN
        assert ann.prob_a([1e6, -1e6], [-1e6, 1e6]) == [1.0, 0.0]


def test_empirical_frequency_matches_bradley_terry():
    n = 20_000
    for temperature, gap in [(1.0, 0.5), (0.25, -0.2), (3.0, 1.0)]:
        ann = SimulatedAnnotator(temperature=temperature, seed=7)
        labels = ann.label([gap] * n, [0.0] * n)
        p = 1.0 / (1.0 + math.exp(-gap / temperature))
        freq = labels.count("a") / n
        assert labels.count("a") + labels.count("b") == n
        assert abs(freq - p) < 4.0 * math.sqrt(p * (1 - p) / n), (temperature, gap, freq, p)


def test_zero_temperature_follows_gold_ordering():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=500), rng.normal(size=500)
    expected = np.where(a > b, "a", "b").tolist()
    assert SimulatedAnnotator(temperature=0.0).label(a, b) == expected
    assert SimulatedAnnotator(temperature=1e-9, seed=3).label(a, b) == expected
    assert SimulatedAnnotator(temperature=0.0).prob_a([1.0, 0.0, 2.0], [0.0, 1.0, 2.0]) == [
        1.0, 0.0, 0.5]


def test_labels_are_deterministic_given_seed_and_inputs():
    a, b = [0.0] * 300, [0.0] * 300  # p = 0.5 everywhere: labels are pure noise
    first = SimulatedAnnotator(seed=1).label(a, b)
    assert SimulatedAnnotator(seed=1).label(a, b) == first
    assert SimulatedAnnotator(seed=2).label(a, b) != first
    # A different batch with the same annotator draws fresh noise, not a replay.
    shifted = SimulatedAnnotator(seed=1).label([1e-9] + a[1:], b)
    assert shifted[1:] != first[1:]


def test_ties_inside_margin_only():
    ann = SimulatedAnnotator(temperature=0.0, tie_margin=0.1)
    labels = ann.label([0.0, 0.05, 0.2, 1.0, -0.5], [0.0, 0.0, 0.0, 1.09, 0.0])
    assert labels == ["tie", "tie", "a", "tie", "b"]
    # With the default margin 0, no ties ever appear.
    assert "tie" not in SimulatedAnnotator(temperature=0.0).label([0.0, 0.05], [0.0, 0.0])


def test_invalid_arguments():
    with pytest.raises(ValueError):
        SimulatedAnnotator(temperature=-1.0)
    with pytest.raises(ValueError):
        SimulatedAnnotator(tie_margin=-0.1)
    with pytest.raises(ValueError):
        SimulatedAnnotator().label([0.0, 1.0], [0.0])
    with pytest.raises(ValueError):
        SimulatedAnnotator().prob_a([float("nan")], [0.0])


class _LengthTask:
    """Gold reward = response length: makes expected labels obvious."""
    name, chat = "length", False

    def gold_reward(self, prompts, responses):
        return [float(len(r)) for r in responses]


def test_label_pairs_records():
    prompts, a, b = ["p1", "p2", "p3"], ["xx", "x", "abc"], ["x", "yyyy", "def"]
    records = label_pairs(_LengthTask(), prompts, a, b, SimulatedAnnotator(temperature=0.0))
    assert records[:2] == [
        {"prompt": "p1", "chosen": "xx", "rejected": "x", "label": "a", "label_prob": 1.0},
        {"prompt": "p2", "chosen": "yyyy", "rejected": "x", "label": "b", "label_prob": 1.0},
    ]
    # p3 is a gold tie with no tie margin: a coin flip, whose probability is 0.5 either way.
    assert {records[2]["chosen"], records[2]["rejected"]} == {"abc", "def"}
    assert records[2]["label"] in ("a", "b") and records[2]["label_prob"] == 0.5
    soft = label_pairs(_LengthTask(), ["p"], ["x"], ["xx"], SimulatedAnnotator(temperature=1.0))
    # label_prob is P(chosen beats rejected) whichever side was chosen.
    expected = 1 / (1 + math.exp(-1.0)) if soft[0]["chosen"] == "xx" else 1 / (1 + math.exp(1.0))
    assert soft[0]["label_prob"] == pytest.approx(expected, abs=1e-12)


def test_label_pairs_ties_dropped_or_kept():
    ann = SimulatedAnnotator(temperature=0.0, tie_margin=0.5)
    args = (_LengthTask(), ["p", "q"], ["ab", "abc"], ["ba", "a"], ann)
    assert [r["prompt"] for r in label_pairs(*args)] == ["q"]
    kept = label_pairs(*args, keep_ties=True)
    assert kept[0] == {"prompt": "p", "chosen": "ab", "rejected": "ba", "label": "tie",
                       "label_prob": 0.5}
    with pytest.raises(ValueError):
        label_pairs(_LengthTask(), ["p"], ["a", "b"], ["c"], ann)


def test_label_pairs_on_sentiment_task_prefers_the_gold_better_review():
    task = get_task("sentiment")
    prompt = "I watched Night Harbor last night."
    good = " The acting was great and the music was beautiful. I would recommend it to anyone."
    bad = " The acting was bad and the music was dull. I would not recommend this movie."
    records = label_pairs(task, [prompt] * 2, [bad, good], [good, bad],
                          SimulatedAnnotator(temperature=0.0))
    assert [r["chosen"] for r in records] == [good, good]

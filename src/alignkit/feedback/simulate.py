"""Simulated annotators: preference labels drawn from a task's hidden gold reward.

An annotator prefers ``a`` over ``b`` with the Bradley-Terry probability (Bradley & Terry 1952,
"Rank analysis of incomplete block designs I", Biometrika 39; as used for human preferences by
Christiano et al. 2017, Eq. 1):

    P(a > b) = sigmoid((g_a - g_b) / temperature)

where ``g`` is the gold reward. ``temperature`` sets how rational the annotator is: 0 always
follows the gold ordering, large values label at random. This is the synthetic setup of Gao,
Schulman & Hilton 2022 ("Scaling Laws for Reward Model Overoptimization", Sec. 2): a fixed gold
reward stands in for human labellers, a proxy reward model learns only from its labels, and the
gold reward then measures how much of the proxy's gain under optimisation is real.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    from alignkit.tasks import Task


def _pair_arrays(gold_a: Sequence[float], gold_b: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(gold_a, dtype=np.float64), np.asarray(gold_b, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"gold_a and gold_b must be 1-D of equal length, got {a.shape}, {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("gold rewards must be finite")
    return a, b


@dataclass(frozen=True)
class SimulatedAnnotator:
    """A Bradley-Terry annotator on the gold reward.

    temperature: ``P(a > b) = sigmoid((g_a - g_b) / temperature)``; 0 means a perfect annotator.
    tie_margin: when positive, pairs with ``|g_a - g_b| < tie_margin`` are labelled "tie"
        (deterministically: the annotator cannot tell them apart).
    seed: the same seed and the same gold values give the same labels. The random stream is
        also keyed by the gold values, so labelling a new batch with the same annotator draws
        fresh noise rather than replaying the previous batch's.
    """

    temperature: float = 1.0
    tie_margin: float = 0.0
    seed: int = 0

    def __post_init__(self):
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be finite and >= 0, got {self.temperature}")
        if not (math.isfinite(self.tie_margin) and self.tie_margin >= 0):
            raise ValueError(f"tie_margin must be finite and >= 0, got {self.tie_margin}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")

    def _prob_a(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        diff = a - b
        if self.temperature == 0:
            return np.where(diff > 0, 1.0, np.where(diff < 0, 0.0, 0.5))
        # sigmoid(x) = (1 + tanh(x / 2)) / 2 cannot overflow for any finite x.
        return 0.5 * (1.0 + np.tanh(diff / (2.0 * self.temperature)))

    def prob_a(self, gold_a: Sequence[float], gold_b: Sequence[float]) -> list[float]:
        """Bradley-Terry probability that ``a`` is preferred (ties not considered)."""
        return self._prob_a(*_pair_arrays(gold_a, gold_b)).tolist()

    def label(self, gold_a: Sequence[float], gold_b: Sequence[float]) -> list[str]:
        """One draw per pair: "a", "b" or "tie"."""
        a, b = _pair_arrays(gold_a, gold_b)
        digest = hashlib.blake2b(a.tobytes() + b.tobytes(), digest_size=8).digest()
        rng = np.random.default_rng([self.seed, int.from_bytes(digest, "little")])
        a_wins = rng.random(a.shape) < self._prob_a(a, b)
        labels = np.where(a_wins, "a", "b").astype("<U3")  # wide enough for "tie"
        labels[np.abs(a - b) < self.tie_margin] = "tie"
        return labels.tolist()


def label_pairs(task: Task, prompts: Sequence[str], responses_a: Sequence[str],
                responses_b: Sequence[str], annotator: SimulatedAnnotator,
                keep_ties: bool = False) -> list[dict]:
    """Label ``(prompt, a, b)`` triples with ``annotator`` on ``task``'s gold reward.

    Returns preference records ``{"prompt", "chosen", "rejected", "label", "label_prob"}`` for
    reward-model or DPO training. ``label`` is the draw ("a", "b", "tie"); ``label_prob`` is the
    annotator's probability that ``chosen`` beats ``rejected`` (0.5 for a tie), usable as a soft
    label. Ties are dropped unless ``keep_ties``; a kept tie has ``chosen = a``, ``rejected = b``.
    The gold values themselves are deliberately left out: training data must not carry them.
    """
    if not len(prompts) == len(responses_a) == len(responses_b):
        raise ValueError(f"lengths differ: {len(prompts)} prompts, {len(responses_a)} a, "
                         f"{len(responses_b)} b")
    prompts, responses_a, responses_b = list(prompts), list(responses_a), list(responses_b)
    gold_a = task.gold_reward(prompts, responses_a)
    gold_b = task.gold_reward(prompts, responses_b)
    labels = annotator.label(gold_a, gold_b)
    probs = annotator.prob_a(gold_a, gold_b)
    records = []
    for prompt, a, b, label, p in zip(prompts, responses_a, responses_b, labels, probs):
        if label == "tie" and not keep_ties:
            continue
        chosen, rejected, prob = (b, a, 1.0 - p) if label == "b" else (a, b, p)
        records.append({"prompt": prompt, "chosen": chosen, "rejected": rejected,
                        "label": label, "label_prob": 0.5 if label == "tie" else prob})
    return records

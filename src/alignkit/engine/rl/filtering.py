"""Filtering a grown set (ReST, Gulcehre et al. 2023, §2): normalise the rewards to [0, 1], then
keep the samples above the Improve step's threshold, ``F(x, y; tau) = 1[R(x, y) > tau]`` with
``tau_0 <= tau_1 <= ...``. Pure: lists and arrays in, indices and arrays out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from alignkit.config import require


@dataclass(frozen=True)
class FilterConfig:
    schedule: Literal["absolute", "percentile"] = "absolute"
    thresholds: list[float] = field(default_factory=lambda: [0.5, 0.7])  # one per Improve step
    # minmax: over the grown set; prompt_minmax: within each prompt's N samples (absolute
    # threshold 0.99 then keeps each prompt's best sample: RAFT); range: fixed [lo, hi] -> [0, 1]
    normalize: Literal["minmax", "prompt_minmax", "range"] = "minmax"
    range: list[float] | None = None
    require_finished: bool = True        # drop samples cut at max_new_tokens (BC would add EOS)

    def __post_init__(self):
        t = self.thresholds
        require(len(t) >= 1, "filter.thresholds needs one threshold per Improve step")
        require(t == sorted(t), f"filter.thresholds must rise, got {t}")
        top = 1.0 if self.schedule == "absolute" else 100.0
        require(all(0.0 <= x <= top for x in t), f"filter.thresholds must lie in [0, {top:g}] "
                f"for schedule {self.schedule!r}, got {t}")
        if self.normalize == "range":
            require(self.range is not None and len(self.range) == 2 and self.range[0] < self.range[1],
                    "filter.normalize=range needs filter.range: [lo, hi] with lo < hi")


def normalize_rewards(rewards: list[float], method: str, value_range: list[float] | None = None,
                      groups: list | None = None) -> np.ndarray:
    """Map rewards to [0, 1]: min-max over the grown set, over each prompt's ``N`` samples
    (``prompt_minmax``, with ``groups`` the prompt of each sample), or a fixed ``[lo, hi]``.

    Rewards that are all equal (in the set, or in a prompt's group) carry no ranking and map to
    0, so an absolute threshold keeps none of them (use ``range`` for a verifier's fixed scale).
    """
    r = np.asarray(rewards, dtype=np.float64)
    if method == "prompt_minmax":
        members: dict = {}
        for j, key in enumerate(groups):
            members.setdefault(key, []).append(j)
        out = np.zeros_like(r)
        for idx in members.values():
            out[idx] = normalize_rewards(r[idx], "minmax")
        return out
    if method == "range":
        lo, hi = value_range
    else:
        lo, hi = float(r.min()), float(r.max())
        if hi == lo:
            return np.zeros_like(r)
    return np.clip((r - lo) / (hi - lo), 0.0, 1.0)


def keep_mask(normalized: np.ndarray, threshold: float, schedule: str) -> np.ndarray:
    """Samples the Improve step trains on.

    ``absolute``: normalised reward strictly above ``tau`` (ReST's ``1[R > tau]``).
    ``percentile``: normalised reward at or above the ``tau``-th percentile of the grown set, so
    percentile 0 keeps everything and ties at the cut are all kept (verifier rewards tie a lot).
    """
    if schedule == "absolute":
        return normalized > threshold
    return normalized >= np.percentile(normalized, threshold)


def select(grown: list[dict], cfg: FilterConfig, step: int) -> tuple[list[int], np.ndarray]:
    """Indices of the kept samples of Improve ``step`` and the normalised rewards of all."""
    norm = normalize_rewards([g["reward"] for g in grown], cfg.normalize, cfg.range,
                             [g["prompt"] for g in grown])
    mask = keep_mask(norm, cfg.thresholds[step], cfg.schedule)
    ok = [bool(g["response"].strip()) and (g["finished"] or not cfg.require_finished) for g in grown]
    return [j for j in range(len(grown)) if mask[j] and ok[j]], norm

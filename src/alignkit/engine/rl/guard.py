"""The reward-hacking guard (Gao, Schulman & Hilton 2022: past a point, optimising a proxy
lowers the true reward).

After each update a stage feeds the guard its (proxy, held-out) evaluation. The guard compares
each update with the best one so far (the highest held-out signal): it counts the consecutive
updates whose held-out signal is below that peak while the proxy is above its value at the peak
(the proxy kept rising, the held-out signal did not follow). ``patience`` of them in a row fire
it (warn, and stop when configured to). Measured against the peak rather than the previous step,
a decline that zig-zags, or a proxy that plateaus with noise, still counts; a new held-out peak,
or a proxy back below its value at the peak, resets the count. The update with the best held-out
signal is remembered so a stopped run can keep that model. Pure: fed numbers, returns a
decision; no files, no models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from alignkit.config import require


@dataclass(frozen=True)
class GuardConfig:
    heldout: str | None = None          # reward spec of the held-out signal; default gold:TASK
    patience: int = 2                   # k consecutive steps of held-out below its peak, proxy above
    min_delta: float = 0.0              # changes smaller than this count as flat
    stop: bool = False                  # stop, and keep the best (held-out) model as final

    def __post_init__(self):
        require(self.patience >= 1, "guard.patience must be >= 1")
        require(self.min_delta >= 0, "guard.min_delta must be >= 0")


@dataclass(frozen=True)
class GuardDecision:
    step: int            # 0 = the first update (the SFT model)
    streak: int          # consecutive updates with held-out below its peak and proxy above its
                         # value at that peak
    fired: bool          # streak >= patience: warn
    stop: bool           # fired and configured to stop
    best_step: int       # update with the highest held-out signal so far
    best_heldout: float


class HackingGuard:
    def __init__(self, patience: int, min_delta: float = 0.0, stop: bool = False):
        self.patience, self.min_delta, self.stop = patience, min_delta, stop
        self.step, self.streak = -1, 0
        self.best_step, self.best_heldout, self.proxy_at_best = -1, -math.inf, -math.inf

    def update(self, proxy: float, heldout: float) -> GuardDecision:
        self.step += 1
        hacking = (heldout < self.best_heldout - self.min_delta
                   and proxy > self.proxy_at_best + self.min_delta)
        self.streak = self.streak + 1 if hacking else 0
        if heldout > self.best_heldout:
            self.best_step, self.best_heldout, self.proxy_at_best = self.step, heldout, proxy
        fired = self.streak >= self.patience
        return GuardDecision(self.step, self.streak, fired, fired and self.stop, self.best_step,
                             self.best_heldout)

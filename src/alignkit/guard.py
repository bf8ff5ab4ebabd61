"""The reward-hacking guard (Gao, Schulman & Hilton 2022: past a point, optimising a proxy
lowers the true reward).

After each update a stage feeds the guard its (proxy, held-out) evaluation. The guard counts the
consecutive updates in which the held-out signal fell while the proxy rose; ``patience`` of them
in a row fire it (warn, and stop when configured to), and it remembers the update with the best
held-out signal so a stopped run can keep that model. Pure: fed numbers, returns a decision; no
files, no models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from alignkit.config import require


@dataclass(frozen=True)
class GuardConfig:
    heldout: str | None = None          # reward spec of the held-out signal; default gold:TASK
    patience: int = 2                   # k consecutive steps of held-out down while proxy up
    min_delta: float = 0.0              # changes smaller than this count as flat
    stop: bool = False                  # stop, and keep the best (held-out) model as final

    def __post_init__(self):
        require(self.patience >= 1, "guard.patience must be >= 1")
        require(self.min_delta >= 0, "guard.min_delta must be >= 0")


@dataclass(frozen=True)
class GuardDecision:
    step: int            # 0 = the first update (the SFT model)
    streak: int          # consecutive updates with held-out down and proxy up
    fired: bool          # streak >= patience: warn
    stop: bool           # fired and configured to stop
    best_step: int       # update with the highest held-out signal so far
    best_heldout: float


class HackingGuard:
    def __init__(self, patience: int, min_delta: float = 0.0, stop: bool = False):
        self.patience, self.min_delta, self.stop = patience, min_delta, stop
        self.step, self.streak = -1, 0
        self.previous: tuple[float, float] | None = None
        self.best_step, self.best_heldout = -1, -math.inf

    def update(self, proxy: float, heldout: float) -> GuardDecision:
        self.step += 1
        if self.previous is not None:
            last_proxy, last_heldout = self.previous
            hacking = heldout < last_heldout - self.min_delta and proxy > last_proxy + self.min_delta
            self.streak = self.streak + 1 if hacking else 0
        self.previous = (proxy, heldout)
        if heldout > self.best_heldout:
            self.best_step, self.best_heldout = self.step, heldout
        fired = self.streak >= self.patience
        return GuardDecision(self.step, self.streak, fired, fired and self.stop, self.best_step,
                             self.best_heldout)

"""The reward-hacking guard on scripted (proxy, held-out) sequences, and its config's refusals."""

import pytest

from alignkit.config import ConfigError, build
from alignkit.engine.rl.guard import GuardConfig, HackingGuard


def _run_guard(seq, **kw):
    g = HackingGuard(**kw)
    return [g.update(p, h) for p, h in seq]


def test_guard_fires_when_heldout_falls_while_proxy_rises():
    # SFT, then gold up twice (healthy), then proxy up + gold down three times (hacking).
    seq = [(0.0, 0.40), (0.5, 0.50), (1.0, 0.55), (1.5, 0.52), (2.0, 0.48), (2.5, 0.40)]
    d = _run_guard(seq, patience=2)
    assert [x.streak for x in d] == [0, 0, 0, 1, 2, 3]
    assert [x.fired for x in d] == [False, False, False, False, True, True]
    assert not any(x.stop for x in d)              # warn only unless configured to stop
    assert d[-1].best_step == 2 and d[-1].best_heldout == pytest.approx(0.55)
    stopped = _run_guard(seq, patience=2, stop=True)
    assert [x.stop for x in stopped].index(True) == 4


def test_guard_quiet_on_a_healthy_run_and_reset_by_a_new_peak_or_a_falling_proxy():
    healthy = [(0.0, 0.40), (0.3, 0.45), (0.6, 0.47), (0.9, 0.52), (1.2, 0.55)]
    assert not any(x.fired for x in _run_guard(healthy, patience=1))
    # Peak 0.5 at proxy 1.0. A dip, then a new peak (reset); a dip with the proxy back below its
    # value at the peak (a bad step for both, not hacking: reset); then a real decline.
    mixed = [(1.0, 0.50), (1.5, 0.45), (2.0, 0.52), (1.8, 0.48), (1.9, 0.47), (2.5, 0.46),
             (2.6, 0.45)]
    d = _run_guard(mixed, patience=2)
    assert [x.streak for x in d] == [0, 1, 0, 0, 0, 1, 2]
    assert [x.fired for x in d] == [False] * 6 + [True]
    assert d[-1].best_step == 2


def test_guard_fires_on_a_zig_zag_decline_and_a_noisy_proxy_plateau():
    # Measured against the peak, not the previous step: gold 0.66 -> 0.60 with a small rebound,
    # the proxy flat-to-rising with noise (4.37 -> 4.37 -> 4.57 -> 4.50). Step-to-step rules
    # would never see two "down while up" steps in a row here.
    seq = [(0.2, 0.40), (3.2, 0.56), (4.0, 0.66), (4.37, 0.65), (4.37, 0.60), (4.57, 0.55),
           (4.50, 0.44), (4.70, 0.45)]
    d = _run_guard(seq, patience=2)
    assert [x.streak for x in d] == [0, 0, 0, 1, 2, 3, 4, 5]
    assert d.index(next(x for x in d if x.fired)) == 4


def test_guard_min_delta_ignores_noise():
    seq = [(0.0, 0.50), (1.0, 0.495), (2.0, 0.49), (3.0, 0.485)]
    assert _run_guard(seq, patience=2)[-1].fired
    assert not _run_guard(seq, patience=2, min_delta=0.01)[-1].fired


@pytest.mark.parametrize("section, message", [
    ({"patience": 0}, "guard.patience"),
    ({"min_delta": -0.1}, "guard.min_delta"),
])
def test_guard_config_refuses_bad_values(section, message):
    with pytest.raises(ConfigError, match=message):
        build(GuardConfig, section)

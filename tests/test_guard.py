"""The reward-hacking guard on scripted (proxy, held-out) sequences, and its config's refusals."""

import pytest

from alignkit.config import ConfigError, build
from alignkit.guard import GuardConfig, HackingGuard


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


def test_guard_quiet_on_a_healthy_run_and_on_interrupted_declines():
    healthy = [(0.0, 0.40), (0.3, 0.45), (0.6, 0.47), (0.9, 0.52), (1.2, 0.55)]
    assert not any(x.fired for x in _run_guard(healthy, patience=1))
    # Both fall (a bad step, not hacking) and a decline broken by a recovery: the streak resets.
    mixed = [(0.0, 0.5), (0.5, 0.45), (0.4, 0.40), (0.8, 0.38), (1.0, 0.45), (1.2, 0.44)]
    d = _run_guard(mixed, patience=2)
    assert [x.streak for x in d] == [0, 1, 0, 1, 0, 1]
    assert not any(x.fired for x in d)


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

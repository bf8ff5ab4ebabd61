"""The PPO / RLOO / GRPO registry: the reductions' weights and normalisers by hand, and where each
algorithm puts the KL (RLOO: in the sequence reward; GRPO: not in the advantages)."""

from types import SimpleNamespace

import torch

from alignkit.engine.rl.algorithms import ALGORITHMS, loss_weights
from alignkit.math.advantages import sequence_kl


def test_registry_entries():
    assert {name: (a.uses_value, a.reduction) for name, a in ALGORITHMS.items()} == {
        "ppo": (True, "token_mean"), "rloo": (False, "sequence_sum"),
        "grpo": (False, "sequence_mean")}


def test_loss_weights_hand_values():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    weights, norm = loss_weights("token_mean", mask)
    assert weights.tolist() == mask.float().tolist() and norm == 4.0      # tokens
    weights, norm = loss_weights("sequence_sum", mask)
    assert weights.tolist() == mask.float().tolist() and norm == 2.0      # responses
    weights, norm = loss_weights("sequence_mean", mask)
    torch.testing.assert_close(weights, torch.tensor([[1 / 3, 1 / 3, 1 / 3, 0.0],
                                                      [1.0, 0.0, 0.0, 0.0]]))
    assert norm == 2.0


def _experience():
    # k1 per token = logps - ref_logps: (0.5, -1.0, masked) and (0.5, 0.5, 0.5).
    return SimpleNamespace(old_logps=torch.tensor([[-1.0, -2.0, -9.0], [-0.5, -0.5, -0.5]]),
                           ref_logps=torch.tensor([[-1.5, -1.0, 0.0], [-1.0, -1.0, -1.0]]),
                           mask=torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]))


def _cfg(k=2, estimator="k1", grpo_scale=False):
    """An algorithm's settings after the scores and beta: its ppo section, the KL estimator and
    the samples per prompt."""
    return SimpleNamespace(grpo_scale=grpo_scale), estimator, k


def test_rloo_reward_carries_the_sequence_kl():
    exp = _experience()
    assert sequence_kl(exp.old_logps, exp.ref_logps, exp.mask, "k1").tolist() == [-0.5, 1.5]
    # R = score - beta * KL = (1 + 0.25, 3 - 0.75); leave-one-out baseline of k = 2: the other.
    advantages, returns = ALGORITHMS["rloo"].advantages(exp, torch.tensor([1.0, 3.0]), 0.5, *_cfg())
    assert advantages.tolist() == [-1.0, 1.0] and returns is None


def test_grpo_advantages_leave_the_kl_to_the_loss():
    advantages, returns = ALGORITHMS["grpo"].advantages(_experience(), torch.tensor([1.0, 3.0]),
                                                        0.5, *_cfg(grpo_scale=False))
    assert advantages.tolist() == [-1.0, 1.0] and returns is None


def test_tis_cap_weights_the_policy_loss_against_the_sampler_logps():
    """ppo.tis_cap = C: each token's clipped-surrogate term times min(pi_old / pi_sampler, C),
    pi_sampler the log-probs the sampling engine recorded (rollout.logps); 0 leaves it alone."""
    import math

    import pytest

    from alignkit.config import ConfigError
    from alignkit.engine.rl.algorithms import PPOConfig

    old = torch.log(torch.tensor([[0.5, 0.2, 0.9]]))
    sampler = torch.log(torch.tensor([[0.25, 0.4, 0.3]]))   # ratios 2, 0.5, 3
    mb = SimpleNamespace(old_logps=old, ref_logps=old, advantages=torch.tensor([1.0]),
                         rollout=SimpleNamespace(logps=sampler))
    for name in ("rloo", "grpo"):
        loss = ALGORITHMS[name].loss(old.clone(), mb, 0.0, PPOConfig(algo=name, tis_cap=2.5))
        # ratio 1, A = 1: L = -w with w = (2, 0.5, min(3, 2.5))
        torch.testing.assert_close(loss, torch.tensor([[-2.0, -0.5, -2.5]]))
        off = ALGORITHMS[name].loss(old.clone(), mb, 0.0, PPOConfig(algo=name))
        torch.testing.assert_close(off, torch.tensor([[-1.0, -1.0, -1.0]]))
    with pytest.raises(ConfigError, match="ppo.tis_cap must be >= 0"):
        PPOConfig(tis_cap=-1.0)
    assert math.isclose(PPOConfig().tis_cap, 0.0)

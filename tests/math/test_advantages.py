"""Tests for alignkit.math.advantages: hand-computed values, parity with direct formulas written as
plain Python loops, and identities (GAE with gamma = lam = 1, RLOO zero-sum, unbiased KL)."""

from __future__ import annotations

import math

import pytest
import torch

from alignkit.math import advantages as A

D = torch.float64


def t(*rows):
    return torch.tensor(rows, dtype=D)


def close(actual, expected, tol=1e-12):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype),
                               rtol=tol, atol=tol)


def _random_episode(seed, B=4, T=6):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(B, T, generator=g, dtype=D)
    values = torch.randn(B, T, generator=g, dtype=D)
    lengths = torch.tensor([6, 1, 4, 3])[:B]
    mask = (torch.arange(T) < lengths[:, None]).to(D)
    return rewards, values, mask, lengths


# ------------------------------------------------------------------------------------------ GAE

def test_gae_hand_values():
    # gamma 0.9, lam 0.8 (gamma lam = 0.72); row 0 full, row 1 ends after 2 tokens (junk padding)
    rewards = t([0.0, 0.0, 1.0], [0.0, 1.0, 99.0])
    values = t([0.5, 0.6, 0.7], [0.5, 0.6, 99.0])
    mask = t([1, 1, 1], [1, 1, 0])
    adv, ret = A.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 0: d2 = 1 - 0.7 = 0.3;  d1 = 0.9*0.7 - 0.6 = 0.03;  d0 = 0.9*0.6 - 0.5 = 0.04
    #        A2 = 0.3; A1 = 0.03 + 0.72*0.3 = 0.246; A0 = 0.04 + 0.72*0.246 = 0.21712
    # row 1: d1 = 1 - 0.6 = 0.4 (no bootstrap past the end); A0 = 0.04 + 0.72*0.4 = 0.328
    close(adv, [[0.21712, 0.246, 0.3], [0.328, 0.4, 0.0]])
    close(ret, [[0.71712, 0.846, 1.0], [0.828, 1.0, 0.0]])


def test_gae_left_padding_matches_right_padding():
    rewards, values = t([0.0, 0.0, 1.0, 7.0]), t([0.5, 0.6, 0.7, 7.0])
    right = A.gae(rewards, values, t([1, 1, 1, 0]), 0.9, 0.8)
    left = A.gae(rewards.roll(1, -1), values.roll(1, -1), t([0, 1, 1, 1]), 0.9, 0.8)
    for r, lft in zip(right, left):
        close(lft, r.roll(1, -1))
        assert lft[0, 0] == 0


def test_gae_gamma_lam_one_is_reward_to_go_minus_values():
    rewards, values, mask, lengths = _random_episode(0)
    adv, ret = A.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    for b in range(4):
        n = int(lengths[b])
        for s in range(6):
            if s < n:
                to_go = sum(rewards[b, j].item() for j in range(s, n))
                close(adv[b, s], to_go - values[b, s].item())
                close(ret[b, s], to_go)
            else:
                assert adv[b, s] == 0 and ret[b, s] == 0


def test_gae_parity_with_sum_of_discounted_td_errors():
    rewards, values, mask, lengths = _random_episode(1)
    gamma, lam = 0.95, 0.7
    adv, _ = A.gae(rewards, values, mask, gamma, lam)
    for b in range(4):
        n = int(lengths[b])
        r = rewards[b, :n].tolist()
        v = values[b, :n].tolist() + [0.0]  # V after the last token is 0
        deltas = [r[j] + gamma * v[j + 1] - v[j] for j in range(n)]
        for s in range(n):  # eq. 16: A_t = sum_l (gamma lam)^l delta_{t+l}
            close(adv[b, s], sum((gamma * lam) ** (j - s) * deltas[j] for j in range(s, n)))
    # lam = 0 gives the one-step TD error
    adv0, _ = A.gae(rewards, values, mask, 0.9, 0.0)
    nxt = torch.cat([values[:, 1:] * mask[:, 1:], torch.zeros(4, 1, dtype=D)], dim=1)
    close(adv0, (rewards + 0.9 * nxt - values) * mask)


def test_gae_output_is_detached():
    rewards, values, mask, _ = _random_episode(2)
    adv, ret = A.gae(rewards, values.requires_grad_(), mask, 1.0, 0.95)
    assert not adv.requires_grad and not ret.requires_grad


# --------------------------------------------------------------------------------------- whiten

def test_whiten_hand_values():
    x = t([1.0, 3.0, 5.0, 100.0])
    mask = t([1, 1, 1, 0])
    # mean 3, unbiased var (4 + 0 + 4) / 2 = 4, std 2 -> [-1, 0, 1]; padding -> 0
    s = 1 / math.sqrt(1 + 1e-8 / 4)  # the eps inside sqrt(var + eps)
    close(A.whiten(x, mask), [[-s, 0.0, s, 0.0]])
    close(A.whiten(x, mask, shift_mean=False), [[3 - s, 3.0, 3 + s, 0.0]])
    with pytest.raises(ValueError):
        A.whiten(x, t([0, 1, 0, 0]))


def test_whiten_masked_stats():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, generator=g, dtype=D)
    mask = t([1, 1, 1, 1, 0], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0])
    w = A.whiten(x, mask)
    kept = w[mask.bool()]
    close(kept.mean(), 0.0)
    close(kept.var(unbiased=True), 1.0, 1e-7)


# ------------------------------------------------------------------------------------------- KL

def test_kl_estimators_hand_values():
    logps, ref = torch.log(t([0.5])), torch.log(t([0.25]))
    # logps - ref = log 2 = 0.6931471805599453
    close(A.kl_penalty(logps, ref, "k1"), [[0.6931471805599453]])
    close(A.kl_penalty(logps, ref, "k2"), [[0.5 * 0.6931471805599453 ** 2]])  # 0.2402265...
    # k3 = r - 1 - log r with r = 1/2: 0.5 - 1 + log 2 = 0.1931471805599453
    close(A.kl_penalty(logps, ref, "k3"), [[0.1931471805599453]])
    with pytest.raises(KeyError):
        A.kl_penalty(logps, ref, "k4")


def test_k1_and_k3_are_unbiased_estimates_of_kl():
    pi, ref = [0.5, 0.3, 0.2], [0.2, 0.5, 0.3]
    kl = sum(p * math.log(p / q) for p, q in zip(pi, ref))
    logps, ref_logps = torch.log(t(pi)), torch.log(t(ref))
    weights = t(pi)
    # exact expectation over the 3-token vocabulary, sampling from pi
    close((weights * A.kl_penalty(logps, ref_logps, "k1")).sum(), kl)
    close((weights * A.kl_penalty(logps, ref_logps, "k3")).sum(), kl)
    assert abs((weights * A.kl_penalty(logps, ref_logps, "k2")).sum().item() - kl) > 1e-3
    assert (A.kl_penalty(logps, ref_logps, "k3") >= 0).all()


def test_shaped_rewards_hand_values():
    scores = torch.tensor([2.0, -1.0], dtype=D)
    kl = t([0.1, 0.2, 0.3], [0.5, 0.5, 9.0])
    mask = t([1, 1, 1], [1, 1, 0])
    # -0.1 * kl, plus the score at the last real token
    close(A.shaped_rewards(scores, kl, mask, beta=0.1),
          [[-0.01, -0.02, -0.03 + 2.0], [-0.05, -0.05 - 1.0, 0.0]])
    with pytest.raises(ValueError):
        A.shaped_rewards(scores, kl, t([1, 1, 1], [0, 0, 0]), beta=0.1)


# ----------------------------------------------------------------------------------- RLOO, GRPO

def test_rloo_hand_values_and_identities():
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0, 4.0, 10.0], dtype=D)
    adv = A.rloo_advantages(scores, k=3)
    # group 1: 1 - (2+3)/2 = -1.5, 2 - (1+3)/2 = 0, 3 - (1+2)/2 = 1.5
    # group 2: 4 - (4+10)/2 = -3, -3, 10 - (4+4)/2 = 6
    close(adv, [-1.5, 0.0, 1.5, -3.0, -3.0, 6.0])
    g = torch.Generator().manual_seed(4)
    r = torch.randn(12, generator=g, dtype=D)
    adv = A.rloo_advantages(r, k=4)
    close(adv.view(3, 4).sum(dim=1), [0.0, 0.0, 0.0])  # zero-sum per prompt
    close(adv, 4 / 3 * (r.view(3, 4) - r.view(3, 4).mean(1, keepdim=True)).view(-1))
    close(A.rloo_advantages(r + 7.0, k=4), adv)  # a constant shift is removed by the baseline
    with pytest.raises(ValueError):
        A.rloo_advantages(r, k=1)
    with pytest.raises(ValueError):
        A.rloo_advantages(r, k=5)


def test_grpo_advantages_hand_values():
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0, 4.0, 10.0, 5.0, 5.0, 5.0], dtype=D)
    adv = A.grpo_advantages(scores, k=3)
    # group 1: mean 2, unbiased std 1 -> [-1, 0, 1] / (1 + 1e-4)
    # group 2: mean 6, std sqrt((4 + 4 + 16) / 2) = sqrt(12) -> [-2, -2, 4] / (sqrt(12) + 1e-4)
    # group 3: all equal -> 0
    s1, s2 = 1 + 1e-4, math.sqrt(12) + 1e-4
    close(adv, [-1 / s1, 0.0, 1 / s1, -2 / s2, -2 / s2, 4 / s2, 0.0, 0.0, 0.0])
    close(A.grpo_advantages(scores, k=3, scale=False),
          [-1.0, 0.0, 1.0, -2.0, -2.0, 4.0, 0.0, 0.0, 0.0])
    close(A.grpo_advantages(3.0 * scores - 5.0, k=3, eps=0.0)[:6],
          A.grpo_advantages(scores, k=3, eps=0.0)[:6])  # invariant to a positive affine map


# -------------------------------------------------------------------------------- KL controllers

def test_adaptive_kl_controller_hand_values_and_resume():
    c = A.AdaptiveKLController(init_beta=0.1, target=6.0, horizon=10000)
    # KL 9: e = clip(9/6 - 1, -0.2, 0.2) = 0.2;  beta = 0.1 * (1 + 0.2 * 256/10000) = 0.100512
    assert c.update(9.0, n_steps=256) == pytest.approx(0.100512, rel=1e-14)
    # KL 5.4: e = 5.4/6 - 1 = -0.1;  beta = 0.100512 * (1 - 0.1 * 100/10000) = 0.100411488
    c.update(torch.tensor(5.4, dtype=D), n_steps=100)  # a tensor KL is accepted
    assert c.value == pytest.approx(0.100411488, rel=1e-14)
    # KL 0: e = -1 clipped to -0.2;  beta *= 1 - 0.2 * 10000/10000 = 0.8
    resumed = A.AdaptiveKLController(init_beta=1.0, target=6.0, horizon=10000)
    resumed.load_state_dict(c.state_dict())
    assert resumed.value == c.value
    for ctl in (c, resumed):
        ctl.update(0.0, n_steps=10000)
    assert c.value == resumed.value == pytest.approx(0.100411488 * 0.8, rel=1e-14)
    with pytest.raises(ValueError):
        A.AdaptiveKLController(0.1, target=0.0, horizon=1)


def test_fixed_kl_controller():
    c = A.FixedKLController(0.05)
    assert c.update(100.0, n_steps=1000) == 0.05 and c.value == 0.05
    other = A.FixedKLController(1.0)
    other.load_state_dict(c.state_dict())
    assert other.value == 0.05

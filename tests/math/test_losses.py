"""Tests for alignkit.math.losses: hand-computed values, parity with direct transcriptions of the
papers' equations (written with plain Python floats, in probability space where possible), and
the reduction invariance (one batch == accumulation == simulated data-parallel ranks)."""

from __future__ import annotations

import math
from decimal import Decimal, getcontext

import pytest
import torch

from alignkit.math import losses as L

D = torch.float64


def t(*xs):
    return torch.tensor(xs, dtype=D)


def close(actual, expected, tol=1e-12):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype),
                               rtol=tol, atol=tol)


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def rand(n, lo, hi, seed):
    g = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand(n, generator=g, dtype=D)


# --------------------------------------------------------------------------------- registry

def test_registry_maps_names_to_functions():
    expected = {"sft": L.sft_loss, "bradley_terry": L.bradley_terry_loss, "dpo": L.dpo_loss,
                "cdpo": L.cdpo_loss, "ipo": L.ipo_loss, "hinge": L.hinge_loss, "kto": L.kto_loss,
                "simpo": L.simpo_loss, "orpo": L.orpo_loss, "ppo_policy": L.ppo_policy_loss,
                "ppo_value": L.ppo_value_loss, "grpo": L.grpo_loss}
    for name, fn in expected.items():
        assert L.get_loss(name) is fn
    with pytest.raises(KeyError, match="unknown loss"):
        L.get_loss("nope")
    with pytest.raises(ValueError, match="twice"):
        L.register("dpo")(lambda: None)


# --------------------------------------------------------------------- existing: sft, BT, reduce

def test_sft_hand_values():
    # -log(0.5) = 0.6931471805599453, -log(0.25) = 1.3862943611198906
    close(L.sft_loss(torch.log(t(0.5, 0.25))), [0.6931471805599453, 1.3862943611198906])


def test_bradley_terry_hand_values():
    # r_w - r_l = 1: -log sigmoid(1) = log(1 + e^-1) = 0.31326168751822286
    # r_w - r_l = -1: log(1 + e) = 1.3132616875182228
    close(L.bradley_terry_loss(t(1.0, 0.0), t(0.0, 1.0)), [0.31326168751822286, 1.3132616875182228])
    # margin 0.5: log(1 + e^-0.5) = 0.4740769841801067
    close(L.bradley_terry_loss(t(1.0), t(0.0), margin=0.5), [0.4740769841801067])


def test_reduce_loss_hand_values():
    values = t(1.0, 2.0, 3.0, 4.0).view(2, 2)
    weights = t(1.0, 1.0, 1.0, 0.0).view(2, 2)
    # (1 + 2 + 3) / 3 = 2; with world_size=2: 2 * 6 / 3 = 4
    close(L.reduce_loss(values, weights, 3.0), 2.0)
    close(L.reduce_loss(values, weights, 3.0, world_size=2), 4.0)


def _token_losses(W, x, targets):
    logps = torch.log_softmax(x @ W, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return L.sft_loss(logps)


def test_reduce_loss_batch_equals_accumulation_equals_ranks():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 5, 3, generator=g, dtype=D)
    targets = torch.randint(0, 4, (8, 5), generator=g)
    lengths = torch.tensor([5, 1, 3, 2, 5, 4, 1, 2])  # uneven: a per-micro-batch mean would differ
    mask = (torch.arange(5) < lengths[:, None]).to(D)
    W = torch.randn(3, 4, generator=g, dtype=D, requires_grad=True)
    global_weight = mask.sum()

    def value_and_grad(rows, world_size):
        loss = L.reduce_loss(_token_losses(W, x[rows], targets[rows]), mask[rows], global_weight,
                             world_size)
        (grad,) = torch.autograd.grad(loss, W)
        return loss.detach(), grad

    halves = [slice(0, 4), slice(4, 8)]
    full_v, full_g = value_and_grad(slice(0, 8), 1)
    # Reference: masked token mean written directly.
    direct = (_token_losses(W, x, targets) * mask).sum() / mask.sum()
    close(full_v, direct.detach())

    # Two accumulation micro-batches of 4: values and gradients add up.
    micro = [value_and_grad(h, 1) for h in halves]
    close(micro[0][0] + micro[1][0], full_v)
    close(micro[0][1] + micro[1][1], full_g)

    # Two ranks of 4 with world_size=2: DDP averages gradients (and we average logged values).
    ranks = [value_and_grad(h, 2) for h in halves]
    close((ranks[0][0] + ranks[1][0]) / 2, full_v)
    close((ranks[0][1] + ranks[1][1]) / 2, full_g)

    # The test can fail: averaging per-micro-batch means is *not* the same here.
    with torch.no_grad():
        naive = sum(((_token_losses(W, x[h], targets[h]) * mask[h]).sum() / mask[h].sum())
                    for h in halves) / 2
    assert abs(float(naive) - float(full_v)) > 1e-3


# ------------------------------------------------------------------------------------------ DPO

def test_dpo_hand_value_gradient_and_implicit_rewards():
    pc = t(-1.0).requires_grad_()
    pr = t(-2.0).requires_grad_()
    rc, rr = t(-1.5), t(-1.5)
    # h = (-1 + 1.5) - (-2 + 1.5) = 1; beta h = 0.5; loss = log(1 + e^-0.5) = 0.4740769841801067
    loss = L.dpo_loss(pc, pr, rc, rr, beta=0.5)
    close(loss.detach(), [0.4740769841801067])
    loss.sum().backward()
    # dL/dpi_w = -beta sigmoid(-beta h) = -0.5 * 0.37754066879814546 = -0.18877033439907273
    close(pc.grad, [-0.18877033439907273])
    close(pr.grad, [0.18877033439907273])
    assert pc.grad.item() < 0 < pr.grad.item()  # gradient descent raises chosen, lowers rejected
    chosen, rejected = L.dpo_implicit_rewards(pc, pr, rc, rr, beta=0.5)
    close(chosen, [0.25])    # 0.5 * (-1 + 1.5)
    close(rejected, [-0.25])  # 0.5 * (-2 + 1.5)
    assert not chosen.requires_grad and not rejected.requires_grad


def _pairs(seed, n=16):
    return [rand(n, -6.0, -0.5, seed + i) for i in range(4)]


def _ratio(pc, pr, rc, rr, i):
    # (pi(y_l) ref(y_w)) / (pi(y_w) ref(y_l)) with probabilities, not log-probs
    p_w, p_l, q_w, q_l = (math.exp(v[i].item()) for v in (pc, pr, rc, rr))
    return (p_l * q_w) / (p_w * q_l)


def test_dpo_parity_with_paper_equation_in_probabilities():
    pc, pr, rc, rr = _pairs(1)
    beta = 0.3
    ours = L.dpo_loss(pc, pr, rc, rr, beta)
    # eq. 7: -log sigmoid(beta log(p_w/q_w) - beta log(p_l/q_l)) = log(1 + R^beta)
    ref = [math.log(1 + _ratio(pc, pr, rc, rr, i) ** beta) for i in range(16)]
    close(ours, ref, 1e-10)


def test_cdpo_hand_value_and_parity():
    # beta h = 1, eps = 0.1: 0.9 log(1 + e^-1) + 0.1 log(1 + e) = 0.4132616875182229
    close(L.cdpo_loss(t(0.0), t(-2.0), t(0.0), t(0.0), beta=0.5, label_smoothing=0.1),
          [0.4132616875182229])
    pc, pr, rc, rr = _pairs(2)
    beta, eps = 0.2, 0.25
    ref = [(1 - eps) * math.log(1 + R ** beta) + eps * math.log(1 + R ** -beta)
           for R in (_ratio(pc, pr, rc, rr, i) for i in range(16))]
    close(L.cdpo_loss(pc, pr, rc, rr, beta, eps), ref, 1e-10)
    close(L.cdpo_loss(pc, pr, rc, rr, beta, 0.0), L.dpo_loss(pc, pr, rc, rr, beta))


def test_ipo_hand_value_and_parity():
    # h = 2, tau = 0.5: (2 - 1/(2*0.5))^2 = 1;  h = 0.5, tau = 0.1: (0.5 - 5)^2 = 20.25
    close(L.ipo_loss(t(0.0), t(-2.0), t(0.0), t(0.0), beta=0.5), [1.0])
    close(L.ipo_loss(t(0.0), t(-0.5), t(0.0), t(0.0), beta=0.1), [20.25])
    pc, pr, rc, rr = _pairs(3)
    tau = 0.4
    ref = [(math.log(1 / _ratio(pc, pr, rc, rr, i)) - 1 / (2 * tau)) ** 2 for i in range(16)]
    close(L.ipo_loss(pc, pr, rc, rr, tau), ref, 1e-10)


def test_hinge_hand_value_and_parity():
    # beta = 0.5: h = 1 -> 1 - 0.5 = 0.5; h = 3 -> max(0, -0.5) = 0
    close(L.hinge_loss(t(0.0, 0.0), t(-1.0, -3.0), t(0.0, 0.0), t(0.0, 0.0), beta=0.5),
          [0.5, 0.0])
    pc, pr, rc, rr = _pairs(4)
    beta = 0.7
    ref = [max(0.0, 1 - beta * math.log(1 / _ratio(pc, pr, rc, rr, i))) for i in range(16)]
    close(L.hinge_loss(pc, pr, rc, rr, beta), ref, 1e-10)


# ------------------------------------------------------------------------------------------ KTO

def test_kto_reference_point_hand_values_and_detached():
    # diffs [1, -1] -> mean 0 -> 0;  diffs [1, 0.5] -> mean 0.75;  diffs [-1, -2] -> clamp to 0
    close(L.kto_reference_point(t(-1.0, -3.0), t(-2.0, -2.0)), 0.0)
    close(L.kto_reference_point(t(-1.0, -2.0), t(-2.0, -2.5)), 0.75)
    close(L.kto_reference_point(t(-3.0, -4.0), t(-2.0, -2.0)), 0.0)
    policy_kl = t(-1.0, -2.0).requires_grad_()
    z0 = L.kto_reference_point(policy_kl, t(-2.0, -2.5))
    assert not z0.requires_grad
    policy = t(-1.0).requires_grad_()
    L.kto_loss(policy, t(-2.0), torch.tensor([True]), z0, beta=2.0).sum().backward()
    assert policy_kl.grad is None and policy.grad is not None


def test_kto_hand_values_and_gradient():
    # r = -1 - (-2) = 1, z0 = 0.5, beta = 2: beta (r - z0) = 1
    # desirable: 1 - sigmoid(1) = 0.2689414213699951
    # undesirable, lambda_U = 1.5: 1.5 (1 - sigmoid(-1)) = 1.0965878679450074
    policy = t(-1.0, -1.0).requires_grad_()
    z0 = torch.tensor(0.5, dtype=D, requires_grad=True)  # not detached by the caller on purpose
    loss = L.kto_loss(policy, t(-2.0, -2.0), torch.tensor([True, False]), z0, beta=2.0,
                      undesirable_weight=1.5)
    close(loss.detach(), [0.2689414213699951, 1.0965878679450074])
    loss.sum().backward()
    # d/dr [sigmoid(-beta(r - z0))] = -beta s(1) s(-1) = -2 * 0.19661193324148185
    # d/dr [1.5 sigmoid(beta(r - z0))] = 1.5 * 2 * 0.19661193324148185
    close(policy.grad, [-0.3932238664829637, 0.5898357997244456])
    assert z0.grad is None  # z0 is never back-propagated


def test_kto_parity_with_paper_equation():
    policy, ref = rand(16, -8, -1, 10), rand(16, -8, -1, 11)
    desirable = rand(16, 0, 1, 12) > 0.5
    z0, beta, lam_d, lam_u = 0.3, 0.1, 1.0, 1.33
    ours = L.kto_loss(policy, ref, desirable, z0, beta, lam_d, lam_u)
    expected = []
    for i in range(16):
        r = math.log(math.exp(policy[i].item()) / math.exp(ref[i].item()))
        if desirable[i]:
            v, lam = lam_d * sigmoid(beta * (r - z0)), lam_d
        else:
            v, lam = lam_u * sigmoid(beta * (z0 - r)), lam_u
        expected.append(lam - v)  # eq. 8: lambda_y - v(x, y)
    close(ours, expected, 1e-10)


# ---------------------------------------------------------------------------------------- SimPO

def test_simpo_hand_value_and_parity():
    # beta/|y_w| pi_w = 2/3 * -6 = -4; beta/|y_l| pi_l = 2/4 * -10 = -5; -4 + 5 - 0.5 = 0.5
    # loss = log(1 + e^-0.5) = 0.4740769841801067
    close(L.simpo_loss(t(-6.0), t(-10.0), t(3.0), t(4.0), beta=2.0, gamma=0.5),
          [0.4740769841801067])
    pw, pl = rand(16, -30, -5, 20), rand(16, -30, -5, 21)
    lw, ll = torch.round(rand(16, 3, 20, 22)), torch.round(rand(16, 3, 20, 23))
    beta, gamma = 2.5, 1.2
    expected = []
    for i in range(16):
        # geometric-mean token probability of each response, then eq. 6
        gw = math.exp(pw[i].item()) ** (1 / lw[i].item())
        gl = math.exp(pl[i].item()) ** (1 / ll[i].item())
        expected.append(-math.log(sigmoid(beta * math.log(gw) - beta * math.log(gl) - gamma)))
    close(L.simpo_loss(pw, pl, lw, ll, beta, gamma), expected, 1e-10)


# ----------------------------------------------------------------------------------------- ORPO

def test_orpo_hand_value():
    # chosen p = 0.5 -> odds 1; rejected p = 0.2 -> odds 0.25; log odds ratio = log 4
    # L_OR = -log sigmoid(log 4) = -log(4/5) = log 1.25 = 0.22314355131420976
    # summed log-probs over 2 and 3 tokens: chosen mean log-prob log 0.5, NLL -log 0.5
    # L = nll + lambda L_OR = 0.6931471805599453 + 0.1 * 0.22314355131420976 = 0.7154615356913663
    close(L.orpo_log_odds_ratio(torch.log(t(0.5)), torch.log(t(0.2))), [math.log(4.0)])
    close(L.orpo_loss(2 * torch.log(t(0.5)), 3 * torch.log(t(0.2)), t(2.0), t(3.0),
                      orpo_lambda=0.1), [0.7154615356913663])


def test_orpo_parity_with_odds_formulation():
    cw, cl = rand(16, -4, -0.01, 30), rand(16, -4, -0.01, 31)   # mean per-token log-probs
    nw, nl = torch.randint(1, 20, (16,)).to(D), torch.randint(1, 20, (16,)).to(D)
    lam = 0.25
    expected = []
    for i in range(16):
        pw, pl = math.exp(cw[i].item()), math.exp(cl[i].item())
        odds_w, odds_l = pw / (1 - pw), pl / (1 - pl)
        # -log sigmoid(log(odds_w / odds_l)) = log(1 + odds_l / odds_w); NLL = -mean log-prob
        expected.append(-cw[i].item() + lam * math.log(1 + odds_l / odds_w))
    close(L.orpo_loss(cw * nw, cl * nl, nw, nl, lam), expected, 1e-9)


def _log1mexp_exact(x: float) -> float:
    getcontext().prec = 60
    return float((1 - Decimal(x).exp()).ln())


def test_log1mexp_accurate_in_float32_over_whole_range():
    xs = [-80.0, -20.0, -3.0, -0.7, -0.69, -0.1, -1e-3, -1e-5, -1e-7, -1e-20]
    got = L.log1mexp(torch.tensor(xs, dtype=torch.float32))
    expected = torch.tensor([_log1mexp_exact(x) for x in xs], dtype=torch.float32)
    torch.testing.assert_close(got, expected, rtol=2e-6, atol=0.0)
    # the naive formula loses it near 0 in float32: log1p(-exp(-1e-7)) is off by > 0.1
    naive = torch.log1p(-torch.exp(torch.tensor(-1e-7)))
    assert abs(naive.item() - _log1mexp_exact(-1e-7)) > 0.1


def test_log1mexp_gradient_and_orpo_stable_at_zero():
    x = t(-1.0, -1e-3, -1e-9).requires_grad_()
    L.log1mexp(x).sum().backward()
    # d/dx log(1 - e^x) = -1 / expm1(-x)
    close(x.grad, [-1 / math.expm1(1.0), -1 / math.expm1(1e-3), -1 / math.expm1(1e-9)], 1e-9)
    for dtype in (torch.float32, torch.float64):
        chosen = torch.tensor([0.0, -1e-7, -1e-30], dtype=dtype, requires_grad=True)
        rejected = torch.tensor([-1.0, -2.0, -0.0], dtype=dtype, requires_grad=True)
        ones = torch.ones(3, dtype=dtype)
        loss = L.orpo_loss(chosen, rejected, ones, ones, orpo_lambda=0.1)
        loss.sum().backward()
        assert torch.isfinite(loss).all()
        assert torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()


# ------------------------------------------------------------------------------------------ PPO

def test_ppo_policy_hand_values_clip_indicator_and_gradient():
    ratios = t(1.5, 1.5, 0.5, 0.5)
    adv = t(2.0, -1.0, -1.0, 1.0).view(1, 4)
    old = torch.zeros(1, 4, dtype=D)
    logps = torch.log(ratios).view(1, 4).requires_grad_()
    loss = L.ppo_policy_loss(logps, old, adv, clip_eps=0.2)
    # r=1.5,A=2: max(-3, -2.4) = -2.4 (clipped);   r=1.5,A=-1: max(1.5, 1.2) = 1.5
    # r=0.5,A=-1: max(0.5, 0.8) = 0.8 (clipped);   r=0.5,A=1: max(-0.5, -0.8) = -0.5
    close(loss.detach(), [[-2.4, 1.5, 0.8, -0.5]])
    close(L.ppo_clipped(logps, old, adv, 0.2), [[1.0, 0.0, 1.0, 0.0]])
    # inside the trust region both terms are equal: not clipped
    inside = torch.log(t(1.1, 0.9)).view(1, 2)
    close(L.ppo_clipped(inside, torch.zeros(1, 2, dtype=D), t(1.0, -1.0).view(1, 2), 0.2),
          [[0.0, 0.0]])
    loss.sum().backward()
    # d(-A r)/dlogp = -A r on unclipped tokens; 0 where the clip binds
    close(logps.grad, [[0.0, 1.5, 0.0, -0.5]])


def test_ppo_policy_dual_clip_and_sequence_advantages():
    old = torch.zeros(1, 2, dtype=D)
    logps = torch.log(t(5.0, 1.5)).view(1, 2)
    adv = t(-1.0, -1.0).view(1, 2)
    # r=5, A=-1: max(5, 1.2) = 5, capped at -c A = 3;  r=1.5: 1.5 < 3 stays
    close(L.ppo_policy_loss(logps, old, adv, 0.2, dual_clip=3.0), [[3.0, 1.5]])
    close(L.ppo_policy_loss(logps, old, adv, 0.2), [[5.0, 1.5]])
    with pytest.raises(ValueError):
        L.ppo_policy_loss(logps, old, adv, 0.2, dual_clip=1.0)
    # a [B] advantage applies to every token of its row (B == T here, to catch wrong broadcast)
    lp = torch.zeros(2, 2, dtype=D)
    close(L.ppo_policy_loss(lp, lp, t(1.0, -2.0), 0.2), [[-1.0, -1.0], [2.0, 2.0]])


def test_truncated_is_weights_hand_values_and_weighted_losses():
    """TIS (Yao et al. 2025): w = min(pi_old / pi_sampler, C), on the policy-gradient term only."""
    old = torch.log(t(0.5, 0.2, 0.9)).view(1, 3)
    sampler = torch.log(t(0.25, 0.4, 0.3)).view(1, 3)
    # ratios 2.0, 0.5, 3.0; cap 2.5 -> 2.0, 0.5, 2.5
    w = L.truncated_is_weights(old, sampler, cap=2.5)
    close(w, [[2.0, 0.5, 2.5]])
    assert not w.requires_grad
    with pytest.raises(ValueError):
        L.truncated_is_weights(old, sampler, cap=0.0)
    # PPO at ratio 1 (logps == old), A = (1, -2, 1): L = -A -> weighted (-2, 1, -2.5)
    logps = old.clone().requires_grad_()
    adv = t(1.0, -2.0, 1.0).view(1, 3)
    loss = L.ppo_policy_loss(logps, old, adv, 0.2, is_weights=w)
    close(loss.detach(), [[-2.0, 1.0, -2.5]])
    loss.sum().backward()
    close(logps.grad, [[-2.0, 1.0, -2.5]])   # d(-w A r)/dlogp = -w A r at r = 1
    # GRPO: the weight multiplies the surrogate, not the KL term. ratio 1, A = 1, pi = 0.25,
    # ref = 0.5: k3 = 2 - log 2 - 1; w = 2: L = -2 + 0.1 k3
    lp = torch.log(t(0.25)).view(1, 1)
    close(L.grpo_loss(lp, lp, torch.log(t(0.5)).view(1, 1), t(1.0), 0.2, 0.1,
                      is_weights=t(2.0).view(1, 1)), [[-2.0 + 0.1 * (1 - math.log(2))]])


def test_ppo_policy_parity_with_paper_objective():
    g = torch.Generator().manual_seed(40)
    logps = -torch.rand(3, 7, generator=g, dtype=D) * 3
    old = logps + 0.4 * torch.randn(3, 7, generator=g, dtype=D)
    adv = torch.randn(3, 7, generator=g, dtype=D)
    eps = 0.2
    expected = [[0.0] * 7 for _ in range(3)]
    for b in range(3):
        for s in range(7):
            r = math.exp(logps[b, s].item()) / math.exp(old[b, s].item())
            a = adv[b, s].item()
            # eq. 7: L^CLIP = min(r A, clip(r, 1-eps, 1+eps) A); the loss is its negation
            expected[b][s] = -min(r * a, min(max(r, 1 - eps), 1 + eps) * a)
    close(L.ppo_policy_loss(logps, old, adv, eps), expected, 1e-10)


def test_ppo_value_hand_values():
    values, old, returns = t(1.0, 0.6, 1.0), t(0.5, 0.5, 0.5), t(2.0, 0.0, 0.0)
    # V=1, V_old=.5, R=2: V_clip=.7; max(1, 1.69)/2 = 0.845
    # V=.6: V_clip=.6, 0.36/2 = 0.18;  V=1, R=0: V_clip=.7, max(1, .49)/2 = 0.5
    close(L.ppo_value_loss(values, old, returns, 0.2), [0.845, 0.18, 0.5])
    close(L.ppo_value_loss(values, old, returns, None), [0.5, 0.18, 0.5])
    v = values.clone().requires_grad_()
    L.ppo_value_loss(v, old, returns, 0.2).sum().backward()
    # token 0: clipped term wins -> no gradient; tokens 1, 2: d/dV 0.5 (V-R)^2 = V - R
    close(v.grad, [0.0, 0.6, 1.0])


# ----------------------------------------------------------------------------------------- GRPO

def test_grpo_hand_value_and_gradient():
    # ratio 1, A = 1: surrogate -1; ref - pi = log 2: k3 = 2 - log 2 - 1 = 0.3068528194400546
    # L = -1 + 0.1 * 0.3068528194400546 = -0.9693147180559946
    logps = torch.log(t(0.25)).view(1, 1).requires_grad_()
    old = torch.log(t(0.25)).view(1, 1)
    ref = torch.log(t(0.5)).view(1, 1)
    loss = L.grpo_loss(logps, old, ref, t(1.0), clip_eps=0.2, beta=0.1)
    close(loss.detach(), [[-0.9693147180559946]])
    loss.sum().backward()
    # d/dlogp: -A r = -1; beta * d k3/dlogp = 0.1 * (1 - ref/pi) = 0.1 * (1 - 2) = -0.1
    close(logps.grad, [[-1.1]])


def test_grpo_parity_with_paper_equation():
    g = torch.Generator().manual_seed(50)
    logps = -torch.rand(4, 5, generator=g, dtype=D) * 3
    old = logps + 0.3 * torch.randn(4, 5, generator=g, dtype=D)
    ref = logps + 0.5 * torch.randn(4, 5, generator=g, dtype=D)
    adv = torch.randn(4, generator=g, dtype=D)
    eps, beta = 0.2, 0.04
    expected = [[0.0] * 5 for _ in range(4)]
    for b in range(4):
        for s in range(5):
            p, p_old, p_ref = (math.exp(v[b, s].item()) for v in (logps, old, ref))
            a = adv[b].item()
            r = p / p_old
            kl = p_ref / p - math.log(p_ref / p) - 1  # eq. 4
            expected[b][s] = -(min(r * a, min(max(r, 1 - eps), 1 + eps) * a) - beta * kl)
    close(L.grpo_loss(logps, old, ref, adv, eps, beta), expected, 1e-10)

"""The RL algorithms on hand-computed values: GAE, group baselines, clipping, aggregation."""
from __future__ import annotations

import pytest
import torch

from steplab.rl import algos


def test_token_rewards_on_last_token():
    # responses start after prompts of different lengths: the reward goes on each row's last response token
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1], [0, 1, 0, 0]], dtype=torch.bool)
    r = algos.token_rewards(torch.tensor([1.0, 0.5, 1.0, 2.0, 3.0]), mask)
    assert r.tolist() == [[0, 0, 1, 0], [0.5, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 2], [0, 3, 0, 0]]


def test_gae_lambda_gamma_one_is_reward_to_go_minus_value():
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.float32)
    values = torch.randn(2, 6)
    rewards = torch.randn(2, 6) * mask
    adv, ret = algos.gae(rewards, values, mask, 1.0, 1.0)
    to_go = torch.flip(torch.cumsum(torch.flip(rewards, [1]), 1), [1]) * mask
    assert torch.allclose(adv, (to_go - values) * mask, atol=1e-6)
    assert torch.allclose(ret, to_go, atol=1e-6)


def test_gae_matches_hand_computation():
    r = torch.tensor([[0.0, 0.0, 1.0]])
    v = torch.tensor([[0.5, 0.2, 0.4]])
    m = torch.ones(1, 3)
    g, lam = 0.9, 0.8
    d2 = 1.0 - 0.4
    d1 = 0.0 + g * 0.4 - 0.2
    d0 = 0.0 + g * 0.2 - 0.5
    a2, a1 = d2, d1 + g * lam * d2
    a0 = d0 + g * lam * a1
    adv, ret = algos.gae(r, v, m, g, lam)
    assert torch.allclose(adv, torch.tensor([[a0, a1, a2]]), atol=1e-6)
    assert torch.allclose(ret, adv + v)


def test_group_advantages():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    g = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    reinforce = algos.group_advantages(r, g, "reinforce")
    assert reinforce.tolist() == [0.5, -0.5, -0.5, 0.5, 0.25, 0.25, 0.25, -0.75]
    assert torch.equal(algos.group_advantages(r, g, "dr-grpo"), reinforce)
    grpo = algos.group_advantages(r, g, "grpo")
    std0 = torch.tensor([1.0, 0, 0, 1]).std()
    assert grpo[0].item() == pytest.approx(0.5 / (std0.item() + 1e-6))
    rloo = algos.group_advantages(r, g, "rloo")
    # leave-one-out: r_i - mean of the other three
    assert rloo.tolist() == pytest.approx([2 / 3, -2 / 3, -2 / 3, 2 / 3, 1 / 3, 1 / 3, 1 / 3, -1])
    # rloo = n/(n-1) x the mean-baseline advantage
    assert torch.allclose(rloo, reinforce * 4 / 3)
    # an all-equal group teaches nothing
    assert algos.group_advantages(torch.ones(4), torch.zeros(4, dtype=torch.long), "grpo").abs().max() == 0


def test_policy_loss_clips():
    mask = torch.ones(1, 4, dtype=torch.bool)
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1, 0.7]]))  # ratios
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    loss, info = algos.policy_loss(logp, old, adv, mask, 0.2)
    # per token: -min(rA, clip(r)A): A>0, r=1.5 -> -1.2 (clipped); A>0, r=0.5 -> -0.5; A<0, r=1.1 -> 1.1; A<0, r=0.7 -> 0.8
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.1 + 0.8) / 4)
    assert info["clip_frac"] == pytest.approx(0.5)
    # clipped tokens carry no gradient
    logp = logp.clone().requires_grad_(True)
    algos.policy_loss(logp, old, adv, mask, 0.2)[0].backward()
    assert logp.grad[0, 0] == 0 and logp.grad[0, 3] == 0 and logp.grad[0, 1] != 0 and logp.grad[0, 2] != 0


def test_value_loss_clips():
    mask = torch.ones(1, 2, dtype=torch.bool)
    old = torch.tensor([[0.0, 0.0]])
    ret = torch.tensor([[1.0, 1.0]])
    v = torch.tensor([[0.5, -0.5]])
    # token 0: max((0.5-1)^2, (0.2-1)^2) = 0.64; token 1: max((-1.5)^2, (-0.2-1)^2) = 2.25
    assert algos.value_loss(v, old, ret, mask, 0.2).item() == pytest.approx(0.5 * (0.64 + 2.25) / 2)


def test_aggregation():
    loss = torch.tensor([[1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    assert algos.aggregate(loss, mask, "token-mean").item() == pytest.approx(8 / 5)
    assert algos.aggregate(loss, mask, "seq-mean").item() == pytest.approx((1 + 4) / 2)
    assert algos.aggregate(loss, mask, "token-sum", max_tokens=8).item() == pytest.approx(8 / (2 * 8))


def test_whiten():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    w = algos.masked_whiten(x, mask)
    assert w[0, 3] == 0 and w[0, :3].mean().abs() < 1e-6 and (w[0, :3] ** 2).mean() == pytest.approx(1, abs=1e-4)

"""PPO's math (objectives/ppo.py) against numbers worked out by hand and with plain Python loops."""

from __future__ import annotations

import math
import random

import pytest
import torch

from lmforge.training.objectives.ppo import (AdaptiveKLController, entropy_from_logits, gae, masked_whiten,
                                             policy_loss, shaped_rewards, value_loss)


def test_gae_hand_worked() -> None:
    """gamma 0.9, lam 0.8: delta_2 = 1 - 0.3 = 0.7; delta_1 = -0.2 + 0.9*0.3 - 0.4 = -0.33,
    A_1 = -0.33 + 0.72*0.7 = 0.174; delta_0 = 0.1 + 0.9*0.4 - 0.5 = -0.04, A_0 = -0.04 + 0.72*0.174."""
    rewards = torch.tensor([[0.1, -0.2, 1.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.4, 0.3]], dtype=torch.float64)
    adv, ret = gae(rewards, values, torch.ones(1, 3, dtype=torch.bool), gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv, torch.tensor([[0.08528, 0.174, 0.7]], dtype=torch.float64))
    torch.testing.assert_close(ret, torch.tensor([[0.58528, 0.574, 1.0]], dtype=torch.float64))


def _gae_loops(rewards: list[float], values: list[float], gamma: float, lam: float) -> tuple[list, list]:
    """GAE for one response by its definition A_t = sum_l (gamma lam)^l delta_{t+l}, V after the end = 0."""
    n = len(rewards)
    deltas = [rewards[t] + gamma * (values[t + 1] if t + 1 < n else 0.0) - values[t] for t in range(n)]
    adv = [sum((gamma * lam) ** k * deltas[t + k] for k in range(n - t)) for t in range(n)]
    return adv, [a + v for a, v in zip(adv, values)]


def test_gae_with_right_padding_equals_the_definition() -> None:
    rng = random.Random(0)
    lengths, T = [5, 2, 4], 5
    rewards = torch.tensor([[rng.uniform(-1, 1) for _ in range(T)] for _ in lengths], dtype=torch.float64)
    values = torch.tensor([[rng.uniform(-1, 1) for _ in range(T)] for _ in lengths], dtype=torch.float64)
    mask = torch.tensor([[t < n for t in range(T)] for n in lengths])
    adv, ret = gae(rewards, values, mask, gamma=0.95, lam=0.9)
    for b, n in enumerate(lengths):
        want_adv, want_ret = _gae_loops(rewards[b, :n].tolist(), values[b, :n].tolist(), 0.95, 0.9)
        assert adv[b, :n].tolist() == pytest.approx(want_adv, abs=1e-12)
        assert ret[b, :n].tolist() == pytest.approx(want_ret, abs=1e-12)
        assert not adv[b, n:].any() and not ret[b, n:].any()


def test_clipped_policy_loss_hand_worked() -> None:
    """eps 0.2; ratios 1.5, 0.5, 1.1 with advantages 1, -1, 2: max(-1.5, -1.2) = -1.2 (clipped),
    max(0.5, 0.8) = 0.8 (clipped), max(-2.2, -2.2) = -2.2; the padded 4th token is ignored."""
    old = torch.tensor([[-1.0, -2.0, -0.5, -3.0]], dtype=torch.float64)
    ratio = torch.tensor([[1.5, 0.5, 1.1, 9.0]], dtype=torch.float64)
    adv = torch.tensor([[1.0, -1.0, 2.0, 5.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False]])
    loss, stats = policy_loss(old + ratio.log(), old, adv, mask, clip_range=0.2)
    assert float(loss) == pytest.approx((-1.2 + 0.8 - 2.2) / 3)
    assert float(stats["clip_frac"]) == pytest.approx(2 / 3)
    assert float(stats["approx_kl"]) == pytest.approx(sum(0.5 * math.log(r) ** 2 for r in (1.5, 0.5, 1.1)) / 3)


def test_clipped_policy_loss_equals_loops_and_its_gradient_stops_outside_the_clip() -> None:
    rng = random.Random(1)
    B, T, eps = 3, 6, 0.1
    old = torch.tensor([[rng.uniform(-3, -0.1) for _ in range(T)] for _ in range(B)], dtype=torch.float64)
    new = (old + torch.tensor([[rng.uniform(-0.3, 0.3) for _ in range(T)] for _ in range(B)],
                              dtype=torch.float64)).requires_grad_()
    adv = torch.tensor([[rng.uniform(-2, 2) for _ in range(T)] for _ in range(B)], dtype=torch.float64)
    mask = torch.tensor([[t < n for t in range(T)] for n in (6, 3, 1)])
    loss, _ = policy_loss(new, old, adv, mask, eps)
    terms, clipped_tokens, plain_new = [], set(), new.detach()
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            r = math.exp(float(plain_new[b, t]) - float(old[b, t]))
            a = float(adv[b, t])
            plain, clip = -a * r, -a * min(max(r, 1 - eps), 1 + eps)
            terms.append(max(plain, clip))
            if clip > plain:
                clipped_tokens.add((b, t))
    assert float(loss) == pytest.approx(sum(terms) / len(terms), abs=1e-12)
    loss.backward()
    for b in range(B):
        for t in range(T):
            zero = (b, t) in clipped_tokens or not mask[b, t]
            assert (float(new.grad[b, t]) == 0.0) == zero


def test_clipped_value_loss_hand_worked() -> None:
    """c 0.2: V 1.0 (old 0.5) clips to 0.7, max((1-2)^2, (0.7-2)^2) = 1.69; V 0.0 (old 0.2) clips to 0.0,
    both terms (0+1)^2 = 1; loss = 0.5 * (1.69 + 1) / 2."""
    values = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    old = torch.tensor([[0.5, 0.2]], dtype=torch.float64)
    returns = torch.tensor([[2.0, -1.0]], dtype=torch.float64)
    loss, frac = value_loss(values, old, returns, torch.ones(1, 2, dtype=torch.bool), clip_range_value=0.2)
    assert float(loss) == pytest.approx(0.5 * (1.69 + 1.0) / 2)
    assert float(frac) == pytest.approx(0.5)


def test_shaped_rewards_put_the_score_on_the_last_response_token() -> None:
    logp = torch.tensor([[-1.0, -2.0, -1.5], [-0.5, -0.7, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -1.5], [-0.5, -1.7, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    rewards, kl = shaped_rewards(torch.tensor([2.0, -1.0]), logp, ref, mask, beta=0.1)
    torch.testing.assert_close(kl, torch.tensor([[0.5, -1.0, 0.0], [0.0, 1.0, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.1, 2.0], [0.0, -0.1 - 1.0, 0.0]]))


def test_whitening_uses_only_the_masked_entries() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -50.0, -50.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    kept = [1.0, 2.0, 3.0, 4.0, 5.0]
    mean = sum(kept) / 5
    std = math.sqrt(sum((v - mean) ** 2 for v in kept) / 4)
    out = masked_whiten(x, mask)
    assert out[mask].tolist() == pytest.approx([(v - mean) / std for v in kept], abs=1e-6)
    assert not out[~mask].any()


def test_entropy_of_uniform_and_one_hot() -> None:
    ent = entropy_from_logits(torch.tensor([[0.0] * 8, [0.0, -1e9, -1e9, -1e9, -1e9, -1e9, -1e9, -1e9]]))
    assert ent.tolist() == pytest.approx([math.log(8), 0.0], abs=1e-6)


@pytest.mark.parametrize("kl, error", [(9.0, 0.2), (3.0, -0.2), (6.6, 0.1), (6.0, 0.0)])
def test_adaptive_kl_controller_follows_ziegler_eq2(kl: float, error: float) -> None:
    """beta <- beta (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon)."""
    ctl = AdaptiveKLController(value=0.2, target=6.0, horizon=10000)
    assert ctl.update(kl, 256) == pytest.approx(0.2 * (1 + error * 256 / 10000))
    fixed = AdaptiveKLController(value=0.2, target=None)
    assert fixed.update(kl, 256) == 0.2

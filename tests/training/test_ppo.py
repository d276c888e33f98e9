"""PPO: the math (objectives/ppo.py) against hand-worked numbers and plain loops; the loop (training/ppo.py)
on a tiny model."""

from __future__ import annotations

import json
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
    assert float(loss.detach()) == pytest.approx(sum(terms) / len(terms), abs=1e-12)
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


# -- the loop (training/ppo.py) on a tiny model ---------------------------------------------------------------

def _tiny_policy(vocab: int = 32) -> torch.nn.Module:
    """tiny-llama with LoRA; the final norm's gain is 4 so the random head's logits spread enough for a rank-4
    adapter to move the distribution (at gain 1 the RMS-normalised hidden state caps each logit near 0.2)."""
    from lmforge.config import Config
    from lmforge.model.transformer import build_model
    from lmforge.training.lora import LoRAConfig, apply_lora

    torch.manual_seed(0)
    model = build_model(Config.from_name("tiny-llama", vocab_size=vocab, block_size=64))
    with torch.no_grad():
        model.model.norm.weight.fill_(4.0)
    return apply_lora(model, LoRAConfig(rank=4, alpha=8.0))


def _prompts(n: int = 32, vocab: int = 32) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(2, vocab) for _ in range(rng.randrange(3, 8))] for _ in range(n)]


def test_ppo_raises_a_scripted_reward_while_kl_stays_under_its_target(tmp_path) -> None:
    """Reward = share of token 5 in an 8-token response (1/32 at the start): PPO raises it; KL stays < target."""
    from lmforge.training.ppo import PPOConfig, run_ppo, token_fraction_reward
    from lmforge.training.trainer import TrainConfig

    torch.set_num_threads(1)
    cfg = PPOConfig(reward="token_fraction", reward_token_id=5, rollout_batch=16, mini_batch=4, max_new_tokens=8,
                    init_kl_coef=0.1, kl_target=6.0)
    train = TrainConfig(max_steps=8, lr=1e-3, warmup_steps=0, decay="constant", save_every=0, progress=False)
    summary = run_ppo(_tiny_policy(), _prompts(), token_fraction_reward(5), cfg, train, tmp_path, eos_id=1, pad_id=0)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first, last = sum(r["reward"] for r in rows[:2]) / 2, sum(r["reward"] for r in rows[-3:]) / 3
    assert first < 0.08 and last > first + 0.1, [round(r["reward"], 3) for r in rows]
    assert max(r["kl"] for r in rows) < cfg.kl_target
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # the adapter starts at zero: policy == reference
    assert {"clip_frac", "value_loss", "entropy", "kl_coef", "reward"} <= set(rows[-1])
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "value_head.safetensors").is_file() and summary["plot"]


def test_ppo_resumes_after_a_kill_with_the_same_numbers(tmp_path) -> None:
    """A run stopped during iteration 3 (after checkpoint 2) and run again ends where an unbroken run ends."""
    from lmforge.training.ppo import PPOConfig, run_ppo, token_fraction_reward
    from lmforge.training.trainer import TrainConfig

    torch.set_num_threads(1)
    cfg = PPOConfig(reward="token_fraction", reward_token_id=5, rollout_batch=8, mini_batch=4, ppo_epochs=2,
                    max_new_tokens=6, init_kl_coef=0.1, kl_target=1.0, kl_horizon=100)  # beta moves: restored too
    train = TrainConfig(max_steps=4, lr=1e-3, warmup_steps=0, save_every=1, progress=False)
    reward = token_fraction_reward(5)
    run_ppo(_tiny_policy(), _prompts(), reward, cfg, train, tmp_path / "whole", eos_id=1, pad_id=0)
    calls = []

    def dies_in_iteration_3(prompts, responses):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # a kill after checkpoint 2
        return reward(prompts, responses)

    with pytest.raises(KeyboardInterrupt):
        run_ppo(_tiny_policy(), _prompts(), dies_in_iteration_3, cfg, train, tmp_path / "broken", eos_id=1, pad_id=0)
    run_ppo(_tiny_policy(), _prompts(), reward, cfg, train, tmp_path / "broken", eos_id=1, pad_id=0)

    def rows(run: str) -> list[dict]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]

    assert [r["step"] for r in rows("broken")] == [1, 2, 3, 4]
    assert rows("broken") == rows("whole")

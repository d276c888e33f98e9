"""PPO for language models, the math only: KL-shaped rewards, GAE, whitening, the clipped losses, the
adaptive KL coefficient. The loop that rolls out, scores and updates is lmforge/training/ppo.py.

Tensors are per response token, (B, T) with a `mask` (B, T) that is True on real response tokens and False
on the right padding. The formulas follow Ziegler et al. 2019 (https://arxiv.org/abs/1909.08593, eq. 2 and
the per-token KL penalty), Schulman et al. 2017 (PPO, https://arxiv.org/abs/1707.06347, eq. 7 and 9),
Schulman et al. 2015 (GAE, https://arxiv.org/abs/1506.02438, eq. 16) and the clipped value loss of the
PPO baselines that trl's PPOTrainer keeps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over the True entries of mask (a scalar)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries (unbiased variance, as trl); padding is set to 0."""
    mean = masked_mean(x, mask)
    centred = (x - mean) * mask
    n = mask.sum().clamp(min=2.0)
    var = (centred ** 2).sum() / (n - 1)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """The sampled-token KL estimate log pi(a|s) - log pi_ref(a|s) (Ziegler et al. 2019, section 2.2);
    its sum over a response is an unbiased estimate of KL(pi || pi_ref) for that prompt."""
    return logprobs - ref_logprobs


def shaped_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                   beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards r_t = -beta * KL_t, plus the sequence score at each row's last response token
    (Ziegler et al. 2019, eq. 2 spread over tokens as in their code and trl). Returns (rewards, kl), (B, T).

    Args:
        scores: (B,) reward model (or scripted) score of each whole response.
        logprobs, ref_logprobs: (B, T) log-probabilities of the sampled tokens under the policy
            that sampled them and under the reference model.
        mask: (B, T) True on response tokens (right padding False); every row needs one token.
    """
    kl = kl_per_token(logprobs, ref_logprobs) * mask
    rewards = -beta * kl
    last = mask.long().sum(dim=1) - 1  # (B,) index of each row's last response token
    if bool((last < 0).any()):
        raise ValueError("every response needs at least one token to carry its score")
    rewards[torch.arange(rewards.shape[0], device=rewards.device), last] += scores.to(rewards.dtype)
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2015, eq. 16): delta_t = r_t + gamma V_{t+1} - V_t,
    A_t = sum_l (gamma lam)^l delta_{t+l}, with V = 0 after a response's last token; returns
    (advantages, returns = A + V), both zero on padding."""
    mask = mask.to(values.dtype)
    values, rewards = values * mask, rewards * mask
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):  # one backward sweep; padded steps contribute 0 and reset nothing
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_range: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7) as a loss to minimise:
    mean_t max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps)), rho_t = pi(a_t|s_t) / pi_old(a_t|s_t).
    Also returns the fraction of tokens where clipping took effect and the approximate KL to pi_old."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    stats = {"clip_frac": masked_mean((clipped > unclipped).float(), mask).detach(),
             "approx_kl": masked_mean(0.5 * (logprobs - old_logprobs) ** 2, mask).detach()}
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip_range_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss 0.5 * mean_t max((V_t - R_t)^2, (clip(V_t, V_old -+ c) - R_t)^2) (the PPO
    baselines' form, kept by trl); returns (loss, fraction of tokens where the clipped term won)."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    plain, clipped = (values - returns) ** 2, (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(plain, clipped), mask)
    return loss, masked_mean((clipped > plain).float(), mask).detach()


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution of each row of logits (..., V) -> (...)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


@dataclass
class AdaptiveKLController:
    """beta adapted toward a KL target (Ziegler et al. 2019, eq. 2): e_t = clip(KL_t / target - 1, -0.2, 0.2),
    beta_{t+1} = beta_t (1 + K_beta e_t) with K_beta = n_steps / horizon (their K_beta = 0.1)."""

    value: float
    target: float | None
    horizon: int = 10000

    def update(self, current_kl: float, n_steps: int) -> float:
        """Move beta after a batch whose mean sequence KL was current_kl; n_steps = episodes in it."""
        if self.target is None:  # a fixed coefficient
            return self.value
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


@dataclass
class PPOConfig:
    """The `ppo` recipe section. Defaults are trl's PPOConfig, which took them from Ziegler et al.'s
    lm-human-preferences (beta 0.2 adapted toward 6 nats over a 10000-episode horizon, gamma 1, lam 0.95,
    clip 0.2 for policy and value, vf_coef 0.1, 4 PPO epochs). The loop's lr, steps, seed, checkpoint
    interval and grad clipping come from the `train` section (max_steps = PPO iterations)."""

    reward: str = "model"  # model (reward_model below) | token_fraction | length (scripted, transparent)
    reward_model: str | None = None  # folder written by `lmforge finetune --recipe reward`
    reward_token_id: int = 0  # token_fraction: reward = share of response tokens equal to this id
    target_length: int = 32  # length: reward = -|response tokens - target| / target
    prompts: str | None = None  # JSONL with "prompt" (or Alpaca "instruction"); None -> Python FAQ questions
    max_prompt_length: int = 128  # longer prompts are skipped
    rollout_batch: int = 16  # episodes per iteration
    mini_batch: int = 4  # episodes per gradient step
    ppo_epochs: int = 4
    max_new_tokens: int = 48
    init_kl_coef: float = 0.2  # beta at the start
    kl_target: float | None = 6.0  # nats per response; None keeps beta fixed
    kl_horizon: int = 10000
    clip_range: float = 0.2
    clip_range_value: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95

    def __post_init__(self) -> None:
        if self.reward not in REWARDS:
            raise ValueError(f"ppo.reward={self.reward!r} must be one of {REWARDS}")
        for name in ("rollout_batch", "mini_batch", "ppo_epochs", "max_new_tokens", "max_prompt_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"ppo.{name}={getattr(self, name)} must be >= 1")
        if self.rollout_batch % self.mini_batch:
            raise ValueError(f"ppo.rollout_batch={self.rollout_batch} must be a multiple of "
                             f"ppo.mini_batch={self.mini_batch}")
        if self.init_kl_coef < 0 or (self.kl_target is not None and self.kl_target <= 0):
            raise ValueError("ppo.init_kl_coef must be >= 0 and ppo.kl_target > 0 (or null for a fixed beta)")


REWARDS = ("model", "token_fraction", "length")

"""Reward model for RLHF: a decoder with a scalar head read at each row's last real token, trained on
preference pairs with the Bradley-Terry loss (Ouyang et al. 2022, https://arxiv.org/abs/2203.02155, eq. 1;
Ziegler et al. 2019, https://arxiv.org/abs/1909.08593, section 2.2):

    L = -log sigmoid(r(x, y_chosen) - r(x, y_rejected) - m) + c * (r(x, y_chosen) + r(x, y_rejected))^2

with trl RewardTrainer's optional margin m per pair (Llama 2, Touvron et al. 2023, eq. 2) and its
center_rewards_coefficient c (Eisenstein et al. 2023), which pulls the rewards toward zero mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.training.objectives.forward import hidden_states


class RewardModel(nn.Module):
    """The decoder (LoRA on it or not) and `score`, a bias-free linear n_embd -> 1 (Hugging Face's
    *ForSequenceClassification head), applied to the final hidden state of each row's last real token."""

    def __init__(self, decoder: nn.Module) -> None:
        super().__init__()
        self.decoder = decoder
        self.score = nn.Linear(decoder.config.n_embd, 1, bias=False, device=decoder.lm_head.weight.device)
        nn.init.normal_(self.score.weight, std=0.02)  # transformers' initializer_range for `score`

    @property
    def config(self):
        return self.decoder.config

    @property
    def gradient_checkpointing(self) -> bool:
        return getattr(self.decoder, "gradient_checkpointing", False)

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        self.decoder.gradient_checkpointing = value

    def forward(self, batch: dict) -> torch.Tensor:
        """Rewards (rows,) of a right-padded batch (`input_ids`, `positions`, optional `valid`)."""
        hidden = hidden_states(self.decoder, batch)  # (B, T, n_embd)
        last = last_token_index(batch)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return self.score(hidden[rows, last].to(self.score.weight.dtype)).squeeze(-1).float()


def last_token_index(batch: dict) -> torch.Tensor:
    """Each row's last real (non-pad) position (B,) with right padding: from `valid` (False at padding);
    without it every row is full length."""
    ids = batch["input_ids"]
    valid = batch.get("valid")
    if valid is None:
        return torch.full((ids.shape[0],), ids.shape[1] - 1, dtype=torch.long, device=ids.device)
    positions = torch.arange(ids.shape[1], device=ids.device)
    return (positions * valid.long()).argmax(dim=1)  # rightmost True (Hugging Face's rule for padded rows)


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None,
                       center_coef: float | None = None) -> torch.Tensor:
    """Per-pair losses (B,): -log sigmoid(r_c - r_r - margin) (+ center_coef * (r_c + r_r)^2); their mean is
    trl RewardTrainer's loss."""
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin.to(diff.dtype)
    losses = -F.logsigmoid(diff)
    if center_coef:
        losses = losses + center_coef * (chosen + rejected) ** 2
    return losses


class RewardObjective:
    """`objective(model, batch) -> loss` for the shared loop over pair batches (B pairs as 2B rows, chosen
    first, `pairs` = B); `take_metrics()` gives the accuracy and mean rewards of the pairs since the last call."""

    def __init__(self, center_coef: float | None = None, use_margin: bool = True) -> None:
        self.center_coef, self.use_margin = center_coef, use_margin
        self._sums: dict[str, float] = {}
        self._pairs = 0

    def __call__(self, model: RewardModel, batch: dict) -> torch.Tensor:
        B = int(batch["pairs"])
        rewards = model(batch)
        margin = batch.get("margin") if self.use_margin else None
        losses = bradley_terry_loss(rewards[:B], rewards[B:], margin, self.center_coef)
        self._record(rewards[:B].detach(), rewards[B:].detach())
        return losses.sum() / batch.get("loss_tokens", B)  # the step's mean over pairs

    def _record(self, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
        for key, value in pair_stats(chosen, rejected).items():
            self._sums[key] = self._sums.get(key, 0.0) + value * chosen.shape[0]
        self._pairs += int(chosen.shape[0])

    def take_metrics(self) -> dict[str, float]:
        """Means over the pairs seen since the last call, then reset (the trainer asks after each step and
        each evaluation: accuracy, eval_accuracy in its rows)."""
        out = {k: v / self._pairs for k, v in self._sums.items()} if self._pairs else {}
        self._sums, self._pairs = {}, 0
        return out


def pair_stats(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    """Accuracy (share of pairs with r_chosen > r_rejected) and the mean rewards."""
    return {"accuracy": float((chosen > rejected).float().mean()), "reward_chosen": float(chosen.mean()),
            "reward_rejected": float(rejected.mean())}


@torch.no_grad()
def pair_accuracy(model: RewardModel, batches: list[dict]) -> dict[str, float]:
    """pair_stats over every pair of `batches` (pair batches, chosen rows first)."""
    was = model.training
    model.eval()
    device = model.score.weight.device
    chosen, rejected = [], []
    for batch in batches:
        B = int(batch["pairs"])
        rewards = model({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
        chosen.append(rewards[:B])
        rejected.append(rewards[B:])
    model.train(was)
    return pair_stats(torch.cat(chosen), torch.cat(rejected))


@dataclass
class RewardConfig:
    """The `reward` recipe section: trl RewardTrainer's optional centring term and the pair lengths."""

    center_rewards_coefficient: float | None = None  # trl's default None; Eisenstein et al. 2023 use 0.01
    max_prompt_length: int = 128  # a longer prompt is refused (ValueError naming file:line)
    max_length: int = 320  # prompt + response; a response is cut to fit

    def __post_init__(self) -> None:
        if self.center_rewards_coefficient is not None and self.center_rewards_coefficient < 0:
            raise ValueError(f"reward.center_rewards_coefficient={self.center_rewards_coefficient} must be >= 0")
        if not 1 <= self.max_prompt_length < self.max_length:
            raise ValueError(f"reward.max_prompt_length={self.max_prompt_length} must be >= 1 and below "
                             f"reward.max_length={self.max_length}")

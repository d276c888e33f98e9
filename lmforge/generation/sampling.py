"""Sampling: one `SamplingParams` for generation, engine and server, and the logits warpers.

Warpers run in Hugging Face's order: repetition penalty, temperature, top-k, top-p, min-p.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from lmforge.generation.constrained import Constraint


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop. temperature=0 means greedy.

    Checked in `__post_init__`, so a bad value fails where it is written, with the fix.
    """

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)  # stop strings, not included in the output
    stop_token_ids: list[int] = field(default_factory=list)  # extra stop tokens beside the model's EOS
    ignore_eos: bool = False
    seed: int | None = None
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | Literal["never"] = False
    constraint: Constraint | None = None  # a grammar the output must match (generation/constrained.py)

    def __post_init__(self) -> None:
        checks = [
            (self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
            (self.temperature >= 0, "temperature must be >= 0 (0 = greedy)"),
            (self.top_k >= 0, "top_k must be >= 0 (0 = off)"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p < 1, "min_p must be in [0, 1)"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0 (1 = off)"),
            (self.num_beams >= 1, "num_beams must be >= 1"),
            (self.early_stopping in (True, False, "never"), "early_stopping must be true, false or 'never'"),
            (all(isinstance(s, str) and s for s in self.stop), "stop must be a list of non-empty strings"),
        ]
        for ok, rule in checks:
            if not ok:
                raise ValueError(f"invalid SamplingParams: {rule}; got {self!r}")
        if self.constraint is not None and not isinstance(self.constraint, Constraint):
            raise ValueError("constraint must be a Constraint, e.g. Constraint('json_schema', schema); "
                             f"got {type(self.constraint).__name__}")
        if self.num_beams > 1 and not self.greedy:
            raise ValueError("beam search here is deterministic: set temperature=0 with num_beams > 1")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty (Keskar et al. 2019): seen tokens' positive logits / p, negative ones * p.

    Args:
        logits: (B, V); history: (B, L) token ids seen so far (prompt and output; -1 = padding).
    """
    if penalty == 1.0 or history.numel() == 0:
        return logits
    counts = torch.zeros_like(logits, dtype=torch.int32)
    counts.scatter_add_(1, history.clamp(min=0), (history >= 0).int())
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(counts > 0, penalized, logits)


def warp(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p applied to (B, V) logits; filtered entries become -inf."""
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # probability of strictly better-ranked tokens
        drop_sorted = mass_before >= params.top_p  # the best token always stays
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if params.min_p > 0.0:
        probs = logits.softmax(-1)
        floor = params.min_p * probs.max(-1, keepdim=True).values
        logits = logits.masked_fill(probs < floor, float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, history: torch.Tensor | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V)."""
    logits = logits.float()
    if history is not None:
        logits = apply_repetition_penalty(logits, history, params.repetition_penalty)
    if params.greedy:
        return logits.argmax(-1)
    probs = warp(logits, params).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def token_probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution `sample` draws from, (B, V): for tests and logprobs."""
    return warp(logits.float(), params).softmax(-1)

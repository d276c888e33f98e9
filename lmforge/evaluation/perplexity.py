"""Perplexity of a causal LM on a token stream, by strided sliding windows.

Each window holds `context` tokens; only its last `stride` targets are scored (all of the first
window's), so every token is scored once and each sees at least `context - stride` tokens of
left context. With stride == context the windows do not overlap (fastest, least context).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm


@dataclass
class Perplexity:
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens: int  # tokens scored

    @property
    def ppl(self) -> float:
        return math.exp(self.nll)


def windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first_scored) per window over a stream of n tokens: inputs [start, end), targets after."""
    if not 0 < stride <= context:
        raise ValueError(f"stride={stride} must be in 1..context ({context})")
    if n_tokens < 2:
        raise ValueError("perplexity needs at least 2 tokens")
    out, scored = [], 0  # `scored`: targets (positions 1..n-1) already covered
    end = min(context, n_tokens - 1)
    out.append((0, end, 0))
    scored = end
    while scored < n_tokens - 1:
        end = min(scored + stride, n_tokens - 1)
        start = max(0, end - context)
        out.append((start, end, scored - start))
        scored = end
    return out


@torch.inference_mode()
def perplexity(model, ids: list[int] | torch.Tensor, context: int = 512, stride: int | None = None,
               progress: bool = False) -> Perplexity:
    """Mean NLL and perplexity of `ids` under `model` (no cache; each window is one forward).

    Args:
        ids: the token stream (1-D).
        context: tokens per window (at most the model's context length).
        stride: new targets per window (default: context, no overlap).
    """
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    context = min(context, model.config.block_size)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    spans = windows(ids.numel(), context, stride or context)
    for start, end, first in tqdm(spans, desc="perplexity", disable=not progress, unit="window"):
        inputs = ids[start:end].to(device)[None]  # (1, T)
        targets = ids[start + 1:end + 1].to(device)
        logits = model(inputs)[0, first:].float()  # (T - first, vocab)
        total += F.cross_entropy(logits, targets[first:], reduction="sum").item()
        count += targets.numel() - first
    return Perplexity(total / count, count)

"""ALiBi (Press et al. 2022, https://arxiv.org/abs/2108.12409): no position embeddings; each head
adds slope * (key position - query position) to its scores, so distant keys fade linearly and
the model extrapolates past its training length."""

from __future__ import annotations

import math

import torch


def alibi_slopes(n_head: int) -> torch.Tensor:
    """Per-head slopes (n_head,): the geometric series 2^(-8/n) ... for a power of two, and for
    other counts the odd terms of the next power's series appended (as BLOOM and MPT build them)."""
    closest = 2 ** math.floor(math.log2(n_head))
    slopes = [2.0 ** (-8.0 * i / closest) for i in range(1, closest + 1)]
    extra = min(closest, n_head - closest)
    slopes += [2.0 ** (-4.0 * i / closest) for i in range(1, 2 * extra, 2)]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(slopes: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, allowed: torch.Tensor,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive attention bias (B, n_head, T, S): slope * (k - q) where `allowed` (B, 1, T, S), else -inf.

    Args:
        slopes: (n_head,) from `alibi_slopes`.
        q_pos: (B, T) query positions; k_pos: (B, S) key positions.
    """
    distance = (k_pos[:, None, :] - q_pos[:, :, None]).to(torch.float32)  # (B, T, S), <= 0 where visible
    bias = slopes.to(q_pos.device)[None, :, None, None] * distance[:, None]  # (B, n_head, T, S)
    return bias.masked_fill(~allowed, float("-inf")).to(dtype)

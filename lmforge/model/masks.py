"""Attention masks from positions: causal, padding and sliding window in one rule."""

from __future__ import annotations

import torch


def attention_mask(
    q_pos: torch.Tensor, k_pos: torch.Tensor, k_valid: torch.Tensor | None, window: int | None = None
) -> torch.Tensor:
    """Boolean mask (B, 1, T, S): query i may see key j when j is a real token at or before i.

    Args:
        q_pos: (B, T) positions of the queries.
        k_pos: (B, S) positions of the keys (cache slots).
        k_valid: (B, S) False where a key slot is padding or unused; None means all valid.
        window: with sliding-window attention, keys more than `window - 1` positions back are hidden.
    """
    delta = q_pos[:, :, None] - k_pos[:, None, :]  # (B, T, S)
    allowed = delta >= 0
    if window is not None:
        allowed &= delta < window
    if k_valid is not None:
        allowed &= k_valid[:, None, :]
    return allowed[:, None]  # (B, 1, T, S)


def positions_from_padding(valid: torch.Tensor) -> torch.Tensor:
    """Positions (B, T) that count only real tokens, so left padding does not shift RoPE."""
    return (valid.long().cumsum(-1) - 1).clamp(min=0)

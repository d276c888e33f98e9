"""Sinusoidal absolute positions (Vaswani et al. 2017, https://arxiv.org/abs/1706.03762): fixed
sin/cos waves of geometric wavelengths added to the token embeddings; nothing to learn."""

from __future__ import annotations

import torch


def sinusoidal_positions(positions: torch.Tensor, dim: int, base: float = 10000.0) -> torch.Tensor:
    """Embeddings (..., dim) of `positions` (...): sin at even columns, cos at odd, column pair i
    turning at the frequency base^(-2i/dim)."""
    inv = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # (ceil(dim / 2),)
    angles = positions.to(torch.float64)[..., None] * inv  # (..., ceil(dim / 2))
    out = torch.empty(*positions.shape, dim, dtype=torch.float64, device=positions.device)
    out[..., 0::2] = angles.sin()
    out[..., 1::2] = angles[..., : dim // 2].cos()
    return out.float()

"""Rotary position embeddings (RoPE) with the scaling kinds LLaMA-family models use.

Su et al. 2021, https://arxiv.org/abs/2104.09864. Rotation uses the "half split" layout
(Hugging Face / NeoX): the first and second halves of each head are paired.
"""

from __future__ import annotations

import math

import torch

from lmforge.config import Config


def inv_frequencies(config: Config, theta: float) -> torch.Tensor:
    """Per-pair inverse frequencies (head_dim // 2,), after the configured scaling."""
    dim = config.head_dim
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if config.rope_scaling == "linear":
        inv = inv / config.rope_factor
    elif config.rope_scaling == "llama3":
        inv = _llama3_scale(inv, config)
    return inv.float()


def _llama3_scale(inv: torch.Tensor, config: Config) -> torch.Tensor:
    """Llama 3.1 scaling: long wavelengths slowed by `factor`, short kept, a smooth ramp between."""
    low_wavelen = config.rope_original_max_position / config.rope_low_freq_factor
    high_wavelen = config.rope_original_max_position / config.rope_high_freq_factor
    wavelen = 2 * math.pi / inv
    smooth = (config.rope_original_max_position / wavelen - config.rope_low_freq_factor) / (
        config.rope_high_freq_factor - config.rope_low_freq_factor
    )
    blended = (1 - smooth) * inv / config.rope_factor + smooth * inv
    out = torch.where(wavelen > low_wavelen, inv / config.rope_factor, inv)
    is_medium = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return torch.where(is_medium, blended, out)


def rope_cache(config: Config, theta: float, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (length, head_dim) for positions 0..length-1."""
    inv = inv_frequencies(config, theta)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv)  # (length, head_dim // 2)
    angles = torch.cat([angles, angles], dim=-1)  # (length, head_dim)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` (B, n_head, T, head_dim) by the angles in cos/sin (B, 1, T, head_dim)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin

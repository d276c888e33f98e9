"""Rotary position embeddings (RoPE) and the scaling kinds that stretch them to longer contexts.

Su et al. 2021, https://arxiv.org/abs/2104.09864. Rotation uses the "half split" layout
(Hugging Face / NeoX): the first and second halves of each head are paired. Scaling kinds, as
transformers defines them: linear (position interpolation), llama3, NTK-aware (a larger base),
dynamic NTK (the base grows with the sequence), YaRN (per-frequency interpolation + logit scale).
"""

from __future__ import annotations

import math

import torch

from lmforge.config import Config


def base_frequencies(dim: int, theta: float) -> torch.Tensor:
    """Unscaled inverse frequencies theta^(-2i/dim), (dim // 2,), in fp64 (rounded to fp32 once, at the end)."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))


def inv_frequencies(config: Config, theta: float, seq_len: int | None = None, scaled: bool = True) -> torch.Tensor:
    """Per-pair inverse frequencies (head_dim // 2,) after the configured scaling.

    `seq_len` matters only to dynamic NTK (the longest sequence seen); `scaled=False` gives the
    plain table (Gemma's sliding layers keep an unscaled local RoPE).
    """
    dim, kind = config.head_dim, config.rope_scaling if scaled else "none"
    if kind == "ntk":  # NTK-aware (bloc97): stretch the base so the lowest frequency spans factor x longer
        theta = theta * config.rope_factor ** (dim / (dim - 2))
    elif kind == "dynamic":
        theta = dynamic_ntk_theta(config, theta, seq_len)
    inv = base_frequencies(dim, theta)
    if kind == "linear":
        inv = inv / config.rope_factor
    elif kind == "llama3":
        inv = _llama3_scale(inv, config)
    elif kind == "yarn":
        inv = _yarn_scale(inv, config, theta)
    return inv.float()


def dynamic_ntk_theta(config: Config, theta: float, seq_len: int | None) -> float:
    """Dynamic NTK base: unchanged up to the original context, then grown with the sequence length."""
    original = config.rope_original_max_position
    if seq_len is None or seq_len <= original:
        return theta
    dim, factor = config.head_dim, config.rope_factor
    return theta * ((factor * seq_len / original) - (factor - 1)) ** (dim / (dim - 2))


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


def _yarn_correction_dim(rotations: float, dim: int, theta: float, original: int) -> float:
    """The dimension whose frequency turns `rotations` times over the original context."""
    return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))


def _yarn_scale(inv: torch.Tensor, config: Config, theta: float) -> torch.Tensor:
    """YaRN (Peng et al. 2023): frequencies turning more than beta_fast times over the original
    context are kept, fewer than beta_slow are interpolated by `factor`, a linear ramp between."""
    dim, original = config.head_dim, config.rope_original_max_position
    low = max(math.floor(_yarn_correction_dim(config.rope_beta_fast, dim, theta, original)), 0)
    high = min(math.ceil(_yarn_correction_dim(config.rope_beta_slow, dim, theta, original)), dim - 1)
    high = high + 0.001 if low == high else high
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (keep the frequency), 0: interpolate
    return inv / config.rope_factor * (1 - keep) + inv * keep


def attention_factor(config: Config, scaled: bool = True) -> float:
    """YaRN's logit scale, folded into cos and sin (both q and k carry it); 1 for other kinds."""
    if not scaled or config.rope_scaling != "yarn":
        return 1.0
    if config.rope_attention_factor is not None:
        return config.rope_attention_factor
    return yarn_mscale(config.rope_factor)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's temperature, eq. 21 of the paper: 0.1 * mscale * ln(factor) + 1."""
    return 0.1 * mscale * math.log(factor) + 1.0


def rope_cache(config: Config, theta: float, length: int, seq_len: int | None = None,
               scaled: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (length, head_dim) for positions 0..length-1."""
    inv = inv_frequencies(config, theta, seq_len, scaled)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv)  # (length, head_dim // 2)
    angles = torch.cat([angles, angles], dim=-1)  # (length, head_dim)
    scale = attention_factor(config, scaled)
    return angles.cos() * scale, angles.sin() * scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` (B, n_head, T, head_dim) by the angles in cos/sin (B, 1, T, head_dim)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin

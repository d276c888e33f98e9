"""Normalization layers: RMSNorm (LLaMA, Gemma) and LayerNorm (GPT-2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import Config


class RMSNorm(nn.Module):
    """y = x / rms(x) * w, or * (1 + w) with `unit_offset` (Gemma), computed in fp32.

    Zhang & Sennrich 2019, https://arxiv.org/abs/1910.07467
    """

    def __init__(self, dim: int, eps: float = 1e-6, unit_offset: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.unit_offset = unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        weight = self.weight.float()
        if self.unit_offset:
            weight = 1.0 + weight
        return (x * weight).to(dtype)


def build_norm(config: Config, dim: int | None = None) -> nn.Module:
    """The configured norm over `dim` features (default: the model width)."""
    dim = dim or config.n_embd
    if config.norm == "layernorm":
        return nn.LayerNorm(dim, eps=config.norm_eps, bias=True)
    return RMSNorm(dim, eps=config.norm_eps, unit_offset=config.norm_unit_offset)


def layer_norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)

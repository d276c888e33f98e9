"""Feed-forward blocks: SwiGLU (LLaMA), GeGLU (Gemma) and the GELU MLP (GPT-2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import Config
from lmforge.model.linear import Linear


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): SwiGLU with SiLU, GeGLU with tanh-GELU.

    Shazeer 2020, "GLU Variants Improve Transformer", https://arxiv.org/abs/2002.05202
    """

    def __init__(self, config: Config, intermediate_size: int | None = None) -> None:
        super().__init__()
        width = intermediate_size or config.intermediate_size  # a MoE's shared expert has its own width
        self.gate_proj = Linear(config.n_embd, width, bias=config.bias)
        self.up_proj = Linear(config.n_embd, width, bias=config.bias)
        self.down_proj = Linear(width, config.n_embd, bias=config.bias)
        self.geglu = config.mlp == "geglu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate_proj(x)
        gate = F.gelu(gate, approximate="tanh") if self.geglu else F.silu(gate)
        return self.down_proj(gate * self.up_proj(x))


class GeluMLP(nn.Module):
    """proj(gelu(fc(x))) with the tanh approximation GPT-2 was trained with (exact erf for mlp='gelu_erf')."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.up_proj = Linear(config.n_embd, config.intermediate_size, bias=config.bias)
        self.down_proj = Linear(config.intermediate_size, config.n_embd, bias=config.bias)
        self.approximate = "none" if config.mlp == "gelu_erf" else "tanh"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x), approximate=self.approximate))


def build_mlp(config: Config) -> nn.Module:
    return GeluMLP(config) if config.mlp in ("gelu", "gelu_erf") else GatedMLP(config)

"""Feed-forward blocks: SwiGLU (LLaMA), GeGLU (Gemma) and the GELU MLP (GPT-2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import Config
from lmforge.model.linear import Linear


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up keeping only gate and up for backward (autograd keeps silu(gate) too: one
    (tokens x intermediate) tensor per layer more); silu is recomputed in backward."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        dtype = gate.dtype
        if dtype in (torch.bfloat16, torch.float16):  # in fp32, as silu_backward computes internally
            gate, up, grad = gate.float(), up.float(), grad.float()
        sig = torch.sigmoid(gate)
        grad_up = grad * gate * sig  # d/d up = silu(gate)
        grad_gate = grad * up * sig * (1 + gate * (1 - sig))  # d silu(g)/dg = sig (1 + g (1 - sig))
        return grad_gate.to(dtype), grad_up.to(dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up; when training, through _SwiGLU (one saved activation less)."""
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return _SwiGLU.apply(gate, up)
    return F.silu(gate) * up


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
        if not self.geglu:
            return self.down_proj(swiglu(gate, self.up_proj(x)))
        return self.down_proj(F.gelu(gate, approximate="tanh") * self.up_proj(x))


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

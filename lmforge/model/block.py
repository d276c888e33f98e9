"""The pre-norm transformer block and what every model family shares to build itself: uninitialised
embeddings and the GPT-2 initialisation. Decoders (transformer.py), Mamba hybrids (mamba.py) and
encoders (encoder.py) build on it, so none of them imports another."""

from __future__ import annotations

import torch
from torch import nn

from lmforge.config import Config
from lmforge.model.attention import Attention, KVContext
from lmforge.model.mlp import build_mlp
from lmforge.model.moe import Experts, MoE
from lmforge.model.norm import build_norm


class Block(nn.Module):
    """Pre-norm residual block; with `sandwich_norm` the sublayer outputs are normed too (Gemma)."""

    def __init__(self, config: Config, layer_idx: int) -> None:
        super().__init__()
        self.layer_type = config.layer_types[layer_idx]
        self.input_layernorm = build_norm(config)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = build_norm(config)
        self.mlp = MoE(config, layer_idx) if config.is_moe_layer(layer_idx) else build_mlp(config)
        self.sandwich = config.sandwich_norm
        if self.sandwich:
            self.pre_feedforward_layernorm = build_norm(config)
            self.post_feedforward_layernorm = build_norm(config)

    def forward(self, x: torch.Tensor, ctx: KVContext) -> torch.Tensor:
        h = self.self_attn(self.input_layernorm(x), ctx)
        if self.sandwich:
            x = x + self.post_attention_layernorm(h)
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))


def uninitialised_embedding(num: int, dim: int) -> nn.Embedding:
    """An uninitialised embedding (`init_weights` or a checkpoint fills it); nn.Embedding's own
    init would also pull in torch._dynamo on the meta device, a second of start-up."""
    return nn.Embedding.from_pretrained(torch.empty(num, dim), freeze=False)


def init_weights(model: nn.Module, std: float = 0.02) -> None:
    """GPT-2 initialisation: normal(0, 0.02) for linear and embedding weights, zero biases."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, Experts):  # stacked expert weights, initialised as the linears they stack
            nn.init.normal_(module.gate_up_proj, std=std)
            nn.init.normal_(module.down_proj, std=std)

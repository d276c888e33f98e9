"""Causal self-attention: multi-head, multi-query and grouped-query, over a KV cache.

One module covers MHA (n_kv_head == n_head), GQA (1 < n_kv_head < n_head) and MQA
(n_kv_head == 1). The score computation is torch SDPA, plain math or the tiled flash
algorithm (model/flash.py); tests hold them equal.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import Config
from lmforge.model import flash
from lmforge.model.linear import Linear
from lmforge.model.norm import RMSNorm
from lmforge.model.rope import apply_rope


def math_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
    scale: float, softcap: float | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale [+ softcap] + mask) v, written out (the reference for SDPA).

    Args:
        q: (B, n_head, T, head_dim); k, v: (B, n_kv_head, S, head_dim).
        mask: bool (B, 1, T, S), True where attending is allowed; a float bias (B, 1 | n_head, T, S)
            added to the scores (-inf where hidden); or None.
    """
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)  # (B, n_head, S, head_dim)
    v = v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-2, -1)).float() * scale  # (B, n_head, T, S)
    if softcap is not None:  # Gemma 2: cap * tanh(scores / cap)
        scores = softcap * torch.tanh(scores / softcap)
    if is_causal:
        T, S = scores.shape[-2:]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    elif mask is not None:  # an additive bias (ALiBi), -inf where hidden
        scores = scores + mask.float()
    return (scores.softmax(-1).to(v.dtype)) @ v


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool, scale: float,
) -> torch.Tensor:
    """torch's fused scaled_dot_product_attention with native grouped-query support."""
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal and mask is None, scale=scale,
        enable_gqa=k.shape[1] != q.shape[1],
    )


class Attention(nn.Module):
    """Projections, optional QK-norm, RoPE, cache update and attention for one layer."""

    def __init__(self, config: Config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.scale = config.attn_scale
        self.softcap = config.attn_logit_softcap
        self.use_math = config.attn_impl == "math" or self.softcap is not None
        self.use_flash = config.attn_impl == "flash"
        self.use_rope = config.position == "rope"
        q_dim, kv_dim = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
        self.q_proj = Linear(config.n_embd, q_dim, bias=config.qkv_bias)
        self.k_proj = Linear(config.n_embd, kv_dim, bias=config.qkv_bias)
        self.v_proj = Linear(config.n_embd, kv_dim, bias=config.qkv_bias)
        self.o_proj = Linear(q_dim, config.n_embd, bias=config.bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.norm_eps, config.norm_unit_offset)
            self.k_norm = RMSNorm(config.head_dim, config.norm_eps, config.norm_unit_offset)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, ctx: "KVContext") -> torch.Tensor:
        """x: (B, T, n_embd) -> (B, T, n_embd)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, n_head, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.use_rope:
            cos, sin = ctx.rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = ctx.attend(self, q, k, v)  # (B, n_head, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, n_head * hd)
        return self.o_proj(y)

    def scores(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               is_causal: bool) -> torch.Tensor:
        """Attention output for queries over keys/values already gathered, by the configured method."""
        if self.use_math:
            return math_attention(q, k, v, mask, is_causal, self.scale, self.softcap)
        if self.use_flash:  # masks other than causal + key validity fall back to SDPA
            out = flash.attend(q, k, v, mask, is_causal, self.scale)
            if out is not None:
                return out
        return sdpa_attention(q, k, v, mask, is_causal, self.scale)


class KVContext(Protocol):
    """What a layer needs from its cache in one forward: the RoPE rows of its tokens, and `attend`,
    which stores the new keys/values wherever that cache keeps them and attends over them."""

    rope: tuple[torch.Tensor, torch.Tensor] | None

    def attend(self, module: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


class AttentionContext:
    """The KVContext of the static cache (or none): inputs shared by every layer of one kind
    (global or sliding) in one forward. The serving engine's paged cache has its own."""

    __slots__ = ("rope", "mask", "is_causal", "cache", "start", "key_lo")

    def __init__(self, rope, mask, is_causal, cache, start, key_lo):
        self.rope = rope  # (cos, sin), each (B, 1, T, head_dim), or None
        self.mask = mask  # bool (B, 1, T, S) or None
        self.is_causal = is_causal  # SDPA's own causal mask suffices (no padding, fresh prefill)
        self.cache = cache  # KVCache or None
        self.start = start  # first cache slot written by this forward
        self.key_lo = key_lo  # first cache slot attended (sliding window trims the rest)

    def attend(self, module: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.cache is not None:
            k, v = self.cache.update(module.layer_idx, k, v, self.start, self.key_lo)  # (B, n_kv, S, hd)
        return module.scores(q, k, v, self.mask, self.is_causal)

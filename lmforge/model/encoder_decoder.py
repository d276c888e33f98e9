"""T5 encoder-decoder: RMSNorm without offset, bucketed relative position bias, unscaled attention,
cross-attention to the encoder, ReLU (v1.0) or gated-GELU (v1.1) feed-forward.

Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified Text-to-Text
Transformer", https://arxiv.org/abs/1910.10683. Parameter names are Hugging Face's
T5ForConditionalGeneration's (shared, encoder.block.N.layer.0.SelfAttention.q, ...), so its
safetensors load as they are (checkpoint/hf_t5.py drops the embed_tokens aliases of `shared`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import Config
from lmforge.model.block import init_weights, uninitialised_embedding
from lmforge.model.linear import Linear
from lmforge.model.norm import RMSNorm


def relative_position_bucket(relative: torch.Tensor, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> torch.Tensor:
    """T5's bucket of each key-minus-query offset: half the buckets exact small offsets, the rest
    log-spaced up to max_distance; bidirectional splits the buckets between the two signs."""
    buckets = torch.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative > 0).long() * num_buckets
        relative = relative.abs()
    else:  # the decoder sees only the past: offsets <= 0
        relative = -torch.clamp(relative, max=0)
    max_exact = num_buckets // 2
    large = max_exact + (torch.log(relative.float() / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).long()
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(relative < max_exact, relative, large)


class T5Attention(nn.Module):
    """Multi-head attention without the 1/sqrt(d) scale (T5 folds it into init); the first layer
    of a stack owns the relative position bias (HF: SelfAttention / EncDecAttention)."""

    def __init__(self, config: Config, has_bias: bool, bidirectional: bool) -> None:
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.head_dim
        inner = config.n_head * config.head_dim
        self.q, self.k, self.v = (Linear(config.n_embd, inner, bias=False) for _ in range(3))
        self.o = Linear(inner, config.n_embd, bias=False)
        self.bidirectional = bidirectional
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance
        if has_bias:
            self.relative_attention_bias = uninitialised_embedding(self.num_buckets, config.n_head)

    def position_bias(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """(1, n_head, T, S) bias of queries at q_pos (T,) over keys at k_pos (S,)."""
        buckets = relative_position_bucket(k_pos[None, :] - q_pos[:, None], self.bidirectional,
                                           self.num_buckets, self.max_distance)  # (T, S)
        return self.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, n_head, T, hd)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None, kv: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> torch.Tensor:
        """x: (B, T, n_embd); bias: float (B | 1, n_head | 1, T, S), -inf where hidden; kv: keys and
        values (B, n_head, S, hd) to attend to instead of x's own -> (B, T, n_embd)."""
        B, T, _ = x.shape
        k, v = kv if kv is not None else (self.split(self.k(x)), self.split(self.v(x)))
        y = F.scaled_dot_product_attention(self.split(self.q(x)), k, v, scale=1.0,
                                           attn_mask=None if bias is None else bias.to(x.dtype))
        return self.o(y.transpose(1, 2).reshape(B, T, -1))


class DenseReluDense(nn.Module):
    """T5 v1.0 feed-forward: wo(relu(wi(x)))."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.wi = Linear(config.n_embd, config.intermediate_size, bias=False)
        self.wo = Linear(config.intermediate_size, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(F.relu(self.wi(x)))


class DenseGatedGeluDense(nn.Module):
    """T5 v1.1 feed-forward: wo(gelu_tanh(wi_0(x)) * wi_1(x))."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.wi_0 = Linear(config.n_embd, config.intermediate_size, bias=False)
        self.wi_1 = Linear(config.n_embd, config.intermediate_size, bias=False)
        self.wo = Linear(config.intermediate_size, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x))


class SelfAttentionLayer(nn.Module):
    """x + SelfAttention(norm(x)) (HF: layer.0)."""

    def __init__(self, config: Config, has_bias: bool, bidirectional: bool) -> None:
        super().__init__()
        self.SelfAttention = T5Attention(config, has_bias, bidirectional)
        self.layer_norm = RMSNorm(config.n_embd, config.norm_eps)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return x + self.SelfAttention(self.layer_norm(x), bias)


class CrossAttentionLayer(nn.Module):
    """x + EncDecAttention(norm(x), encoder keys/values) (HF: decoder layer.1); no position bias."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.EncDecAttention = T5Attention(config, False, True)
        self.layer_norm = RMSNorm(config.n_embd, config.norm_eps)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None, kv: tuple[torch.Tensor, torch.Tensor]
                ) -> torch.Tensor:
        return x + self.EncDecAttention(self.layer_norm(x), bias, kv)


class FeedForwardLayer(nn.Module):
    """x + DenseReluDense(norm(x)) (HF: layer.-1); the gated-GELU module keeps the same name."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.DenseReluDense = DenseReluDense(config) if config.mlp == "relu" else DenseGatedGeluDense(config)
        self.layer_norm = RMSNorm(config.n_embd, config.norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Module):
    """Self-attention, cross-attention in the decoder, feed-forward (HF: block.N.layer)."""

    def __init__(self, config: Config, first: bool, decoder: bool) -> None:
        super().__init__()
        parts: list[nn.Module] = [SelfAttentionLayer(config, first, not decoder)]
        if decoder:
            parts.append(CrossAttentionLayer(config))
        parts.append(FeedForwardLayer(config))
        self.layer = nn.ModuleList(parts)


class T5Stack(nn.Module):
    """The blocks and the final norm of the encoder or the decoder (HF: encoder / decoder)."""

    def __init__(self, config: Config, n_layer: int, decoder: bool) -> None:
        super().__init__()
        self.block = nn.ModuleList(T5Block(config, i == 0, decoder) for i in range(n_layer))
        self.final_layer_norm = RMSNorm(config.n_embd, config.norm_eps)

    def position_bias(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """The first layer's relative bias, shared by every layer of the stack as T5 does."""
        return self.block[0].layer[0].SelfAttention.position_bias(q_pos, k_pos)


def padding_bias(attention_mask: torch.Tensor | None, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """A (B, S) 1/0 key mask as an additive (B, 1, 1, S) bias, -inf at padding; None stays None."""
    if attention_mask is None:
        return None
    real = attention_mask.bool()
    if not bool(real.any(-1).all()):
        raise ValueError("attention_mask has a row with no real token; drop empty inputs")
    zero = torch.zeros((), dtype=dtype, device=real.device)
    return torch.where(real, zero, float("-inf"))[:, None, None, :]


class EncoderDecoder(nn.Module):
    """T5: input ids -> encoder states; decoder ids + encoder states -> next-token logits.

    The decoder runs over its whole prefix, or over new tokens given a `DecoderCache` holding the
    encoder's cross-attention keys/values (computed once) and the decoder's self-attention keys/values.
    """

    def __init__(self, config: Config) -> None:
        super().__init__()
        if config.arch != "encoder_decoder":
            raise ValueError(f"EncoderDecoder builds arch='encoder_decoder' configs; {config.name} is "
                             f"arch={config.arch!r} (lmforge.model.transformer.model_class picks the module)")
        self.config = config
        self.shared = uninitialised_embedding(config.vocab_size, config.n_embd)
        self.encoder = T5Stack(config, config.n_layer, decoder=False)
        self.decoder = T5Stack(config, config.n_decoder_layer, decoder=True)
        self.lm_head = None if config.tie_embeddings else Linear(config.n_embd, config.vocab_size, bias=False)

    def check_length(self, length: int, what: str) -> None:
        """Refuse inputs longer than block_size, the longest sequence this config is meant for."""
        if length > self.config.block_size:
            raise ValueError(f"{what} length {length} is longer than block_size={self.config.block_size} of "
                             f"{self.config.name}; truncate it to {self.config.block_size} tokens")

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder states (B, S, n_embd) of input_ids (B, S); attention_mask (B, S) 1 at real tokens."""
        S = input_ids.shape[1]
        self.check_length(S, "input")
        x = self.shared(input_ids)
        pos = torch.arange(S, device=input_ids.device)
        bias = self.encoder.position_bias(pos, pos)  # (1, n_head, S, S)
        padding = padding_bias(attention_mask)
        if padding is not None:
            bias = bias + padding.to(x.device)  # (B, n_head, S, S)
        for block in self.encoder.block:
            x = block.layer[1](block.layer[0](x, bias))
        return self.encoder.final_layer_norm(x)

    def cross_kv(self, encoded: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each decoder layer's cross-attention keys and values (B, n_head, S, hd) of the encoder states:
        the encoder output cache, computed once per input and reused by every decoding step."""
        out = []
        for block in self.decoder.block:
            attn = block.layer[1].EncDecAttention
            out.append((attn.split(attn.k(encoded)), attn.split(attn.v(encoded))))
        return out

    def decode(self, decoder_ids: torch.Tensor, cross: list[tuple[torch.Tensor, torch.Tensor]],
               attention_mask: torch.Tensor | None = None, cache: list | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) of decoder_ids (B, T) following `cache`'s earlier tokens.

        Args:
            cross: cross_kv(encoded). attention_mask: the encoder's (B, S) padding mask.
            cache: a list of per-layer (k, v) self-attention tensors, extended in place; None: no cache
                (decoder_ids is the whole prefix).
        """
        start = cache[0][0].shape[2] if cache else 0
        T = decoder_ids.shape[1]
        self.check_length(start + T, "decoder")
        x = self.shared(decoder_ids)
        q_pos = torch.arange(start, start + T, device=x.device)
        k_pos = torch.arange(start + T, device=x.device)
        causal = torch.where(k_pos[None, :] <= q_pos[:, None], 0.0, float("-inf")).to(x.device)  # (T, start+T)
        self_bias = self.decoder.position_bias(q_pos, k_pos) + causal
        cross_bias = padding_bias(attention_mask)
        for i, block in enumerate(self.decoder.block):
            sa = block.layer[0]
            h = sa.layer_norm(x)
            attn = sa.SelfAttention
            k, v = attn.split(attn.k(h)), attn.split(attn.v(h))
            if cache is not None:
                if len(cache) > i:
                    k, v = torch.cat([cache[i][0], k], 2), torch.cat([cache[i][1], v], 2)
                    cache[i] = (k, v)
                else:
                    cache.append((k, v))
            x = x + attn(h, self_bias, (k, v))
            x = block.layer[1](x, cross_bias, cross[i])
            x = block.layer[2](x)
        return self.logits(self.decoder.final_layer_norm(x))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits; tied embeddings rescale by d_model**-0.5 first (Mesh TensorFlow's T5)."""
        if self.lm_head is None:
            return F.linear(h * self.config.n_embd ** -0.5, self.shared.weight)
        return self.lm_head(h)

    def forward(self, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) as T5ForConditionalGeneration(...).logits (teacher forcing)."""
        encoded = self.encode(input_ids, attention_mask)
        return self.decode(decoder_input_ids, self.cross_kv(encoded), attention_mask)


def build_encoder_decoder(config: Config, device: torch.device | str = "cpu") -> EncoderDecoder:
    """A randomly initialised T5 (normal(0, 0.02) weights, unit norms)."""
    with torch.device(device):
        model = EncoderDecoder(config)
    if device != "meta":
        init_weights(model)
    return model

"""The decoder-only transformer: block and model, wired from a Config by one builder.

Parameter names follow Hugging Face's LLaMA/Gemma layout (model.layers.N.self_attn.q_proj...)
so their checkpoints load without a mapping; other formats map onto these names.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lmforge.config import Config
from lmforge.model.alibi import alibi_bias, alibi_slopes
from lmforge.model.attention import AttentionContext
from lmforge.model.block import Block, init_weights, uninitialised_embedding
from lmforge.model.linear import Linear
from lmforge.model.masks import attention_mask
from lmforge.model.norm import build_norm
from lmforge.model.rope import rope_cache
from lmforge.model.sparse import sparse_context
from lmforge.model.sinusoidal import sinusoidal_positions


class Backbone(nn.Module):
    """Embeddings, blocks and the final norm (Hugging Face's `model.` prefix)."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.embed_tokens = uninitialised_embedding(config.vocab_size, config.n_embd)
        if config.position == "learned":
            self.embed_positions = uninitialised_embedding(config.block_size, config.n_embd)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = build_norm(config)


class Transformer(nn.Module):
    """Decoder-only language model: token ids -> next-token logits, with an optional KV cache."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        if config.arch != "transformer":
            raise ValueError(f"Transformer builds arch='transformer' configs; {config.name} is arch={config.arch!r} "
                             "(lmforge.model.transformer.model_class picks the module for a config)")
        self.config = config
        self.model = Backbone(config)
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._rope: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def rope_tables(self, kind: str, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin tables for a layer kind, built lazily and grown by doubling.

        Gemma's sliding layers keep their own unscaled base. Dynamic NTK past the original context
        depends on the length itself, so that table is rebuilt for each longer length (as
        transformers does: keys cached earlier keep the rotation they were stored with).
        """
        config = self.config
        local = kind == "sliding" and config.rope_local_theta is not None
        theta = config.rope_local_theta if local else config.rope_theta
        if config.rope_scaling == "dynamic" and not local and length > config.rope_original_max_position:
            cached = self._rope.get(kind + ":dynamic")
            if cached is None or cached[0].shape[0] != length or cached[0].device != device:
                cos, sin = rope_cache(config, theta, length, seq_len=length)
                self._rope[kind + ":dynamic"] = cached = (cos.to(device), sin.to(device))
            return cached
        cached = self._rope.get(kind)
        if cached is None or cached[0].shape[0] < length or cached[0].device != device:
            size = max(length, min(2 * (cached[0].shape[0] if cached else 256), config.block_size))
            cos, sin = rope_cache(config, theta, max(size, length), scaled=not local)
            self._rope[kind] = cached = (cos.to(device), sin.to(device))
        return cached

    def forward(
        self, input_ids: torch.Tensor, cache=None, positions: torch.Tensor | None = None,
        valid: torch.Tensor | None = None, last_only: bool = False, contexts: dict | None = None,
        output_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab); (B, 1, vocab) with `last_only`; (B, len(output_index), vocab) with it.

        Args:
            input_ids: (B, T) token ids.
            cache: a KVCache; new keys/values are appended after its filled slots.
            positions: (B, T) token positions; default counts on from the cache length.
            valid: (B, T) False at padding; default all real tokens.
            contexts: per layer kind, a KVContext (`rope` and `attend`) that replaces the static
                cache path (the serving engine passes its paged-attention contexts here).
            output_index: positions along T whose logits are wanted (others are skipped).
        """
        B, T = input_ids.shape
        start = cache.length if cache is not None else 0
        if positions is None:
            positions = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        if int(positions.max()) >= self.config.block_size:
            raise ValueError(f"position {int(positions.max())} is past the context length "
                             f"{self.config.block_size}; shorten the prompt or max_new_tokens")
        if contexts is None:
            if cache is not None:
                cache.reserve(positions, valid if valid is not None else torch.ones_like(positions, dtype=torch.bool))
            contexts = {kind: self._context(kind, positions, valid, cache, start, T)
                        for kind in set(self.config.layer_types)}
        x = self.embed(input_ids, positions)
        for layer in self.model.layers:
            x = layer(x, contexts[layer.layer_type])
        if last_only:
            x = x[:, -1:]
        elif output_index is not None:
            x = x[:, output_index]
        return self.logits(self.model.norm(x))

    def rope_at(self, kind: str, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """cos/sin (B, 1, T, head_dim) for the positions (B, T), or None without RoPE."""
        if self.config.position != "rope":
            return None
        cos, sin = self.rope_tables(kind, int(positions.max()) + 1, positions.device)
        # tables are built in fp32, applied in the model's dtype (as HF does); the final norm holds that dtype
        # (a quantized lm_head's `weight` would dequantize the whole matrix, a QLoRA one is bf16)
        dtype = self.model.norm.weight.dtype
        return cos[positions].unsqueeze(1).to(dtype), sin[positions].unsqueeze(1).to(dtype)

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)  # (B, T, n_embd)
        if self.config.embedding_scale:  # Gemma: scale by sqrt(width), rounded to the weight dtype
            x = x * torch.tensor(math.sqrt(self.config.n_embd), dtype=x.dtype)
        if self.config.position == "learned":
            x = x + self.model.embed_positions(positions)
        elif self.config.position == "sinusoidal":
            x = x + sinusoidal_positions(positions, self.config.n_embd).to(x.dtype)
        return x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(x)
        cap = self.config.final_logit_softcap
        return cap * torch.tanh(logits / cap) if cap else logits

    def window(self, kind: str) -> int | None:
        """The attention window of a layer kind (None: attends to the whole prefix)."""
        return self.config.sliding_window if kind == "sliding" else None

    def _context(self, kind: str, positions: torch.Tensor, valid: torch.Tensor | None, cache, start: int,
                 T: int) -> AttentionContext:
        """Rope tables and the cheapest correct mask for one layer kind in this forward."""
        window = self.window(kind)
        rope = self.rope_at(kind, positions)
        if kind in self.config.sparse_patterns:  # block-sparse over the pattern's tiles (model/sparse.py)
            return sparse_context(self.config.sparse_patterns[kind], rope, positions, valid, cache, start)
        end = start + T
        padded = valid is not None and not bool(valid.all())
        if cache is not None:
            padded = padded or not bool(cache.valid[:, :end].all())
        key_lo = max(0, end - window - T + 1) if window and cache is not None else 0
        if self.config.position == "alibi":
            return self._alibi_context(positions, valid, cache, start, end, key_lo, window)
        if not padded and (window is None or end <= window or T == 1):
            if T == 1:  # decode: every kept slot is visible
                return AttentionContext(rope, None, False, cache, start, key_lo if window else 0)
            if start == 0:  # fresh prefill: plain causal
                return AttentionContext(rope, None, True, cache, start, 0)
        if cache is not None:
            k_pos, k_valid = cache.positions[:, key_lo:end], cache.valid[:, key_lo:end]
        else:
            k_pos, k_valid = positions, valid
        mask = attention_mask(positions, k_pos, k_valid, window)
        return AttentionContext(rope, mask, False, cache, start, key_lo)

    def alibi(self, q_pos: torch.Tensor, k_pos: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """The ALiBi bias (B, n_head, T, S) that replaces the boolean mask, in the model's dtype."""
        return alibi_bias(alibi_slopes(self.config.n_head), q_pos, k_pos, allowed, self.model.norm.weight.dtype)

    def _alibi_context(self, positions, valid, cache, start: int, end: int, key_lo: int,
                       window: int | None) -> AttentionContext:
        if cache is not None:
            k_pos, k_valid = cache.positions[:, key_lo:end], cache.valid[:, key_lo:end]
        else:
            k_pos, k_valid = positions, valid
        bias = self.alibi(positions, k_pos, attention_mask(positions, k_pos, k_valid, window))
        return AttentionContext(None, bias, False, cache, start, key_lo)


def column_major_linears(model: Transformer) -> Transformer:
    """Store every linear weight column-major (same shape and names, transposed strides).

    F.linear then calls MKL's GEMV without a transpose, which streams the weights ~1.3x
    faster at batch 1 on CPU than row-major; results are identical.
    """
    for module in model.modules():
        w = getattr(module, "weight", None)
        if isinstance(module, nn.Linear) and w.device.type != "meta" and not w.t().is_contiguous():
            module.weight = nn.Parameter(w.detach().t().contiguous().t(), requires_grad=w.requires_grad)
    if model.config.tie_embeddings:
        model.model.embed_tokens.weight = model.lm_head.weight
    return model


def decode_layout(model: Transformer) -> Transformer:
    """Linear weights in the layout batch-1 decode streams fastest on this machine.

    Row-major (as loaded) for lmforge's GEMV kernel (lmforge/kernels); column-major for MKL's
    GEMV when the kernel cannot be built or the model is not on the CPU.
    """
    from lmforge.kernels import gemv

    on_cpu = model.lm_head.weight.device.type == "cpu"
    return model if on_cpu and gemv.extension() is not None else column_major_linears(model)


def model_class(config: Config) -> type[nn.Module]:
    """The module that builds a config: Transformer, MambaLM for arch='mamba' (model/mamba.py), or
    Encoder for arch='encoder' (model/encoder.py), EncoderDecoder for 'encoder_decoder' (T5)."""
    if config.arch == "mamba":
        from lmforge.model.mamba import MambaLM  # model/mamba.py builds on this module's Block

        return MambaLM
    if config.arch == "encoder":
        from lmforge.model.encoder import Encoder  # model/encoder.py uses this module's helpers

        return Encoder
    if config.arch == "encoder_decoder":
        from lmforge.model.encoder_decoder import EncoderDecoder  # T5

        return EncoderDecoder
    return Transformer


def build_model(config: Config, device: torch.device | str = "cpu") -> Transformer:
    """Construct a randomly initialised model (use the checkpoint loaders for real weights)."""
    if config.arch == "mamba":
        from lmforge.model.mamba import build_mamba

        return build_mamba(config, device)
    if config.arch == "encoder":
        from lmforge.model.encoder import build_encoder

        return build_encoder(config, device)
    if config.arch == "encoder_decoder":
        from lmforge.model.encoder_decoder import build_encoder_decoder

        return build_encoder_decoder(config, device)
    with torch.device(device):
        model = Transformer(config)
    if device != "meta":
        init_weights(model)
    return model

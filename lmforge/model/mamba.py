"""Mamba language models and Jamba-style hybrids: embeddings, blocks, final norm, head.

Parameter names are Hugging Face's MambaForCausalLM's (backbone.embeddings, backbone.layers.N.norm,
backbone.layers.N.mixer.in_proj, ..., backbone.norm_f, lm_head), so its safetensors load without a
mapping. A hybrid (Lieber et al. 2024, https://arxiv.org/abs/2403.19887) puts lmforge's transformer
`Block` (self_attn + mlp, RoPE) at the layers `config.mixers` names "attention".

Decoding state is one cache object with an entry per layer (lmforge/generation/state_cache.py):
`cache.ssm[i]` is layer i's SSMState for a Mamba layer, and the attention layers share `cache.kv`,
a KVCache that holds buffers for those layers only. One object, because one forward advances all
layers by the same tokens (one `reserve`); per layer, because the two kinds of state differ in kind:
a KV cache grows with every token, an SSM state does not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lmforge.config import Config
from lmforge.model.attention import AttentionContext
from lmforge.model.linear import Linear
from lmforge.model.masks import attention_mask
from lmforge.model.norm import build_norm
from lmforge.model.rope import rope_cache
from lmforge.model.ssm import MambaMixer, SSMState
from lmforge.model.block import Block, init_weights, uninitialised_embedding


@dataclass
class SSMContext:
    """What a Mamba layer reads in one forward: its state (None: start from zeros, keep nothing),
    padding (valid, (B, T)) and packed-example ids (seq_ids, (B, T))."""

    state: SSMState | None = None
    valid: torch.Tensor | None = None
    seq_ids: torch.Tensor | None = None


class MambaBlock(nn.Module):
    """Pre-norm residual around the mixer (Hugging Face's MambaBlock: no MLP, the gate stands in)."""

    def __init__(self, config: Config, layer_idx: int) -> None:
        super().__init__()
        self.norm = build_norm(config)
        self.mixer = MambaMixer(config, layer_idx)

    def forward(self, x: torch.Tensor, ctx: SSMContext) -> torch.Tensor:
        return x + self.mixer(self.norm(x), ctx.state, ctx.valid, ctx.seq_ids)


class MambaBackbone(nn.Module):
    """Embeddings, the mixer blocks and the final norm (Hugging Face's `backbone.`)."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.embeddings = uninitialised_embedding(config.vocab_size, config.n_embd)
        self.layers = nn.ModuleList(MambaBlock(config, i) if kind == "mamba" else Block(config, i)
                                    for i, kind in enumerate(config.mixers))
        self.norm_f = build_norm(config)


class MambaLM(nn.Module):
    """Token ids -> next-token logits through Mamba (and attention) layers, with an optional state cache."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        if config.arch != "mamba":
            raise ValueError(f"MambaLM builds arch='mamba' configs; {config.name} is arch={config.arch!r} "
                             "(lmforge.model.transformer.Transformer builds it)")
        self.config = config
        self.backbone = MambaBackbone(config)
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.backbone.embeddings.weight
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, input_ids: torch.Tensor, cache=None, positions: torch.Tensor | None = None,
                valid: torch.Tensor | None = None, last_only: bool = False,
                output_index: torch.Tensor | None = None, contexts: dict | None = None) -> torch.Tensor:
        """Logits (B, T, vocab); (B, 1, vocab) with `last_only`; (B, len(output_index), vocab) with it.

        Args:
            input_ids: (B, T) token ids.
            cache: a RecurrentCache (generation/state_cache.py), read and advanced by T tokens.
            positions: (B, T) positions for the attention layers' RoPE; default counts on from the cache.
            valid: (B, T) False at padding (left padding: the state passes it unchanged).
        """
        if contexts is not None:
            raise ValueError("paged KV contexts (the serving engine) have no place for an SSM state; "
                             "generate with lmforge.generation.generate instead")
        x = self.embed(input_ids)
        for layer, ctx in zip(self.backbone.layers, self.layer_contexts(input_ids.shape, positions, valid, cache)):
            x = layer(x, ctx)
        if last_only:
            x = x[:, -1:]
        elif output_index is not None:
            x = x[:, output_index]
        return self.logits(self.backbone.norm_f(x))

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings (B, T, n_embd); Mamba has no position embedding (`positions` is ignored)."""
        return self.backbone.embeddings(input_ids)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(x)

    def layer_contexts(self, shape: torch.Size | tuple[int, int], positions: torch.Tensor | None = None,
                       valid: torch.Tensor | None = None, cache=None, seq_ids: torch.Tensor | None = None) -> list:
        """One context per layer for T new tokens: an SSMContext per Mamba layer, and one AttentionContext
        that every attention layer shares; with a cache, its next T slots are claimed."""
        B, T = shape
        if cache is not None:
            self.check_cache(cache)
        start = cache.length if cache is not None else 0
        device = self.backbone.embeddings.weight.device
        if positions is None:
            positions = torch.arange(start, start + T, device=device).expand(B, T)
        if cache is not None:
            cache.reserve(positions, valid if valid is not None else torch.ones(B, T, dtype=torch.bool, device=device))
        attention = None
        if "attention" in self.config.mixers:
            attention = self.attention_context(positions, valid, None if cache is None else cache.kv, start, seq_ids)
        return [SSMContext(None if cache is None else cache.ssm[i], valid, seq_ids) if kind == "mamba" else attention
                for i, kind in enumerate(self.config.mixers)]

    def attention_context(self, positions: torch.Tensor, valid: torch.Tensor | None, kv, start: int,
                          seq_ids: torch.Tensor | None = None) -> AttentionContext:
        """RoPE rows and the cheapest correct mask for the attention layers (full causal attention)."""
        if int(positions.max()) >= self.config.block_size:
            raise ValueError(f"position {int(positions.max())} is past the context length {self.config.block_size} "
                             "of the attention layers; shorten the prompt or max_new_tokens")
        T = positions.shape[1]
        rope = self.rope_at(positions)
        k_pos, k_valid = (positions, valid) if kv is None else (kv.positions[:, :start + T], kv.valid[:, :start + T])
        if seq_ids is None and (k_valid is None or bool(k_valid.all())):
            if start == 0:  # fresh prefill: plain causal
                return AttentionContext(rope, None, True, kv, start, 0)
            if T == 1:  # decode: every slot so far is visible
                return AttentionContext(rope, None, False, kv, start, 0)
        mask = attention_mask(positions, k_pos, k_valid)  # (B, 1, T, S)
        if seq_ids is not None:  # packed rows: attention stays inside each example
            mask = mask & (seq_ids[:, :, None] == seq_ids[:, None, :])[:, None]
        return AttentionContext(rope, mask, False, kv, start, 0)

    def rope_at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (B, 1, T, head_dim) for positions (B, T); the table grows by doubling."""
        need = int(positions.max()) + 1
        if self._rope is None or self._rope[0].shape[0] < need or self._rope[0].device != positions.device:
            size = max(need, min(2 * (self._rope[0].shape[0] if self._rope else 128), self.config.block_size))
            cos, sin = rope_cache(self.config, self.config.rope_theta, size)
            self._rope = (cos.to(positions.device), sin.to(positions.device))
        dtype = self.backbone.norm_f.weight.dtype
        cos, sin = self._rope
        return cos[positions].unsqueeze(1).to(dtype), sin[positions].unsqueeze(1).to(dtype)

    def check_cache(self, cache) -> None:
        """Refuse a cache that is not a per-layer recurrent state built for these layers."""
        ssm = getattr(cache, "ssm", None)
        if ssm is None:
            raise TypeError(f"a Mamba model decodes with a per-layer recurrent state, not a {type(cache).__name__}: "
                            "build it with lmforge.generation.state_cache.make_cache(config, batch, max_len); paths "
                            "that roll a KV cache back or page it (speculative decoding, the serving engine) do not "
                            "run Mamba models")
        kinds = ["mamba" if s is not None else "attention" for s in ssm]
        if kinds != self.config.mixers or (cache.kv is None) != ("attention" not in self.config.mixers):
            raise ValueError(f"the cache holds layers {kinds}, this model's are {self.config.mixers}: it was built "
                             "for another model; build it with make_cache(model.config, ...)")


def build_mamba(config: Config, device: torch.device | str = "cpu") -> MambaLM:
    """A randomly initialised Mamba or hybrid model (use the checkpoint loaders for real weights)."""
    with torch.device(device):
        model = MambaLM(config)
    if device != "meta":
        init_mamba(model)
    return model


@torch.no_grad()
def init_mamba(model: MambaLM, dt_min: float = 1e-3, dt_max: float = 0.1) -> None:
    """GPT-2's normal(0, 0.02) for linears and embeddings, then the Mamba reference's own: S4D-real
    A = -(1..N), D = 1, delta's bias so softplus(bias) is log-uniform in [dt_min, dt_max], out_proj
    scaled by 1/sqrt(n_layer) (state-spaces/mamba, mamba_simple.py and _init_weights)."""
    init_weights(model)
    for module in model.modules():
        if not isinstance(module, MambaMixer):
            continue
        N = module.d_state
        module.A_log.copy_(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).expand(module.d_inner, N))
        module.D.fill_(1.0)
        module.conv1d.reset_parameters()
        std = module.dt_rank ** -0.5
        module.dt_proj.weight.uniform_(-std, std)
        dt = torch.exp(torch.rand(module.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=1e-4)
        module.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        module.out_proj.weight.div_(math.sqrt(model.config.n_layer))

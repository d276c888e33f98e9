"""Prefix tuning (Li & Liang 2021, https://arxiv.org/abs/2101.00190): trained keys/values of P virtual
tokens that every layer attends to before the sequence's own; the model's weights stay frozen.

Laid out as PEFT's PREFIX_TUNING for causal LMs, so either side loads the other's adapter: one tensor
`prompt_embeddings` (P, n_layer * 2 * n_kv_head * head_dim) whose row p holds, for layer l, the key at
columns [(2l) D, (2l + 1) D) and the value at [(2l + 1) D, (2l + 2) D), D = n_kv_head * head_dim split
into heads (peft_model.get_prompt). The prefix keys are used as they are (no RoPE), and the real tokens'
positions start at P, as transformers counts them after a cache of P entries. With `prefix_projection`
the prefix is reparametrised through an MLP while training (the paper's section 4.3); the file holds its
output either way, as PEFT's does.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lmforge.atomic import atomic_write, atomic_write_json
from lmforge.generation.kv_cache import KVCache
from lmforge.model.attention import AttentionContext

PEFT_TYPE = "PREFIX_TUNING"
WEIGHTS_KEY = "prompt_embeddings"  # PEFT's key (utils/save_and_load.py, BasePromptEncoder)


@dataclass
class PrefixConfig:
    """How many virtual tokens, whether an MLP reparametrises them while training, how they start."""

    num_virtual_tokens: int = 20
    prefix_projection: bool = False
    encoder_hidden_size: int | None = None  # the projection MLP's width; None = n_kv_head * head_dim (PEFT's default)
    init: Literal["vocab", "random", "zero"] = "vocab"  # vocab: real tokens' activations (Li & Liang's init study)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_virtual_tokens < 1:
            raise ValueError(f"prefix num_virtual_tokens={self.num_virtual_tokens} must be >= 1")
        if self.init not in ("vocab", "random", "zero"):
            raise ValueError(f"prefix init={self.init!r} must be 'vocab', 'random' or 'zero'")
        if self.prefix_projection and self.init == "vocab":
            raise ValueError("prefix init='vocab' sets the prefix itself; with prefix_projection=true use 'random'")


class PrefixEncoder(nn.Module):
    """The trained prefix: the P virtual tokens' keys and values for every layer (PEFT's PrefixEncoder)."""

    def __init__(self, config: PrefixConfig, n_layer: int, n_kv_head: int, head_dim: int) -> None:
        super().__init__()
        self.num_virtual_tokens, self.n_layer = config.num_virtual_tokens, n_layer
        self.n_kv_head, self.head_dim = n_kv_head, head_dim
        token_dim = n_kv_head * head_dim
        width = n_layer * 2 * token_dim
        self.transform = None
        if config.prefix_projection:  # P x token_dim -> MLP (tanh) -> P x width (Li & Liang section 4.3)
            hidden = config.encoder_hidden_size or token_dim
            self.embedding = nn.Embedding(config.num_virtual_tokens, token_dim)
            self.transform = nn.Sequential(nn.Linear(token_dim, hidden), nn.Tanh(), nn.Linear(hidden, width))
        else:
            self.embedding = nn.Embedding(config.num_virtual_tokens, width)  # N(0, 1), as PEFT starts it

    def flat(self) -> torch.Tensor:
        """The prefix as PEFT stores it, (P, n_layer * 2 * n_kv_head * head_dim)."""
        w = self.embedding.weight
        return w if self.transform is None else self.transform(w)

    def key_values(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (keys, values), each (n_kv_head, P, head_dim)."""
        P = self.num_virtual_tokens
        kv = self.flat().view(P, 2 * self.n_layer, self.n_kv_head, self.head_dim)  # (P, 2L, n_kv, hd)
        kv = kv.permute(1, 2, 0, 3)  # (2L, n_kv, P, hd): layer l's keys at 2l, values at 2l + 1
        return [(kv[2 * i], kv[2 * i + 1]) for i in range(self.n_layer)]


class PrefixContext:
    """A KVContext (model/attention.py) that puts each layer's prefix keys/values before the sequence's
    own; every query may see the whole prefix, the sequence's own keys as the inner context allows."""

    __slots__ = ("rope", "mask", "kv")

    def __init__(self, inner: AttentionContext, kv: list[tuple[torch.Tensor, torch.Tensor]], T: int) -> None:
        if not isinstance(inner, AttentionContext) or inner.cache is not None or (
                inner.mask is not None and inner.mask.dtype != torch.bool):
            raise ValueError("prefix tuning runs dense causal attention over RoPE/learned positions; this model's "
                             "attention (sparse, ALiBi or a paged cache) has no prefix path")
        self.rope, self.kv = inner.rope, kv
        device = kv[0][0].device
        own = inner.mask
        if own is None:  # causal (or a decode step, which sees every key)
            own = torch.ones(T, T, dtype=torch.bool, device=device).tril()[None, None] if inner.is_causal else \
                torch.ones(1, 1, T, T, dtype=torch.bool, device=device)
        prefix = torch.ones(*own.shape[:-1], kv[0][0].shape[1], dtype=torch.bool, device=own.device)
        self.mask = torch.cat([prefix, own], dim=-1)  # (B | 1, 1, T, P + T)

    def attend(self, module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        pk, pv = self.kv[module.layer_idx]
        B = k.shape[0]
        k = torch.cat([pk.to(k.dtype).expand(B, -1, -1, -1), k], dim=2)  # (B, n_kv, P + T, hd)
        v = torch.cat([pv.to(v.dtype).expand(B, -1, -1, -1), v], dim=2)
        return module.scores(q, k, v, self.mask, False)


def prefix_contexts(model: nn.Module, contexts: dict, T: int) -> dict:
    """Each layer kind's context with the model's prefix in front (the training forward's hook)."""
    kv = model.prefix_encoder.key_values()
    return {kind: PrefixContext(ctx, kv, T) for kind, ctx in contexts.items()}


def _check_model(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    if config is None or config.arch != "transformer" or config.position == "alibi" or config.sparse_patterns:
        name = getattr(config, "name", type(model).__name__)
        raise ValueError(f"prefix tuning needs a decoder transformer with dense attention; {name} is not one")
    if hasattr(model, "prefix_encoder"):
        raise ValueError("the model already carries a prefix; load the base model again")


def apply_prefix(model: nn.Module, config: PrefixConfig) -> nn.Module:
    """Freeze the model and give it a trainable prefix (`model.prefix_encoder`), in place.

    The training forward (objectives/forward.py) and generation (generation/steps.py prefill) read it;
    a pre-hook makes a plain `model(ids)` without a cache attend to it too.
    """
    _check_model(model)
    for p in model.parameters():
        p.requires_grad_(False)
    c = model.config
    param = next(model.parameters())
    encoder = PrefixEncoder(config, c.n_layer, c.n_kv_head, c.head_dim).to(param.device)
    _init_prefix(model, encoder, config)
    model.prefix_encoder = encoder
    model.prefix_config = config
    model.register_forward_pre_hook(_forward_with_prefix, with_kwargs=True)
    return model


@torch.no_grad()
def _init_prefix(model: nn.Module, encoder: PrefixEncoder, config: PrefixConfig) -> None:
    """random: N(0, 1) (PEFT's nn.Embedding); zero; vocab: the keys/values the model itself computes for P
    random vocabulary tokens, so the prefix starts on the scale of real activations (Li & Liang's init study)."""
    generator = torch.Generator().manual_seed(config.seed)
    if config.init == "zero":
        target = encoder.transform[-1] if encoder.transform is not None else encoder.embedding
        for p in target.parameters():
            p.zero_()
        return
    if config.init == "random":
        if encoder.transform is None:
            encoder.embedding.weight.copy_(torch.randn(encoder.embedding.weight.shape, generator=generator))
        return
    P = config.num_virtual_tokens
    ids = torch.randint(0, model.config.vocab_size, (1, P), generator=generator).to(encoder.embedding.weight.device)
    cache = KVCache(model.config, 1, P, dtype=encoder.embedding.weight.dtype, device=ids.device)
    model(ids, cache=cache)
    kv = torch.stack([torch.stack([cache.k[i][0], cache.v[i][0]]) for i in range(model.config.n_layer)])
    # (L, 2, n_kv, P, hd) -> (P, L * 2 * n_kv * hd), PEFT's flat layout
    encoder.embedding.weight.copy_(kv.flatten(0, 1).permute(2, 0, 1, 3).reshape(P, -1))


def _forward_with_prefix(model: nn.Module, args: tuple, kwargs: dict):
    """Transformer.forward pre-hook: without a cache, attend to the prefix (real positions from P)."""
    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    call = bound.arguments
    if call.get("contexts") is not None:
        raise ValueError("prefix tuning adapters do not run in the serving engine's paged cache; "
                         "use lmforge generate --adapter")
    if call.get("cache") is not None:
        return None  # generation pre-fills its cache with the prefix (generation/steps.py prefill)
    ids = call["input_ids"]
    B, T = ids.shape
    P = model.prefix_encoder.num_virtual_tokens
    positions = call.get("positions")
    positions = (torch.arange(T, device=ids.device).expand(B, T) if positions is None else positions) + P
    valid = call.get("valid")
    inner = {kind: model._context(kind, positions, valid, None, 0, T) for kind in set(model.config.layer_types)}
    call["positions"], call["contexts"] = positions, prefix_contexts(model, inner, T)
    return bound.args, bound.kwargs


def peft_prefix_config(model: nn.Module, config: PrefixConfig, base_model: str | None = None) -> dict:
    """The adapter_config.json PEFT reads (PrefixTuningConfig fields, kv heads as PEFT sizes them for GQA)."""
    c = model.config
    token_dim = c.n_kv_head * c.head_dim
    return {
        "peft_type": PEFT_TYPE, "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "num_virtual_tokens": config.num_virtual_tokens, "token_dim": token_dim, "num_layers": c.n_layer,
        "num_attention_heads": c.n_kv_head, "num_transformer_submodules": 1,
        "encoder_hidden_size": config.encoder_hidden_size or token_dim, "prefix_projection": config.prefix_projection,
        "inference_mode": True, "modules_to_save": None,
    }


def save_prefix(model: nn.Module, path: str | Path, base_model: str | None = None) -> Path:
    """Write the prefix in the PEFT layout (adapter_config.json + adapter_model.safetensors), atomically."""
    from lmforge.training.peft_layout import CONFIG_FILE, WEIGHTS_FILE

    if not hasattr(model, "prefix_encoder"):
        raise ValueError("the model has no prefix; call apply_prefix first")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        tensors = {WEIGHTS_KEY: model.prefix_encoder.flat().detach().float().contiguous().cpu()}
    atomic_write(path / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    atomic_write_json(path / CONFIG_FILE, peft_prefix_config(model, model.prefix_config, base_model))
    return path


def load_prefix(model: nn.Module, path: str | Path, cfg: dict) -> nn.Module:
    """Give `model` the prefix saved at `path` (ours or PEFT's; `cfg` is its adapter_config.json)."""
    from lmforge.training.peft_layout import WEIGHTS_FILE

    c = model.config
    theirs = (cfg.get("num_layers"), cfg.get("num_attention_heads"), cfg.get("token_dim"))
    ours = (c.n_layer, c.n_kv_head, c.n_kv_head * c.head_dim)
    if theirs != ours or cfg.get("num_transformer_submodules", 1) != 1:
        raise ValueError(f"{path}: the prefix is shaped for num_layers={theirs[0]}, kv heads={theirs[1]}, "
                         f"token_dim={theirs[2]}, but {c.name} has num_layers={ours[0]}, kv heads={ours[1]}, "
                         f"token_dim={ours[2]}; load it onto the model it was trained for")
    config = PrefixConfig(num_virtual_tokens=int(cfg["num_virtual_tokens"]), init="zero")
    apply_prefix(model, config)  # the file holds the projected prefix, so no MLP here (PEFT's inference mode)
    weights = load_file(str(Path(path) / WEIGHTS_FILE))
    tensor = weights.get(WEIGHTS_KEY)
    expected = model.prefix_encoder.embedding.weight
    if tensor is None or tuple(tensor.shape) != tuple(expected.shape):
        got = None if tensor is None else tuple(tensor.shape)
        raise ValueError(f"{path}: {WEIGHTS_KEY} has shape {got}, expected {tuple(expected.shape)}")
    with torch.no_grad():
        expected.copy_(tensor)
    return model

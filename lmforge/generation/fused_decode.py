"""Fused decode step: every block for one new token per sequence in a single C++ call.

A batch-1 decode step of SmolLM2 is ~5,000 PyTorch op calls (views included); their launch cost is
larger than the weight reads once the matrix products run on lmforge's GEMV kernels. This
module turns a Transformer into a `Plan` for lmforge/kernels/decode.cpp (the same block, as
loops) and runs it. The model never calls it: its two callers choose it explicitly, generation
for the static KV cache (`decode_step`) and the serving engine's model runner for steps of decodes
only over its paged cache (`paged_step`). Both go from token ids to logits without model.forward
and return None when the step does not qualify (autograd, padding, a part decode.cpp does not run,
too many rows); the caller then runs model.forward, unchanged. The plan is rebuilt whenever a
module or weight it read was replaced (quantizing, LoRA, loading, a dtype round trip).
`disabled()` turns the fused step off, for references in tests and A/B runs.
"""

from __future__ import annotations

import contextlib
import operator
from typing import Iterator

import torch
from torch import nn

from lmforge.kernels import gemv
from lmforge.model.linear import is_plain_linear
from lmforge.model.norm import RMSNorm

LINEARS = (("self_attn", "q_proj", "q"), ("self_attn", "k_proj", "k"), ("self_attn", "v_proj", "v"),
           ("self_attn", "o_proj", "o"), ("mlp", "gate_proj", "gate"), ("mlp", "up_proj", "up"),
           ("mlp", "down_proj", "down"))
ENABLED = True  # callers take the fused step where it qualifies; `disabled()` turns it off
NORMS = (("input_layernorm", "input_norm"), ("post_attention_layernorm", "post_attention_norm"),
         ("pre_feedforward_layernorm", "pre_feedforward_norm"), ("post_feedforward_layernorm", "post_feedforward_norm"))


def supported_architecture(config) -> bool:
    """Whether decode.cpp implements this block: a transformer (Mamba and hybrids decode through their
    PyTorch forward), RMSNorm, RoPE, SwiGLU/GeGLU, no attention softcap, a dense MLP (MoE models decode
    through the PyTorch forward), no sparse attention patterns (its layers know only full and
    sliding-window attention)."""
    return (getattr(config, "arch", "transformer") == "transformer" and config.norm == "rmsnorm"
            and config.position == "rope" and config.mlp in ("swiglu", "geglu")
            and config.attn_logit_softcap is None and config.n_head % config.n_kv_head == 0
            and not config.n_experts and not config.sparse_patterns)


def _fp32_cpu(t: torch.Tensor) -> bool:
    return t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous()


def _matrix(ext, module: nn.Module):
    """The kernel's view of a linear module, or None when decode.cpp cannot run it."""
    from lmforge.checkpoint.gguf_blocks import GGUFLinear
    from lmforge.quantization.int4 import GEMV_BLOCK, Int4Linear  # quantization imports the model package

    module = getattr(module, "decode_inner", module)  # a wrapper equal to its inner linear on the fused path
    bias = getattr(module, "bias", None)
    if bias is not None and not _fp32_cpu(bias):
        return None
    if is_plain_linear(module) and _fp32_cpu(module.weight):
        return ext.Matrix.f32(module.weight.detach(), None if bias is None else bias.detach())
    if type(module) is GGUFLinear and module.blocks.device.type == "cpu" and module.blocks.is_contiguous():
        return ext.Matrix.gguf(module.blocks, int(module.qtype), module.in_features,
                               None if bias is None else bias.detach())
    if type(module) is Int4Linear and module.in_features % GEMV_BLOCK == 0 and module.qweight.device.type == "cpu":
        return ext.Matrix.int4(module.gemv_weight(), module.scale.contiguous(), module.zero.contiguous(),
                               module.group_size, None if bias is None else bias.detach())
    return None


def _watch(checks: list, mapping: dict, key: str) -> None:
    """Record that the plan read mapping[key] (a module's child, parameter or kernel packing)."""
    checks.append((mapping, key, mapping.get(key)))


def _watch_linear(checks: list, holder: dict, name: str) -> None:
    """Watch the linear holder[name], its weight, bias and buffers (quantized codes, GGUF blocks), and an
    Int4Linear's GEMV packing."""
    _watch(checks, holder, name)
    module = getattr(holder[name], "decode_inner", holder[name])
    _watch(checks, module._parameters, "weight")
    _watch(checks, module._parameters, "bias")
    for buffer in module._buffers:
        _watch(checks, module._buffers, buffer)
    if "_kernel_cache" in module.__dict__:  # Int4Linear: its GEMV packing, dropped on reload
        _watch(checks, module.__dict__, "_kernel_cache")
        if isinstance(module.__dict__["_kernel_cache"], dict):
            _watch(checks, module.__dict__["_kernel_cache"], "gemv")


def watch_list(model) -> list[tuple[dict, str, object]]:
    """(mapping, key, value) for every module, weight and packing a plan built now would read."""
    checks: list = []
    _watch(checks, model.model._modules, "layers")
    _watch_linear(checks, model._modules, "lm_head")
    _watch(checks, model.model._modules, "norm")
    _watch(checks, model.model.norm._parameters, "weight")
    for i, block in enumerate(model.model.layers):
        _watch(checks, model.model.layers._modules, str(i))
        for parent, name, _ in LINEARS:
            _watch_linear(checks, block._modules[parent]._modules, name)
        attn = block._modules["self_attn"]
        norms = [(block._modules, name) for name, _ in NORMS] + [(attn._modules, "q_norm"), (attn._modules, "k_norm")]
        for holder, name in norms:
            _watch(checks, holder, name)
            if holder.get(name) is not None:
                _watch(checks, holder[name]._parameters, "weight")
    return checks


def _snapshot(checks: list[tuple[dict, str, object]]) -> tuple:
    """The watch list as columns, plus every watched tensor's storage address: `.to(dtype)` and
    `.float()` swap a Parameter's data in place, which the identity checks alone would miss."""
    mappings, keys, values = (list(column) for column in zip(*checks))
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    return mappings, keys, values, tensors, list(map(torch.Tensor.data_ptr, tensors))


def _still_valid(snapshot: tuple) -> bool:
    """Every recorded entry still holds the same object and storage (C-level loops: ~1,300 entries
    per SmolLM2 step)."""
    mappings, keys, values, tensors, pointers = snapshot
    return (all(map(operator.is_, map(dict.get, mappings, keys), values))
            and list(map(torch.Tensor.data_ptr, tensors)) == pointers)


def build_plan(model):
    """A decode.cpp Plan for `model`, or None when some part of it is outside what the kernel runs."""
    ext = gemv.extension()
    config = model.config
    if ext is None or not supported_architecture(config):
        return None
    plan = ext.Plan()
    plan.n_embd, plan.n_head, plan.n_kv_head = config.n_embd, config.n_head, config.n_kv_head
    plan.head_dim, plan.intermediate, plan.eps = config.head_dim, config.intermediate_size, config.norm_eps
    plan.attn_scale, plan.unit_offset = config.attn_scale, config.norm_unit_offset
    plan.geglu, plan.sandwich = config.mlp == "geglu", config.sandwich_norm
    kinds = sorted(set(config.layer_types))
    layers = []
    for block in model.model.layers:
        layer = ext.Layer()
        for parent, name, field in LINEARS:
            matrix = _matrix(ext, getattr(getattr(block, parent), name))
            if matrix is None:
                return None
            setattr(layer, field, matrix)
        norms = [(getattr(block, name, None), field) for name, field in NORMS]
        norms += [(block.self_attn.q_norm, "q_norm"), (block.self_attn.k_norm, "k_norm")]
        for norm, field in norms:
            if norm is None:
                continue
            if type(norm) is not RMSNorm or not _fp32_cpu(norm.weight):
                return None
            setattr(layer, field, norm.weight.detach())
        layer.window = model.window(block.layer_type) or 0
        layer.rope = kinds.index(block.layer_type)
        layers.append(layer)
    plan.layers = layers
    _add_head(ext, model, plan)
    return plan


def _add_head(ext, model, plan) -> None:
    """Let the step end in logits (final norm, then lm_head) when decode.cpp can run both."""
    norm, head = model.model.norm, _matrix(ext, model.lm_head)
    if (head is not None and model.config.final_logit_softcap is None and type(norm) is RMSNorm
            and _fp32_cpu(norm.weight)):
        plan.final_norm, plan.head = norm.weight.detach(), head


def plan_for(model):
    """The model's current plan (cached on it, rebuilt when a part it read was replaced), or None."""
    if not supported_architecture(model.config):
        return None
    cached = model.__dict__.get("_fused_plan")
    if cached is None or not _still_valid(cached[0]):
        plan = build_plan(model)  # packs int4 weights first, so the watch list sees the packings
        cached = (_snapshot(watch_list(model)), plan)
        model.__dict__["_fused_plan"] = cached
    return cached[1]


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Run every step through model.forward (the PyTorch modules) inside the block."""
    global ENABLED
    before, ENABLED = ENABLED, False
    try:
        yield
    finally:
        ENABLED = before


def _finish(model, plan, out: torch.Tensor) -> torch.Tensor:
    """Logits from the kernel's output: as they are when the plan ran the head, else the final norm
    and lm_head in PyTorch (a softcapped head, a head decode.cpp does not run)."""
    return out if plan.has_head else model.logits(model.model.norm(out))


def _rope_rows(model, positions: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """cos and sin rows (N, head_dim) of `positions` (N,) for each rope kind, in build_plan's order."""
    kinds = sorted(set(model.config.layer_types))
    tables = [model.rope_tables(kind, int(positions.max()) + 1, positions.device) for kind in kinds]
    return [cos[positions].contiguous() for cos, _ in tables], [sin[positions].contiguous() for _, sin in tables]


def _usable(model, rows: int, limit: int, cache_k: list[torch.Tensor]) -> bool:
    """The checks both entry points share: fused decode on, few enough rows, no autograd, fp32 CPU cache."""
    return (ENABLED and rows <= limit and not torch.is_grad_enabled() and supported_architecture(model.config)
            and all(map(_fp32_cpu, cache_k)))


def decode_step(model, tokens: torch.Tensor, cache) -> torch.Tensor | None:
    """Logits (B, vocab) for tokens (B,) fed at the static cache's next slot, for a cache without padding
    whose slot t holds position t; None when the step needs model.forward (not fused, too many rows, no
    slot left): forward then runs it, or raises its clear error for a full cache or context."""
    if not supported_architecture(model.config):  # before reading cache.k: a Mamba cache has none
        return None
    B, slot = tokens.shape[0], cache.length
    if not _usable(model, B, gemv.MAX_ROWS, cache.k) or slot >= min(cache.max_len, model.config.block_size):
        return None
    plan = plan_for(model)
    if plan is None:
        return None
    x = model.embed(tokens[:, None], None).view(B, -1)
    if not _fp32_cpu(x):
        return None
    cos, sin = _rope_rows(model, torch.full((B,), slot, dtype=torch.long, device=x.device))
    out = gemv.extension().decode_layers(plan, x, cache.k, cache.v, cache.reserve_aligned(), cos, sin,
                                         logits=plan.has_head)
    return _finish(model, plan, out)


def _chunk_keys(model, positions: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per rope kind, (T, W) key slots and (T,) counts: token t sees slots lo_t..p_t of an aligned cache
    (slot = position), lo_t trimmed by the kind's sliding window; padding repeats a visible slot."""
    tables, lens = {}, {}
    for kind in sorted(set(model.config.layer_types)):
        window = model.window(kind)
        lo = (positions + 1 - window).clamp(min=0) if window else torch.zeros_like(positions)
        count = positions + 1 - lo
        table = lo[:, None] + torch.arange(int(count.max()))[None]
        tables[kind], lens[kind] = torch.minimum(table, positions[:, None]).contiguous(), count
    return tables, lens


def chunk_step(model, tokens: torch.Tensor, cache) -> torch.Tensor | None:
    """Logits (T, vocab) for T consecutive tokens (T,) of one sequence fed at the static cache's next slots
    (batch 1, slot t holds position t), causal among themselves: speculative decoding's verify step in
    one C++ call. None when it does not qualify; model.forward then runs it."""
    T, start = tokens.shape[0], cache.length
    if (cache.batch_size != 1 or not _usable(model, T, gemv.PAGED_MAX_ROWS, cache.k)
            or start + T > min(cache.max_len, model.config.block_size)):
        return None
    plan = plan_for(model)
    ext = gemv.extension()
    if plan is None or (T > gemv.MAX_ROWS and plan.has_int4) or not hasattr(ext, "decode_layers_chunk"):
        return None
    x = model.embed(tokens[None], None).view(T, -1)
    if not _fp32_cpu(x):
        return None
    positions = torch.arange(start, start + T)
    cache.reserve(positions[None], torch.ones(1, T, dtype=torch.bool))
    tables, lens = _chunk_keys(model, positions)
    cos, sin = _rope_rows(model, positions)
    kinds = sorted(tables)
    out = ext.decode_layers_chunk(plan, x, cache.k, cache.v, positions, [tables[k] for k in kinds],
                                  [lens[k] for k in kinds], cos, sin, logits=plan.has_head)
    return _finish(model, plan, out)


def paged_step(model, input_ids: torch.Tensor, positions: torch.Tensor, cache, slot_mapping: torch.Tensor,
               key_slots: dict[str, torch.Tensor], key_lens: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """Logits (N, vocab) for N sequences that each decode one token, over the serving engine's paged cache.

    Args:
        input_ids, positions: (N,) each sequence's new token and its position.
        slot_mapping: (N,) the cache slot each new key/value goes to.
        key_slots: per layer kind, (N, L) the cache slots of each sequence's keys (padded);
            key_lens: per layer kind, (N,) how many of them are keys (CPU int64).
    Returns None when the step does not qualify (too many rows, a part decode.cpp does not run).
    """
    N = input_ids.shape[0]
    if not _usable(model, N, gemv.PAGED_MAX_ROWS, cache.k) or not all(map(_fp32_cpu, cache.v)):
        return None
    plan = plan_for(model)
    if plan is None or (N > gemv.MAX_ROWS and plan.has_int4):  # int4 products take at most 8 rows
        return None
    x = model.embed(input_ids[None], positions[None]).view(N, -1)
    if not _fp32_cpu(x):
        return None
    kinds = sorted(key_slots)
    cos, sin = _rope_rows(model, positions)
    out = gemv.extension().decode_layers_paged(
        plan, x, cache.k, cache.v, slot_mapping, [key_slots[k] for k in kinds], [key_lens[k] for k in kinds],
        cos, sin, logits=plan.has_head)
    return _finish(model, plan, out)

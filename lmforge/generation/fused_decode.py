"""Fused decode step: every block for one new token per sequence in a single C++ call.

A batch-1 decode step of SmolLM2 is ~5,000 PyTorch op calls (views included); their launch cost is
larger than the weight reads once the matrix products run on lmforge's GEMV kernels. This
module turns a Transformer into a `Plan` for lmforge/kernels/decode.cpp (the same block, as
loops) and runs it when the step qualifies: one token per row, at most 8 rows, no padding in
the static KV cache, no autograd, fp32 CPU weights that are plain or int4 linears, an RMSNorm
+ RoPE + gated-MLP architecture. The serving engine's steps of decodes only run the same way over
its paged cache (`run_paged`; up to 64 rows when no weight is int4). Generation without padding
skips model.forward as well (`decode_step`: embedding, rope rows, the call). Anything else takes the
PyTorch modules, unchanged. The plan is rebuilt whenever a module or weight it read was replaced
(quantizing, LoRA, loading).
"""

from __future__ import annotations

import operator

import torch
from torch import nn

from lmforge.kernels import gemv
from lmforge.model.linear import is_plain_linear
from lmforge.model.norm import RMSNorm

LINEARS = (("self_attn", "q_proj", "q"), ("self_attn", "k_proj", "k"), ("self_attn", "v_proj", "v"),
           ("self_attn", "o_proj", "o"), ("mlp", "gate_proj", "gate"), ("mlp", "up_proj", "up"),
           ("mlp", "down_proj", "down"))
NORMS = (("input_layernorm", "input_norm"), ("post_attention_layernorm", "post_attention_norm"),
         ("pre_feedforward_layernorm", "pre_feedforward_norm"), ("post_feedforward_layernorm", "post_feedforward_norm"))


def supported_architecture(config) -> bool:
    """Whether decode.cpp implements this block: RMSNorm, RoPE, SwiGLU/GeGLU, no attention softcap."""
    return (config.norm == "rmsnorm" and config.position == "rope" and config.mlp in ("swiglu", "geglu")
            and config.attn_logit_softcap is None and config.n_head % config.n_kv_head == 0)


def _fp32_cpu(t: torch.Tensor) -> bool:
    return t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous()


def _matrix(ext, module: nn.Module):
    """The kernel's view of a linear module, or None when decode.cpp cannot run it."""
    from lmforge.quantization.int4 import GEMV_BLOCK, Int4Linear  # quantization imports the model package

    bias = getattr(module, "bias", None)
    if bias is not None and not _fp32_cpu(bias):
        return None
    if is_plain_linear(module) and _fp32_cpu(module.weight):
        return ext.Matrix.f32(module.weight.detach(), None if bias is None else bias.detach())
    if type(module) is Int4Linear and module.in_features % GEMV_BLOCK == 0 and module.qweight.device.type == "cpu":
        return ext.Matrix.int4(module.gemv_weight(), module.scale.contiguous(), module.zero.contiguous(),
                               module.group_size, None if bias is None else bias.detach())
    return None


def _watch(checks: list, mapping: dict, key: str) -> None:
    """Record that the plan read mapping[key] (a module's child, parameter or kernel packing)."""
    checks.append((mapping, key, mapping.get(key)))


def _watch_linear(checks: list, holder: dict, name: str) -> None:
    """Watch the linear holder[name], its weight and bias, and an Int4Linear's GEMV packing."""
    _watch(checks, holder, name)
    module = holder[name]
    _watch(checks, module._parameters, "weight")
    _watch(checks, module._parameters, "bias")
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


def _still_valid(checks: tuple[list, list, list]) -> bool:
    """Every recorded entry still holds the same object (C-level loop: ~1,300 entries per SmolLM2 step)."""
    mappings, keys, values = checks
    return all(map(operator.is_, map(dict.get, mappings, keys), values))


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
        cached = (tuple(map(list, zip(*watch_list(model)))), plan)
        model.__dict__["_fused_plan"] = cached
    return cached[1]


def decode_step(model, tokens: torch.Tensor, cache) -> torch.Tensor | None:
    """Logits (B, vocab) for tokens (B,) fed at the cache's next slot, from the embedding to the logits
    without model.forward (0.3-0.4 ms of Python per step less), for a cache without padding whose slot t
    holds position t; None when the step needs forward (not fused, a softcapped head, no slot left)."""
    B, slot = tokens.shape[0], cache.length
    if (not getattr(model, "fused_decode", False) or B > gemv.MAX_ROWS or torch.is_grad_enabled()
            or slot >= min(cache.max_len, model.config.block_size) or not _fp32_cpu(cache.k[0])):
        return None  # forward takes it, or raises its error for a full cache or context
    plan = plan_for(model)
    if plan is None or not plan.has_head:
        return None
    x = model.embed(tokens[:, None], None).view(B, -1)
    if not _fp32_cpu(x):
        return None
    tables = [model.rope_tables(kind, slot + 1, x.device) for kind in sorted(set(model.config.layer_types))]
    cos = [table[slot:slot + 1].expand(B, -1).contiguous() for table, _ in tables]
    sin = [table[slot:slot + 1].expand(B, -1).contiguous() for _, table in tables]
    return gemv.extension().decode_layers(plan, x, cache.k, cache.v, cache.reserve_aligned(), cos, sin, logits=True)


def run_blocks(model, x: torch.Tensor, cache, contexts: dict, logits: bool) -> tuple[torch.Tensor, bool] | None:
    """(x (B, 1, n_embd) after every block, False), or with `logits` (logits (B, 1, vocab), True) when
    the plan can also run the final norm and lm_head, by decode.cpp; None when this step does not qualify."""
    B, T, D = x.shape
    if (T != 1 or B > gemv.MAX_ROWS or torch.is_grad_enabled() or not _fp32_cpu(x)
            or not all(ctx.mask is None and ctx.cache is cache for ctx in contexts.values())
            or not all(map(_fp32_cpu, cache.k)) or not all(map(_fp32_cpu, cache.v))):
        return None
    plan = plan_for(model)
    if plan is None:
        return None
    kinds = sorted(contexts)
    cos = [contexts[k].rope[0].reshape(B, -1).float().contiguous() for k in kinds]
    sin = [contexts[k].rope[1].reshape(B, -1).float().contiguous() for k in kinds]
    start = contexts[kinds[0]].start
    out = gemv.extension().decode_layers(plan, x.reshape(B, D).contiguous(), cache.k, cache.v, start, cos, sin,
                                         logits=logits)
    return out.view(B, 1, -1), logits and plan.has_head


def run_paged(model, x: torch.Tensor, contexts: dict, logits: bool) -> tuple[torch.Tensor, bool] | None:
    """Like run_blocks, (1, N, ...) over the serving engine's paged cache when all N packed tokens are
    decodes; None when this step does not qualify (prefill chunks, mixed steps). `logits`: every
    token's logits are wanted, so the step may end in them."""
    from lmforge.serving.model_runner import PagedAttention  # serving imports the model package

    _, N, D = x.shape
    ctxs = [contexts[kind] for kind in sorted(contexts)]  # in rope-kind order, as build_plan numbers them
    cache = ctxs[0].cache
    if (x.shape[0] != 1 or N > gemv.PAGED_MAX_ROWS or torch.is_grad_enabled() or not _fp32_cpu(x)
            or not all(type(ctx) is PagedAttention and ctx.plan.decode_only and ctx.cache is cache for ctx in ctxs)
            or not all(map(_fp32_cpu, cache.k)) or not all(map(_fp32_cpu, cache.v))):
        return None
    plan = plan_for(model)
    if plan is None or (N > gemv.MAX_ROWS and plan.has_int4):  # int4 products take at most 8 rows
        return None
    cos = [ctx.rope[0].reshape(N, -1).float().contiguous() for ctx in ctxs]
    sin = [ctx.rope[1].reshape(N, -1).float().contiguous() for ctx in ctxs]
    out = gemv.extension().decode_layers_paged(
        plan, x.view(N, D), cache.k, cache.v, ctxs[0].slot_mapping, [ctx.plan.decode_slots.view(N, -1) for ctx in ctxs],
        [ctx.plan.decode_lens for ctx in ctxs], cos, sin, logits=logits)
    return out.view(1, N, -1), logits and plan.has_head

"""The training forward pass: final-norm hidden states of a batch under causal, packed, sliding-window,
sparse or ALiBi attention, with gradient checkpointing per block; every objective starts here."""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch.utils.checkpoint import checkpoint

from lmforge.model.attention import AttentionContext
from lmforge.model.masks import attention_mask
from lmforge.model.moe import recomputation
from lmforge.model.sparse import sparse_context
from lmforge.training.prefix import prefix_contexts


def _contexts(model, positions: torch.Tensor, seq_ids: torch.Tensor | None) -> dict[str, AttentionContext]:
    """Causal attention per layer kind; packed rows also stay inside their own example."""
    T = positions.shape[1]
    out = {}
    for kind in set(model.config.layer_types):
        rope = model.rope_at(kind, positions)
        if kind in model.config.sparse_patterns:  # block-sparse, inside each packed example
            out[kind] = sparse_context(model.config.sparse_patterns[kind], rope, positions, None, seq_ids=seq_ids)
            continue
        window = model.window(kind)
        if seq_ids is None and (window is None or T <= window) and model.config.position != "alibi":
            out[kind] = AttentionContext(rope, None, True, None, 0, 0)
            continue
        mask = attention_mask(positions, positions, None, window)  # (B, 1, T, T)
        if seq_ids is not None:
            mask = mask & (seq_ids[:, :, None] == seq_ids[:, None, :])[:, None]
        if model.config.position == "alibi":
            mask = model.alibi(positions, positions, mask)
        out[kind] = AttentionContext(rope, mask, False, None, 0, 0)
    return out


def hidden_states(model, batch: dict) -> torch.Tensor:
    """Final-norm hidden states (B, T, n_embd); blocks are recomputed in backward with
    `model.gradient_checkpointing` (activations of one block kept instead of all)."""
    if model.config.arch == "mamba":
        return _ssm_hidden_states(model, batch)
    ids, positions = batch["input_ids"], batch["positions"]
    prefix = getattr(model, "prefix_encoder", None)  # prefix tuning (training/prefix.py)
    if prefix is not None:  # real tokens count on from the P virtual ones, as transformers counts them
        positions = positions + prefix.num_virtual_tokens
    contexts = _contexts(model, positions, batch.get("seq_ids"))
    if prefix is not None:
        contexts = prefix_contexts(model, contexts, ids.shape[1])
    x = model.embed(ids, positions)
    use_ckpt = getattr(model, "gradient_checkpointing", False) and torch.is_grad_enabled()
    moe = {"context_fn": _moe_contexts} if model.config.n_experts else {}
    for layer in model.model.layers:
        ctx = contexts[layer.layer_type]
        x = checkpoint(layer, x, ctx, use_reentrant=False, **moe) if use_ckpt else layer(x, ctx)
    return model.model.norm(x)


def _ssm_hidden_states(model, batch: dict) -> torch.Tensor:
    """hidden_states of a Mamba or hybrid model (model/mamba.py): a context per layer, the selective scan in
    parallel; a packed example starts from a fresh state, padding leaves the state as it was."""
    ids = batch["input_ids"]
    contexts = model.layer_contexts(ids.shape, batch["positions"], batch.get("valid"), None, batch.get("seq_ids"))
    x = model.embed(ids)
    use_ckpt = getattr(model, "gradient_checkpointing", False) and torch.is_grad_enabled()
    for layer, ctx in zip(model.backbone.layers, contexts):
        x = checkpoint(layer, x, ctx, use_reentrant=False) if use_ckpt else layer(x, ctx)
    return model.backbone.norm_f(x)


def _moe_contexts():
    """checkpoint's (forward, recompute) contexts: MoE layers record routing in the forward only."""
    return nullcontext(), recomputation()

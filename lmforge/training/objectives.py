"""Objectives: `objective(model, batch) -> loss`, one signature for the shared training loop.

`sft_loss` computes logits only where a label exists (the response tokens), in chunks, so the
(tokens x vocab) logits of the prompt are never built; the mean is over the tokens of the
whole optimizer step (`batch["loss_tokens"]`), which makes gradient accumulation exact.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmforge.model.attention import AttentionContext
from lmforge.model.masks import attention_mask
from lmforge.model.moe import load_balancing_loss, recomputation, router_z_loss, take_router_logits
from lmforge.model.sparse import sparse_context
from lmforge.training.data import IGNORE_INDEX
from lmforge.training.mlm import mlm_loss

Objective = Callable[[nn.Module, dict], torch.Tensor]
LOGIT_CHUNK = 256  # label rows per lm_head chunk: (256, 49152) fp32 logits = 48 MiB at a time


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
    contexts = _contexts(model, positions, batch.get("seq_ids"))
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


def router_loss(model, batch: dict, label_tokens: int) -> torch.Tensor | float:
    """aux_coef * load-balancing loss + z_coef * z-loss of the last forward's router logits (MoE),
    weighted by this micro-batch's share of the step's label tokens; 0 in eval mode, so held-out
    losses stay plain next-token losses."""
    logits, cfg = take_router_logits(model), model.config
    if not (model.training and logits and (cfg.router_aux_loss_coef or cfg.router_z_loss_coef)):
        return 0.0
    valid = batch.get("valid")  # (B, T), False at padding
    loss = 0.0
    if cfg.router_aux_loss_coef:
        loss = cfg.router_aux_loss_coef * load_balancing_loss(logits, cfg.n_experts, cfg.n_experts_per_tok, valid)
    if cfg.router_z_loss_coef:
        loss = loss + cfg.router_z_loss_coef * router_z_loss(logits, valid)
    return loss * (label_tokens / batch.get("loss_tokens", max(1, label_tokens)))


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i W^T, t_i) for a frozen W, chunk by chunk; the gradient w.r.t. h is computed in
    forward ((softmax - onehot) W), so no (rows, vocab) tensor outlives its chunk (the fused
    linear-cross-entropy of Liger-Kernel, https://arxiv.org/abs/2410.10989, in plain torch)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        w = weight.to(hidden.dtype)
        grad = torch.empty_like(hidden)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], LOGIT_CHUNK):
            h, t = hidden[start:start + LOGIT_CHUNK], targets[start:start + LOGIT_CHUNK]
            logits = (h @ w.t()).float()  # (chunk, vocab)
            lse = logits.logsumexp(dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place
            probs[torch.arange(t.shape[0], device=t.device), t] -= 1.0
            grad[start:start + LOGIT_CHUNK] = (probs.to(w.dtype) @ w).to(grad.dtype)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_out.to(grad.dtype), None, None


def token_losses(model, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of `targets` (N,) from hidden rows (N, n_embd), lm_head in chunks."""
    weight = model.lm_head.weight
    if model.config.final_logit_softcap is None and not weight.requires_grad:
        return _FusedLinearCrossEntropy.apply(hidden, weight, targets)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], LOGIT_CHUNK):
        logits = model.logits(hidden[start:start + LOGIT_CHUNK]).float()  # (chunk, vocab)
        total = total + F.cross_entropy(logits, targets[start:start + LOGIT_CHUNK], reduction="sum")
    return total


def count_loss_tokens(batch: dict) -> int:
    """Tokens that carry a label in this micro-batch: next-token labels from position 1 on, or where they
    stand with batch["label_shift"] == 0 (masked-LM, training/mlm.py)."""
    shift = int(batch.get("label_shift", 1))
    return int((batch["labels"][:, shift:] != IGNORE_INDEX).sum())


def sft_loss(model, batch: dict) -> torch.Tensor:
    """Next-token cross-entropy on labelled (response) tokens, mean over the step's tokens."""
    hidden = hidden_states(model, batch)[:, :-1]  # position t predicts label t + 1
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    total = token_losses(model, hidden[keep], labels[keep])
    loss = total / batch.get("loss_tokens", max(1, int(keep.sum())))
    if model.config.n_experts:
        loss = loss + router_loss(model, batch, int(keep.sum()))
    return loss


def pretrain_loss(model, batch: dict) -> torch.Tensor:
    """Next-token loss on every token (labels = input_ids where the batch has no labels)."""
    if "labels" not in batch:
        batch = {**batch, "labels": batch["input_ids"]}
    return sft_loss(model, batch)


OBJECTIVES: dict[str, Objective] = {"sft": sft_loss, "pretrain": pretrain_loss, "mlm": mlm_loss}

"""Objectives: `objective(model, batch) -> loss`, one signature for the shared training loop.

`sft_loss` computes logits only where a label exists (the response tokens), in chunks, so the
(tokens x vocab) logits of the prompt are never built; the mean is over the tokens of the
whole optimizer step (`batch["loss_tokens"]`), which makes gradient accumulation exact.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmforge.model.attention import AttentionContext
from lmforge.model.masks import attention_mask
from lmforge.training.data import IGNORE_INDEX

Objective = Callable[[nn.Module, dict], torch.Tensor]
LOGIT_CHUNK = 1024  # label rows per lm_head chunk: bounds the (rows, vocab) logits kept alive


def _contexts(model, positions: torch.Tensor, seq_ids: torch.Tensor | None) -> dict[str, AttentionContext]:
    """Causal attention per layer kind; packed rows also stay inside their own example."""
    T = positions.shape[1]
    out = {}
    for kind in set(model.config.layer_types):
        rope = model.rope_at(kind, positions)
        window = model.window(kind)
        if seq_ids is None and (window is None or T <= window):
            out[kind] = AttentionContext(rope, None, True, None, 0, 0)
            continue
        mask = attention_mask(positions, positions, None, window)  # (B, 1, T, T)
        if seq_ids is not None:
            mask = mask & (seq_ids[:, :, None] == seq_ids[:, None, :])[:, None]
        out[kind] = AttentionContext(rope, mask, False, None, 0, 0)
    return out


def hidden_states(model, batch: dict) -> torch.Tensor:
    """Final-norm hidden states (B, T, n_embd); blocks are recomputed in backward with
    `model.gradient_checkpointing` (activations of one block kept instead of all)."""
    ids, positions = batch["input_ids"], batch["positions"]
    contexts = _contexts(model, positions, batch.get("seq_ids"))
    x = model.embed(ids, positions)
    use_ckpt = getattr(model, "gradient_checkpointing", False) and torch.is_grad_enabled()
    for layer in model.model.layers:
        ctx = contexts[layer.layer_type]
        x = checkpoint(layer, x, ctx, use_reentrant=False) if use_ckpt else layer(x, ctx)
    return model.model.norm(x)


def token_losses(model, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of `targets` (N,) from hidden rows (N, n_embd), lm_head in chunks."""
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], LOGIT_CHUNK):
        logits = model.logits(hidden[start:start + LOGIT_CHUNK]).float()  # (chunk, vocab)
        total = total + F.cross_entropy(logits, targets[start:start + LOGIT_CHUNK], reduction="sum")
    return total


def count_loss_tokens(batch: dict) -> int:
    """Tokens that carry a next-token label in this micro-batch."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def sft_loss(model, batch: dict) -> torch.Tensor:
    """Next-token cross-entropy on labelled (response) tokens, mean over the step's tokens."""
    hidden = hidden_states(model, batch)[:, :-1]  # position t predicts label t + 1
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    total = token_losses(model, hidden[keep], labels[keep])
    return total / batch.get("loss_tokens", max(1, int(keep.sum())))


def pretrain_loss(model, batch: dict) -> torch.Tensor:
    """Next-token loss on every token (labels = input_ids where the batch has no labels)."""
    if "labels" not in batch:
        batch = {**batch, "labels": batch["input_ids"]}
    return sft_loss(model, batch)


OBJECTIVES: dict[str, Objective] = {"sft": sft_loss, "pretrain": pretrain_loss}

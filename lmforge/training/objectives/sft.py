"""Supervised fine-tuning and pretraining losses: next-token cross-entropy on labelled tokens.

`sft_loss` computes logits only where a label exists (the response tokens), in chunks, so the
(tokens x vocab) logits of the prompt are never built; the mean is over the tokens of the
whole optimizer step (`batch["loss_tokens"]`), which makes gradient accumulation exact.
"""

from __future__ import annotations

import torch

from lmforge.model.moe import load_balancing_loss, router_z_loss, take_router_logits
from lmforge.training.data import IGNORE_INDEX
from lmforge.training.objectives.cross_entropy import token_losses
from lmforge.training.objectives.forward import hidden_states


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

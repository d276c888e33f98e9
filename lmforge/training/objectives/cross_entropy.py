"""Next-token cross-entropy from hidden rows with the lm_head applied in chunks, so the (tokens x vocab)
logits never exist at once; with a frozen head the gradient is computed in the forward (fused)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmforge.training.data import IGNORE_INDEX

LOGIT_CHUNK = 256  # label rows per lm_head chunk: (256, 49152) fp32 logits = 48 MiB at a time


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i W^T, t_i), chunk by chunk; the gradients are computed in forward (w.r.t. h:
    (softmax - onehot) W; w.r.t. a trainable W, as in pretraining: (softmax - onehot)^T h, summed over
    chunks), so no (rows, vocab) tensor outlives its chunk (the fused linear-cross-entropy of
    Liger-Kernel, https://arxiv.org/abs/2410.10989, in plain torch)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        w = weight.to(hidden.dtype)
        grad = torch.empty_like(hidden)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if weight.requires_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], LOGIT_CHUNK):
            h, t = hidden[start:start + LOGIT_CHUNK], targets[start:start + LOGIT_CHUNK]
            logits = (h @ w.t()).float()  # (chunk, vocab)
            target = logits.gather(1, t[:, None])  # (chunk, 1)
            top = logits.amax(dim=-1, keepdim=True)
            unnormalised = logits.sub_(top).exp_()  # exp(z - max), in place: 4 passes over the chunk
            norm = unnormalised.sum(dim=-1, keepdim=True)  # in all, where logsumexp + softmax took 7
            total += (top + norm.log() - target).sum()
            # (softmax - onehot) W = (exp(z - max) W) / norm - W[t]: the division on (chunk, n_embd)
            e = unnormalised.to(w.dtype)
            rows = (e @ w).float() / norm - w[t].float()
            grad[start:start + LOGIT_CHUNK] = rows.to(grad.dtype)
            if grad_w is not None:  # exp(z - max)^T (h / norm) - onehot^T h: the division on (chunk, n_embd) again
                grad_w += (e.t() @ (h.float() / norm).to(w.dtype)).float()
                grad_w.index_add_(0, t, h.float(), alpha=-1.0)
        ctx.save_for_backward(grad, *([grad_w] if grad_w is not None else []))
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad, *grad_w = ctx.saved_tensors
        weight_grad = (grad_w[0] * grad_out).to(ctx.weight_dtype) if grad_w else None
        return grad * grad_out.to(grad.dtype), weight_grad, None


def token_losses(model, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of `targets` (N,) from hidden rows (N, n_embd), lm_head in chunks."""
    weight = model.lm_head.weight
    fused = model.config.final_logit_softcap is None and getattr(model.lm_head, "bias", None) is None
    if fused and (not weight.requires_grad or torch.is_grad_enabled()):  # a trained head: pretraining, full FT
        return _FusedLinearCrossEntropy.apply(hidden, weight, targets)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], LOGIT_CHUNK):
        logits = model.logits(hidden[start:start + LOGIT_CHUNK]).float()  # (chunk, vocab)
        total = total + F.cross_entropy(logits, targets[start:start + LOGIT_CHUNK], reduction="sum")
    return total


def count_loss_tokens(batch: dict) -> int:
    """Tokens that carry a label in this micro-batch: next-token labels from position 1 on, or where they
    stand with batch["label_shift"] == 0 (masked-LM, training/mlm.py); batch["loss_units"] when the loss is a
    mean over other units (preference pairs, objectives/dpo.py)."""
    if "loss_units" in batch:
        return int(batch["loss_units"])
    shift = int(batch.get("label_shift", 1))
    return int((batch["labels"][:, shift:] != IGNORE_INDEX).sum())

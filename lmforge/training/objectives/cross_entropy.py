"""Next-token cross-entropy from hidden rows with the lm_head applied in chunks, so the (tokens x vocab)
logits never exist at once; with a frozen head the gradient is computed in the forward (fused)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmforge.training.data import IGNORE_INDEX

LOGIT_CHUNK = 256  # label rows per lm_head chunk: (256, 49152) fp32 logits = 48 MiB at a time


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
            target = logits.gather(1, t[:, None])  # (chunk, 1)
            top = logits.amax(dim=-1, keepdim=True)
            unnormalised = logits.sub_(top).exp_()  # exp(z - max), in place: 4 passes over the chunk
            norm = unnormalised.sum(dim=-1, keepdim=True)  # in all, where logsumexp + softmax took 7
            total += (top + norm.log() - target).sum()
            # (softmax - onehot) W = (exp(z - max) W) / norm - W[t]: the division on (chunk, n_embd)
            rows = (unnormalised.to(w.dtype) @ w).float() / norm - w[t].float()
            grad[start:start + LOGIT_CHUNK] = rows.to(grad.dtype)
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
    stand with batch["label_shift"] == 0 (masked-LM, training/mlm.py); batch["loss_units"] when the loss is a
    mean over other units (preference pairs, objectives/dpo.py)."""
    if "loss_units" in batch:
        return int(batch["loss_units"])
    shift = int(batch.get("label_shift", 1))
    return int((batch["labels"][:, shift:] != IGNORE_INDEX).sum())

"""Preference losses: DPO (sigmoid, with cDPO label smoothing), IPO and SimPO, over one forward of the
chosen and rejected rows concatenated along the batch, the reference from the frozen model.

DPO (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290, eq. 7):
    L = -log sigmoid(beta * ((log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))))
cDPO (Mitchell 2023, https://ericmitchell.ai/cdpo.pdf): labels flipped with probability eps,
    L = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
IPO (Azar et al. 2023, https://arxiv.org/abs/2310.12036, eq. 17): L = (h - 1 / (2 beta))^2, h from per-token
    averaged log-ratios (the authors' runs; trl does the same)
SimPO (Meng et al. 2024, https://arxiv.org/abs/2405.14734, eq. 6): no reference, length-averaged
    log-probs, L = -log sigmoid(beta (avg log pi(y_w) - avg log pi(y_l)) - gamma)
Rewards are beta * (log pi - log pi_ref) (DPO section 5; SimPO: beta * avg log pi).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.training.data import IGNORE_INDEX
from lmforge.training.objectives.cross_entropy import LOGIT_CHUNK
from lmforge.training.objectives.forward import hidden_states

LOSSES = ("sigmoid", "ipo", "simpo")


@dataclass
class DPOConfig:
    """The `dpo` recipe section: which loss, its constants, and the pair lengths (tokens)."""

    loss: Literal["sigmoid", "ipo", "simpo"] = "sigmoid"
    beta: float = 0.1  # DPO paper: 0.1 (0.5 for the summarisation runs); SimPO: 2.0-2.5
    label_smoothing: float = 0.0  # cDPO's eps: the chance a preference label is flipped (sigmoid, simpo)
    simpo_gamma: float = 0.5  # SimPO's target margin gamma (trl's CPOConfig default; the paper: gamma/beta ~ 0.5)
    max_prompt_length: int = 128  # a longer prompt is refused (ValueError naming file:line), never cut
    max_length: int = 320  # prompt + response; the response is cut to fit (its EOS then dropped)
    precompute_ref: bool = True  # reference log-probs once per pair before training (not for simpo)

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"dpo.loss={self.loss!r} must be one of {LOSSES}")
        if self.beta <= 0:
            raise ValueError(f"dpo.beta={self.beta} must be > 0")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"dpo.label_smoothing={self.label_smoothing} must be in [0, 0.5)")
        if self.label_smoothing and self.loss == "ipo":
            raise ValueError("dpo.label_smoothing applies to the sigmoid and simpo losses, not ipo; set it to 0")
        if not 1 <= self.max_prompt_length < self.max_length:
            raise ValueError(f"dpo.max_prompt_length={self.max_prompt_length} must be >= 1 and below "
                             f"dpo.max_length={self.max_length}, so a response token fits")

    @property
    def uses_reference(self) -> bool:
        return self.loss != "simpo"


# named presets: the papers' settings
PRESETS = {
    "dpo": DPOConfig(),
    "cdpo": DPOConfig(label_smoothing=0.1),
    "ipo": DPOConfig(loss="ipo", beta=0.1),
    "simpo": DPOConfig(loss="simpo", beta=2.0, simpo_gamma=1.0),  # SimPO table 7: beta 2.0, gamma/beta 0.5
}


def preference_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor | None,
                    ref_rejected: torch.Tensor | None, chosen_len: torch.Tensor, rejected_len: torch.Tensor,
                    cfg: DPOConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair losses, chosen rewards, rejected rewards), each (B,), from the policy's and reference's
    log-probs summed over each response (B,) and the responses' token counts (B,). IPO and SimPO use
    per-token averages (SimPO eq. 4; IPO as its authors ran it, which trl follows); simpo needs no reference."""
    eps = cfg.label_smoothing
    if cfg.loss == "simpo":
        avg_chosen, avg_rejected = chosen / chosen_len, rejected / rejected_len
        logits = (avg_chosen - avg_rejected) - cfg.simpo_gamma / cfg.beta  # SimPO eq. 6 with beta factored out
        losses = -F.logsigmoid(cfg.beta * logits) * (1 - eps) - F.logsigmoid(-cfg.beta * logits) * eps
        return losses, cfg.beta * avg_chosen.detach(), cfg.beta * avg_rejected.detach()
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected  # log pi/pi_ref per response
    if cfg.loss == "ipo":
        h = chosen_ratio / chosen_len - rejected_ratio / rejected_len
        losses = (h - 1 / (2 * cfg.beta)) ** 2  # IPO eq. 17, tau = beta
    else:
        h = chosen_ratio - rejected_ratio
        losses = -F.logsigmoid(cfg.beta * h) * (1 - eps) - F.logsigmoid(-cfg.beta * h) * eps  # DPO eq. 7; cDPO
    return losses, cfg.beta * chosen_ratio.detach(), cfg.beta * rejected_ratio.detach()


class _FusedTokenLogps(torch.autograd.Function):
    """log p(t_i | h_i) per row for a frozen lm_head W, chunk by chunk; d/dh = (onehot - softmax) W is
    computed in forward and scaled by each row's incoming gradient in backward, so no (rows, vocab)
    tensor outlives its chunk (cross_entropy._FusedLinearCrossEntropy, per row instead of summed)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        w = weight.float()
        grad = torch.empty_like(hidden)
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], LOGIT_CHUNK):
            h, t = hidden[start:start + LOGIT_CHUNK].float(), targets[start:start + LOGIT_CHUNK]
            logits = h @ w.t()  # (chunk, vocab), fp32 even under autocast (token_logps)
            lse = logits.logsumexp(dim=-1)
            out[start:start + LOGIT_CHUNK] = logits.gather(1, t[:, None]).squeeze(1) - lse
            probs = logits.sub_(lse[:, None]).exp_().neg_()  # -softmax, in place
            probs[torch.arange(t.shape[0], device=t.device), t] += 1.0
            grad[start:start + LOGIT_CHUNK] = (probs @ w).to(grad.dtype)
        ctx.save_for_backward(grad)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_out[:, None].to(grad.dtype), None, None


def token_logps(model, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets) (N,) from hidden rows (N, n_embd), the lm_head applied in chunks and in fp32 even under
    bf16 autocast: log-ratios of policy and reference are small differences of large sums, and a bf16 head in
    one and an fp32 one in the other (the no-grad fast path) would differ by more than the margin itself."""
    weight = model.lm_head.weight
    with torch.autocast(hidden.device.type, enabled=False):
        if model.config.final_logit_softcap is None and not weight.requires_grad and torch.is_grad_enabled():
            return _FusedTokenLogps.apply(hidden, weight, targets)
        return _chunked_logps(model, hidden.float(), targets)


def _chunked_logps(model, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    parts = []
    for start in range(0, hidden.shape[0], LOGIT_CHUNK):
        logits = model.logits(hidden[start:start + LOGIT_CHUNK]).float()  # (chunk, vocab)
        t = targets[start:start + LOGIT_CHUNK]
        parts.append(logits.log_softmax(-1).gather(1, t[:, None]).squeeze(1))
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


def sequence_logps(model, batch: dict, average: bool = False) -> torch.Tensor:
    """Each row's log-probability of its labelled (response) tokens, (rows,): summed, or averaged over
    the row's response tokens (SimPO)."""
    hidden = hidden_states(model, batch)[:, :-1]  # position t predicts label t + 1
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    rows = keep.nonzero()[:, 0]
    per_token = token_logps(model, hidden[keep], labels[keep])
    total = torch.zeros(labels.shape[0], dtype=per_token.dtype, device=per_token.device).index_add(0, rows, per_token)
    return total / keep.sum(1).clamp(min=1) if average else total


@torch.no_grad()
def reference_logps(model, batch: dict, reference: nn.Module | None = None) -> torch.Tensor:
    """Summed response log-probs (rows,) under the frozen reference: `reference` (a frozen copy, full
    fine-tuning) or `model` with its LoRA adapters turned off (lora.disabled_adapters)."""
    from lmforge.training.lora import disabled_adapters

    with disabled_adapters(model) if reference is None else nullcontext():
        return sequence_logps(reference if reference is not None else model, batch)


class PreferenceObjective:
    """`objective(model, batch) -> loss` for the shared loop; `take_metrics()` hands the trainer the mean
    rewards, margin and accuracy of the pairs seen since it was last called.

    A batch holds B pairs as 2B rows, chosen rows first (preferences.collate_pairs); with
    `ref_chosen_logps`/`ref_rejected_logps` in the batch (precomputed) the reference is not run.
    """

    def __init__(self, cfg: DPOConfig, reference: nn.Module | None = None) -> None:
        self.cfg, self.reference = cfg, reference
        self._sums: dict[str, float] = {}
        self._pairs = 0

    def __call__(self, model, batch: dict) -> torch.Tensor:
        B = int(batch["pairs"])
        logps = sequence_logps(model, batch)
        lengths = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(1)  # response tokens per row
        ref = (None, None)
        if self.cfg.uses_reference:
            if "ref_chosen_logps" in batch:
                ref = (batch["ref_chosen_logps"], batch["ref_rejected_logps"])
            else:
                r = reference_logps(model, batch, self.reference)
                ref = (r[:B], r[B:])
        losses, chosen_r, rejected_r = preference_loss(logps[:B], logps[B:], *ref, lengths[:B], lengths[B:], self.cfg)
        self._record(chosen_r, rejected_r, losses)
        return losses.sum() / batch.get("loss_tokens", B)  # the step's mean over pairs (loss_units)

    def _record(self, chosen: torch.Tensor, rejected: torch.Tensor, losses: torch.Tensor) -> None:
        margin = chosen - rejected
        for key, value in (("rewards_chosen", chosen), ("rewards_rejected", rejected), ("reward_margin", margin),
                           ("preference_accuracy", (margin > 0).float())):
            self._sums[key] = self._sums.get(key, 0.0) + float(value.sum())
        self._pairs += int(losses.shape[0])

    def take_metrics(self) -> dict[str, float]:
        """Means over the pairs since the last call (then reset)."""
        out = {k: v / self._pairs for k, v in self._sums.items()} if self._pairs else {}
        self._sums, self._pairs = {}, 0
        return out

"""Knowledge distillation (Hinton et al. 2015, https://arxiv.org/abs/1503.02531): the student learns the
teacher's softened next-token distribution as well as the hard labels.

    loss = alpha * T^2 * KL(softmax(z_teacher / T) || softmax(z_student / T)) + (1 - alpha) * CE(labels)

T^2 keeps the soft term's gradient on the scale of the hard term's as T changes (the paper's section 2).
Only labelled positions are scored, the lm_head runs in chunks of LOGIT_CHUNK rows, and each chunk is
recomputed in backward (torch checkpoint), so no (tokens x vocab) tensor exists for the whole batch.
The teacher's targets come on the fly (a frozen teacher in eval mode, same batch, no grad) or from a
cache of its top-k log-probabilities per position (training/distill.py), renormalised over those k:
the teacher's mass outside its top k is dropped, exact when k equals the vocabulary.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lmforge.training.data import IGNORE_INDEX
from lmforge.training.objectives import cross_entropy
from lmforge.training.objectives.forward import hidden_states


@dataclass
class DistillConfig:
    """Distillation settings: the teacher, the student, the loss weights and where targets come from."""

    teacher: str = "smollm2-135m-instruct"
    student: str = "smollm2-student-4l"  # a preset name (random or teacher-layer init) or a checkpoint path
    init: str = "teacher_layers"  # teacher_layers: every k-th teacher layer + embeddings; random
    alpha: float = 0.5  # weight of the soft (KL) term; 1 - alpha on the hard-label CE
    temperature: float = 2.0
    top_k: int = 0  # 0: teacher logits on the fly; k > 0: cache the teacher's top-k log-probs to disk
    cache_dir: str | None = None  # where the top-k cache lives (default: out_dir/teacher_cache)

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"distill.alpha={self.alpha} must lie in [0, 1] (1 = soft targets only)")
        if self.temperature <= 0:
            raise ValueError(f"distill.temperature={self.temperature} must be > 0 (Hinton et al. use 1-20)")
        if self.top_k < 0:
            raise ValueError(f"distill.top_k={self.top_k} must be >= 0 (0 = teacher on the fly)")
        if self.init not in ("teacher_layers", "random"):
            raise ValueError(f"distill.init={self.init!r} must be 'teacher_layers' or 'random'")


# Named presets: DistilBERT (Sanh et al. 2019) trains at T=2; Hinton et al. weight the soft term most.
DISTILL_PRESETS: dict[str, dict] = {
    "balanced": dict(alpha=0.5, temperature=2.0),
    "soft": dict(alpha=0.9, temperature=2.0),
    "hard": dict(alpha=0.0, temperature=1.0),  # plain CE: the baseline a distilled student is compared with
    "cached": dict(alpha=0.5, temperature=2.0, top_k=64),
}


def distill_preset(name: str, **overrides) -> DistillConfig:
    if name not in DISTILL_PRESETS:
        raise ValueError(f"distill preset {name!r} is not known; presets: {sorted(DISTILL_PRESETS)}")
    return DistillConfig(**{**DISTILL_PRESETS[name], **overrides})


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """sum over rows of KL(softmax(teacher/T) || softmax(student/T)); logits (N, vocab)."""
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum()


def topk_kl(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor, teacher_ids: torch.Tensor,
            temperature: float) -> torch.Tensor:
    """soft_kl against cached top-k teacher log-probs (N, k) at ids (N, k), renormalised over the k.

    log p_i / T differs from z_i / T by a per-row constant, so softmax over the k of (log p / T) is
    the teacher's tempered distribution restricted to its top k (exact for k = vocab).
    """
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1).gather(1, teacher_ids.long())
    log_p = F.log_softmax(teacher_logprobs.float() / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum()


def _chunk_terms(model, hidden: torch.Tensor, labels: torch.Tensor, teacher_rows, cfg: DistillConfig
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed CE, summed KL) of one chunk of rows; teacher_rows is teacher logits (n, vocab) or a
    (logprobs, ids) pair from the cache."""
    logits = model.logits(hidden).float()  # (chunk, vocab)
    ce = F.cross_entropy(logits, labels, reduction="sum")
    if cfg.alpha == 0.0:
        return ce, ce.new_zeros(())
    if isinstance(teacher_rows, tuple):
        return ce, topk_kl(logits, *teacher_rows, cfg.temperature)
    return ce, soft_kl(logits, teacher_rows, cfg.temperature)


def _teacher_chunk(teacher, hidden: torch.Tensor | None, cached: tuple | None, start: int, end: int):
    if cached is not None:
        return cached[0][start:end], cached[1][start:end]
    if hidden is None:
        return None
    with torch.no_grad():
        return teacher.logits(hidden[start:end]).float()


def distill_terms(model, batch: dict, teacher=None, cfg: DistillConfig = DistillConfig(),
                  chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed CE, summed KL) over the batch's labelled positions, lm_head chunk by chunk.

    Teacher targets: `teacher` (a frozen model run here under no_grad) or the batch's cached
    `teacher_logprobs`/`teacher_ids` (L, k), rows in the order of the labelled positions.
    """
    chunk = chunk or cross_entropy.LOGIT_CHUNK
    hidden = hidden_states(model, batch)[:, :-1]  # position t predicts label t + 1
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    hidden, labels = hidden[keep], labels[keep]
    cached, t_hidden = None, None
    if cfg.alpha > 0 and "teacher_logprobs" in batch:
        cached = (batch["teacher_logprobs"], batch["teacher_ids"])
        if cached[0].shape[0] != labels.shape[0]:
            raise ValueError(f"cached teacher targets cover {cached[0].shape[0]} positions, the batch has "
                             f"{labels.shape[0]} labelled ones; delete the cache (distill.cache_dir) and rerun")
    elif cfg.alpha > 0:
        if teacher is None:
            raise ValueError("distillation needs a teacher model or cached teacher targets in the batch")
        with torch.no_grad():
            t_hidden = hidden_states(teacher, batch)[:, :-1][keep]
    ce, kl = hidden.new_zeros((), dtype=torch.float32), hidden.new_zeros((), dtype=torch.float32)
    terms = functools.partial(_chunk_terms, model, cfg=cfg)
    for start in range(0, hidden.shape[0], chunk):
        end = start + chunk
        rows = _teacher_chunk(teacher, t_hidden, cached, start, end)
        if torch.is_grad_enabled() and hidden.requires_grad:  # keep only the chunk's hidden rows for backward
            c, k = checkpoint(terms, hidden[start:end], labels[start:end], rows, use_reentrant=False)
        else:
            c, k = terms(hidden[start:end], labels[start:end], rows)
        ce, kl = ce + c, kl + k
    return ce, kl


def distill_loss(model, batch: dict, teacher=None, cfg: DistillConfig = DistillConfig()) -> torch.Tensor:
    """alpha * T^2 * KL + (1 - alpha) * CE, mean over the step's label tokens. In eval mode the plain
    CE, so held-out losses compare with a student trained on hard labels."""
    if not model.training:
        ce, _ = distill_terms(model, batch, None, DistillConfig(alpha=0.0))
        kl = ce.new_zeros(())
        alpha = 0.0
    else:
        ce, kl = distill_terms(model, batch, teacher, cfg)
        alpha = cfg.alpha
    n = batch.get("loss_tokens", max(1, int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())))
    return (alpha * cfg.temperature ** 2 * kl + (1 - alpha) * ce) / n


def distill_objective(teacher, cfg: DistillConfig):
    """The `objective(model, batch)` for the shared loop with the teacher bound in (frozen, eval mode)."""
    if teacher is not None:
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    return functools.partial(distill_loss, teacher=teacher, cfg=cfg)

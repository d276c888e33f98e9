"""Learning-rate schedules: linear warmup, then cosine or linear decay to a floor."""

from __future__ import annotations

import math
from typing import Literal


def lr_at(step: int, base_lr: float, warmup_steps: int, total_steps: int,
          decay: Literal["cosine", "linear", "constant"] = "cosine", min_lr_ratio: float = 0.1) -> float:
    """The learning rate for optimizer step `step` (0-based): a pure function, so resume is exact."""
    if warmup_steps and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if decay == "constant":
        return base_lr
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if decay == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif decay == "linear":
        factor = 1.0 - progress
    else:
        raise ValueError(f"decay={decay!r} must be 'cosine', 'linear' or 'constant'")
    return base_lr * (min_lr_ratio + (1.0 - min_lr_ratio) * factor)

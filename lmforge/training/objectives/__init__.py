"""Objectives: `objective(model, batch) -> loss`, one signature for the shared training loop.

One module per objective (sft, pretrain; dpo, reward, ppo, distill, ewc beside them); the forward
pass (`forward.hidden_states`) and the chunked cross-entropy (`cross_entropy`) are shared.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from lmforge.training.mlm import mlm_loss
from lmforge.training.objectives.cross_entropy import LOGIT_CHUNK, count_loss_tokens, token_losses
from lmforge.training.objectives.forward import hidden_states
from lmforge.training.objectives.sft import pretrain_loss, router_loss, sft_loss

Objective = Callable[[nn.Module, dict], torch.Tensor]

OBJECTIVES: dict[str, Objective] = {"sft": sft_loss, "pretrain": pretrain_loss, "mlm": mlm_loss}

__all__ = ["LOGIT_CHUNK", "OBJECTIVES", "Objective", "count_loss_tokens", "hidden_states", "mlm_loss",
           "pretrain_loss", "router_loss", "sft_loss", "token_losses"]

"""Full fine-tuning: every weight trained, kept in fp32 as the master copy (the trainer's bf16 autocast,
where it picks one, only does the compute), then written as a Hugging Face directory.

A tied lm_head (SmolLM2: lm_head.weight is model.embed_tokens.weight) is one Parameter: named_parameters
lists it once, so the trainer's checkpoint stores it once and resume copies into the shared tensor; the
export writes it once too (save_hf drops lm_head.weight when tie_embeddings).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def apply_full(model: nn.Module) -> nn.Module:
    """Make every parameter trainable (in place); the weights must be float32 master weights."""
    low = sorted({str(p.dtype) for p in model.parameters() if p.dtype != torch.float32})
    if low:
        raise ValueError(f"full fine-tuning keeps fp32 master weights, but the model holds {low}; load it with "
                         "dtype=torch.float32 (a quantized GGUF is dequantized by load(..., dtype=torch.float32))")
    for p in model.parameters():
        p.requires_grad_(True)
    model.full_finetune = True
    return model


def tied(model: nn.Module) -> bool:
    """Whether the output head still shares the token embedding's tensor (tie_embeddings models)."""
    head, table = getattr(model, "lm_head", None), getattr(getattr(model, "model", None), "embed_tokens", None)
    return head is not None and table is not None and head.weight is table.weight


def save_full(model: nn.Module, tokenizer, path: str | Path) -> Path:
    """The whole trained model as a Hugging Face directory (weights, config, tokenizer, generation config)."""
    from lmforge.checkpoint.hf import save_pretrained

    if getattr(model.config, "tie_embeddings", False) and not tied(model):
        raise ValueError("lm_head.weight is no longer model.embed_tokens.weight although the config ties them; "
                         "the export would drop the trained head")
    return save_pretrained(model, tokenizer, path)

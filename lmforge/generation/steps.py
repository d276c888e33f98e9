"""The model calls every decoding loop shares (sampling, beam search, speculative decoding): pad a
batch of prompts, prefill the cache, feed one token per row."""

from __future__ import annotations

from typing import Sequence

import torch

from lmforge.generation.fused_decode import decode_step
from lmforge.generation.kv_cache import KVCache, model_prefix
from lmforge.model.masks import positions_from_padding


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, valid), each (B, T): prompts right-aligned so every row's last token is at -1."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    valid = torch.zeros((len(prompts), width), dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        valid[row, width - len(prompt):] = True
    return ids, valid


def prefill(model, ids: torch.Tensor, valid: torch.Tensor, cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the prompts; return last-position logits (B, V) and each row's next position (B, 1).

    A model with a prefix-tuning prefix gets it in the cache's first slots; the prompt's positions count on
    from the slots already filled, as transformers counts them after a prefix cache."""
    prefix = model_prefix(model) if cache.length == 0 else None
    if prefix is not None:
        cache.start_with(prefix)
    start = cache.length
    padded = not bool(valid.all())
    positions = positions_from_padding(valid) + start if padded else None
    logits = model(ids, cache=cache, positions=positions, valid=valid if padded else None, last_only=True)
    next_pos = (positions[:, -1:] + 1) if padded else torch.full((ids.shape[0], 1), start + ids.shape[1],
                                                                    device=ids.device)
    return logits[:, -1], next_pos


def decode_one_token(model, tokens: torch.Tensor, pos: torch.Tensor, cache: KVCache, aligned: bool = False
                     ) -> torch.Tensor:
    """Feed one token per row (B,) at positions pos (B, 1); return next logits (B, V). `aligned`: no row
    is padded, so every position equals its cache slot and the fused step may skip model.forward."""
    logits = decode_step(model, tokens, cache) if aligned else None
    return logits if logits is not None else model(tokens[:, None], cache=cache, positions=pos)[:, -1]

"""Decoding state for Mamba and hybrid models, and `make_cache`, which picks the cache a model needs.

A transformer decodes over a KVCache that grows by one slot per token. A Mamba layer keeps a
constant-size SSMState instead (model/ssm.py). `RecurrentCache` holds one entry per layer: the
SSMState of a Mamba layer, or None for an attention layer, whose keys and values live in `kv`, a
KVCache with buffers for the attention layers only (none for a pure Mamba model, which then keeps
nothing per token). It answers the same `length` / `reserve` / `reorder` calls as KVCache, so
generation's prefill, decode and beam search drive either one.
"""

from __future__ import annotations

import torch

from lmforge.config import Config
from lmforge.generation.kv_cache import KVCache
from lmforge.model.ssm import SSMState


class RecurrentCache:
    """Per layer: an SSMState (Mamba) or None (attention, whose keys and values are in `kv`)."""

    def __init__(self, config: Config, batch_size: int, max_len: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        if config.arch != "mamba":
            raise ValueError(f"RecurrentCache is for arch='mamba' models; {config.name} is a {config.arch}: "
                             "use KVCache")
        self.ssm: list[SSMState | None] = [SSMState.zeros(config, batch_size, dtype, device) if kind == "mamba"
                                           else None for kind in config.mixers]
        attention = [i for i, kind in enumerate(config.mixers) if kind == "attention"]
        self.kv = KVCache(config, batch_size, max_len, dtype, device, layers=attention) if attention else None
        self.length = 0  # tokens fed so far
        self.max_len = max_len
        self.batch_size = batch_size

    def reserve(self, positions: torch.Tensor, valid: torch.Tensor) -> int:
        """Count T more tokens (B, T); attention layers get their next KV slots. Returns the first slot."""
        start, T = self.length, positions.shape[1]
        if start + T > self.max_len:
            raise ValueError(f"the cache was built for {self.max_len} tokens and {start + T} were fed; "
                             "build it with a larger max_len")
        if self.kv is not None:
            self.kv.reserve(positions, valid)
        self.length = start + T
        return start

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows `index` (beam search picks which beams survive)."""
        for state in self.ssm:
            if state is not None:
                state.reorder(index)
        if self.kv is not None:
            self.kv.reorder(index)
        self.batch_size = index.numel()

    def truncate(self, length: int) -> None:
        """A recurrent state cannot forget tokens (speculative decoding's rollback needs that)."""
        raise ValueError("a Mamba state cannot be rolled back to an earlier token; speculative decoding "
                         "does not run Mamba or hybrid models")

    def nbytes(self) -> int:
        """Bytes held: the SSM states, plus the KV buffers (and slot tables) of attention layers."""
        total = sum(s.nbytes for s in self.ssm if s is not None)
        if self.kv is not None:
            tensors = [t for t in self.kv.k + self.kv.v if t is not None] + [self.kv.positions, self.kv.valid]
            total += sum(t.numel() * t.element_size() for t in tensors)
        return total


def make_cache(config: Config, batch_size: int, max_len: int, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> KVCache | RecurrentCache:
    """The decoding cache for a model: a KVCache for a transformer, a RecurrentCache for Mamba and hybrids."""
    if config.arch == "mamba":
        return RecurrentCache(config, batch_size, max_len, dtype, device)
    return KVCache(config, batch_size, max_len, dtype=dtype, device=device)

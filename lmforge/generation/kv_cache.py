"""A static key/value cache: preallocated per-layer buffers written slot by slot.

Slot t holds the keys and values of the t-th token fed to the model for every row of the
batch. Rows may be left-padded, so each slot also records its RoPE position and whether
it is a real token; masks are built from those, never from slot indices.

A layer whose kind is a pure sliding-window sparse pattern keeps a ring of the last slots its window
can still see (plus SPARE_SLOTS to roll back rejected draft tokens) instead of one slot per token:
slot s lives at s % ring. Only sparse models get rings; the fused C++ decode, which reads slot =
position, is off for them (fused_decode.supported_architecture).
"""

from __future__ import annotations

from typing import Sequence

import torch

from lmforge.config import Config
from lmforge.model.masks import window_reach

SPARE_SLOTS = 64  # ring slots past a window's reach: rolling back up to 64 tokens (drafts are <= 16) is safe


def ring_size(config: Config, layer: int, max_len: int) -> int | None:
    """Slots a window layer's ring keeps (its reach - 1 older keys + SPARE_SLOTS); None: one slot per token."""
    reach = window_reach(config.sparse_patterns.get(config.layer_types[layer]))
    if reach is None or reach - 1 + SPARE_SLOTS >= max_len:
        return None
    return reach - 1 + SPARE_SLOTS


class KVCache:
    """Keys/values (B, n_kv_head, max_len, head_dim) per layer, plus slot positions and validity."""

    def __init__(self, config: Config, batch_size: int, max_len: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", layers: Sequence[int] | None = None) -> None:
        self.rings = [ring_size(config, i, max_len) for i in range(config.n_layer)]  # None: a slot per token
        shapes = [(batch_size, config.n_kv_head, ring or max_len, config.head_dim) for ring in self.rings]
        kept = set(range(config.n_layer) if layers is None else layers)  # a hybrid's attention layers only
        self.k = [torch.empty(s, dtype=dtype, device=device) if i in kept else None for i, s in enumerate(shapes)]
        self.v = [torch.empty(s, dtype=dtype, device=device) if i in kept else None for i, s in enumerate(shapes)]
        self.positions = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.length = 0  # slots filled so far
        self.high = 0  # slots ever filled (truncate lowers length, not this): a ring holds [high - ring, high)
        self.max_len = max_len
        self.batch_size = batch_size

    def reserve(self, positions: torch.Tensor, valid: torch.Tensor) -> int:
        """Claim the next T slots for tokens at `positions` (B, T); return the first slot."""
        start, T = self.length, positions.shape[1]
        self._check_room(start + T)
        self.positions[:, start:start + T] = positions
        self.valid[:, start:start + T] = valid
        self.length = start + T
        self.high = max(self.high, self.length)
        return start

    def reserve_aligned(self) -> int:
        """Claim the next slot for one real token per row whose position is the slot (no padding)."""
        slot = self.length
        self._check_room(slot + 1)
        self.positions[:, slot], self.valid[:, slot] = slot, True
        self.length = slot + 1
        self.high = max(self.high, self.length)
        return slot

    def start_with(self, prefix: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Fill the first P slots of every row with fixed keys/values, per layer (n_kv, P, hd) each (prefix
        tuning's virtual tokens, positions 0..P-1, used as they are); the prompt goes after them."""
        P = prefix[0][0].shape[1]
        if self.length or any(self.rings):
            raise ValueError("a prefix goes into an empty cache without window rings")
        self._check_room(P)
        for i, (k, v) in enumerate(prefix):
            if self.k[i] is not None:
                self.k[i][:, :, :P] = k
                self.v[i][:, :, :P] = v
        self.positions[:, :P] = torch.arange(P, device=self.positions.device)
        self.valid[:, :P] = True
        self.length = self.high = P

    def truncate(self, length: int) -> None:
        """Forget slots [length, self.length): speculative decoding rolls back rejected draft tokens.

        The freed slots become padding (invalid, position 0) so no mask can see them; their keys and
        values stay in the buffers and are overwritten when the slots are claimed again.
        """
        if not 0 <= length <= self.length:
            raise ValueError(f"truncate to {length} slots: must be in [0, {self.length}] (the filled slots)")
        if not self.can_truncate(length):
            raise ValueError(f"truncate to {length} slots after {self.high} were filled: window layers keep rings that "
                             f"roll back at most {SPARE_SLOTS} slots; start a new cache and feed the {length} tokens again")
        self.positions[:, length:self.length] = 0
        self.valid[:, length:self.length] = False
        self.length = length

    def can_truncate(self, length: int) -> bool:
        """Whether truncate(length) keeps every key the model can still see: a ring still holds the slots a
        window sees from `length` on while at most SPARE_SLOTS were filled past it."""
        return self.high - length <= SPARE_SLOTS or not any(self.rings)

    def _check_room(self, fed: int) -> None:
        if fed > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens and {fed} were fed; "
                             "allocate a larger cache (max_len) or shorten the prompt / max_new_tokens")

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int, key_lo: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, n_kv, T, hd) at slots [start, start+T); return slots [key_lo, start+T)."""
        if self.rings[layer] is not None:
            return self._update_ring(layer, k, v, start, key_lo)
        end = start + k.shape[2]
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, key_lo:end], self.v[layer][:, :, key_lo:end]

    def _update_ring(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int, key_lo: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """update() for a window layer's ring: the older slots [key_lo, start) read from the ring, the new
        ones as given; then the newest slots that fit overwrite the oldest."""
        size, T = self.rings[layer], k.shape[2]
        assert start - key_lo <= size, "a window layer asked for keys its ring no longer holds"
        old = torch.arange(key_lo, start, device=k.device) % size
        keys = torch.cat([self.k[layer].index_select(2, old), k], dim=2)  # (B, n_kv, start + T - key_lo, hd)
        values = torch.cat([self.v[layer].index_select(2, old), v], dim=2)
        new = torch.arange(max(0, T - size), T, device=k.device)
        self.k[layer].index_copy_(2, (start + new) % size, k.index_select(2, new))
        self.v[layer].index_copy_(2, (start + new) % size, v.index_select(2, new))
        return keys, values

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows `index` (beam search picks which beams survive)."""
        for buffers in (self.k, self.v):
            for i, buf in enumerate(buffers):
                buffers[i] = None if buf is None else buf.index_select(0, index)
        self.positions = self.positions.index_select(0, index)
        self.valid = self.valid.index_select(0, index)
        self.batch_size = index.numel()


def model_prefix(model) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Per layer the keys/values (n_kv, P, hd) every sequence of `model` starts from: a prefix-tuning
    `prefix_encoder` (training/prefix.py); None for a model without one."""
    encoder = getattr(model, "prefix_encoder", None)
    return None if encoder is None else encoder.key_values()


def prefix_length(model) -> int:
    """Cache slots the model's prefix takes before the prompt (0 without one)."""
    encoder = getattr(model, "prefix_encoder", None)
    return 0 if encoder is None else encoder.num_virtual_tokens

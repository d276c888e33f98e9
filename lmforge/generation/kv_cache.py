"""A static key/value cache: preallocated per-layer buffers written slot by slot.

Slot t holds the keys and values of the t-th token fed to the model for every row of the
batch. Rows may be left-padded, so each slot also records its RoPE position and whether
it is a real token; masks are built from those, never from slot indices.
"""

from __future__ import annotations

import torch

from lmforge.config import Config


class KVCache:
    """Keys/values (B, n_kv_head, max_len, head_dim) per layer, plus slot positions and validity."""

    def __init__(self, config: Config, batch_size: int, max_len: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        shape = (batch_size, config.n_kv_head, max_len, config.head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
        self.positions = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.length = 0  # slots filled so far
        self.max_len = max_len
        self.batch_size = batch_size

    def reserve(self, positions: torch.Tensor, valid: torch.Tensor) -> int:
        """Claim the next T slots for tokens at `positions` (B, T); return the first slot."""
        start, T = self.length, positions.shape[1]
        self._check_room(start + T)
        self.positions[:, start:start + T] = positions
        self.valid[:, start:start + T] = valid
        self.length = start + T
        return start

    def reserve_aligned(self) -> int:
        """Claim the next slot for one real token per row whose position is the slot (no padding)."""
        slot = self.length
        self._check_room(slot + 1)
        self.positions[:, slot], self.valid[:, slot] = slot, True
        self.length = slot + 1
        return slot

    def truncate(self, length: int) -> None:
        """Forget slots [length, self.length): speculative decoding rolls back rejected draft tokens.

        The freed slots become padding (invalid, position 0) so no mask can see them; their keys and
        values stay in the buffers and are overwritten when the slots are claimed again.
        """
        if not 0 <= length <= self.length:
            raise ValueError(f"truncate to {length} slots: must be in [0, {self.length}] (the filled slots)")
        self.positions[:, length:self.length] = 0
        self.valid[:, length:self.length] = False
        self.length = length

    def _check_room(self, fed: int) -> None:
        if fed > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens and {fed} were fed; "
                             "allocate a larger cache (max_len) or shorten the prompt / max_new_tokens")

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int, key_lo: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, n_kv, T, hd) at slots [start, start+T); return slots [key_lo, start+T)."""
        end = start + k.shape[2]
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, key_lo:end], self.v[layer][:, :, key_lo:end]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows `index` (beam search picks which beams survive)."""
        for buffers in (self.k, self.v):
            for i, buf in enumerate(buffers):
                buffers[i] = buf.index_select(0, index)
        self.positions = self.positions.index_select(0, index)
        self.valid = self.valid.index_select(0, index)
        self.batch_size = index.numel()

"""One batched forward over the paged KV cache.

All scheduled tokens of all sequences are packed into one row (1, N), so every matrix
multiply is shared. Attention then splits by sequence: decode queries are batched over
their gathered, padded key blocks; each prefill chunk attends over its own blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lmforge.model.masks import attention_mask
from lmforge.serving.scheduler import Batch
from lmforge.serving.sequence import Sequence


class PagedKVCache:
    """Per-layer key/value slots (num_blocks * block_size, n_kv_head, head_dim)."""

    def __init__(self, config, num_blocks: int, block_size: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        shape = (num_blocks * block_size, config.n_kv_head, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
        self.block_size = block_size

    @staticmethod
    def bytes_per_block(config, block_size: int, dtype: torch.dtype = torch.float32) -> int:
        return 2 * config.n_layer * block_size * config.n_kv_head * config.head_dim * dtype.itemsize

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy whole blocks src -> dst in every layer (copy-on-write)."""
        bs = self.block_size
        for src, dst in copies:
            for buffers in (self.k, self.v):
                for buf in buffers:
                    buf[dst * bs:(dst + 1) * bs] = buf[src * bs:(src + 1) * bs]


@dataclass
class KindPlan:
    """Gather indices and masks for one layer kind (global or sliding) in one step."""

    decode_rows: torch.Tensor  # (Bd,) packed positions of decode queries
    decode_slots: torch.Tensor  # (Bd, L) cache slots of their keys, padded with slot 0
    decode_mask: torch.Tensor | None  # (Bd, 1, 1, L) False at padding, or None when none padded
    prefills: list[tuple[int, int, torch.Tensor, torch.Tensor | None, bool]] = field(default_factory=list)


class PagedAttention:
    """The engine's attention context: write new keys/values to slots, attend per sequence."""

    def __init__(self, cache: PagedKVCache, slot_mapping: torch.Tensor, plan: KindPlan, rope) -> None:
        self.cache, self.slot_mapping, self.plan, self.rope = cache, slot_mapping, plan, rope

    def attend(self, module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (1, n_head, N, hd), k/v (1, n_kv, N, hd) -> (1, n_head, N, hd)."""
        kc, vc = self.cache.k[module.layer_idx], self.cache.v[module.layer_idx]
        kc[self.slot_mapping] = k[0].transpose(0, 1)  # (N, n_kv, hd)
        vc[self.slot_mapping] = v[0].transpose(0, 1)
        out = torch.empty_like(q)
        plan = self.plan
        if plan.decode_rows.numel():
            qd = q[0, :, plan.decode_rows].transpose(0, 1).unsqueeze(2)  # (Bd, n_head, 1, hd)
            kd = kc[plan.decode_slots].transpose(1, 2)  # (Bd, L, n_kv, hd) -> (Bd, n_kv, L, hd)
            vd = vc[plan.decode_slots].transpose(1, 2)
            yd = module.scores(qd, kd, vd, plan.decode_mask, False)  # (Bd, n_head, 1, hd)
            out[0, :, plan.decode_rows] = yd.squeeze(2).transpose(0, 1)
        for start, end, slots, mask, causal in plan.prefills:
            kp = kc[slots].transpose(0, 1).unsqueeze(0)  # (1, n_kv, S, hd)
            vp = vc[slots].transpose(0, 1).unsqueeze(0)
            out[:, :, start:end] = module.scores(q[:, :, start:end], kp, vp, mask, causal)
        return out


class ModelRunner:
    """Turns a scheduled Batch into logits for the sequences that sample this step."""

    def __init__(self, model, cache: PagedKVCache) -> None:
        self.model, self.cache, self.bs = model, cache, cache.block_size
        self.device = next(model.parameters()).device

    def _slots(self, seq: Sequence, start: int, end: int) -> list[int]:
        bs, table = self.bs, seq.block_table
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def _plan(self, batch: Batch, window: int | None) -> KindPlan:
        decode_rows, decode_keys, prefills, offset = [], [], [], 0
        for seq, n in zip(batch.seqs, batch.num_tokens):
            start, end = seq.num_computed, seq.num_computed + n
            lo = max(0, end - window - n + 1) if window else 0  # keys a sliding window can still see
            keys = torch.tensor(self._slots(seq, lo, end))
            if n == 1:
                decode_rows.append(offset)
                decode_keys.append(keys)
            else:
                q_pos, k_pos = torch.arange(start, end)[None], torch.arange(lo, end)[None]
                fresh = start == 0 and (window is None or end <= window)
                mask = None if fresh else attention_mask(q_pos, k_pos, None, window)
                prefills.append((offset, offset + n, keys, mask, fresh))
            offset += n
        length = max((len(k) for k in decode_keys), default=0)
        slots = torch.zeros(len(decode_keys), length, dtype=torch.long)
        valid = torch.zeros(len(decode_keys), length, dtype=torch.bool)
        for row, keys in enumerate(decode_keys):
            slots[row, :len(keys)], valid[row, :len(keys)] = keys, True
        mask = None if bool(valid.all()) else valid[:, None, None, :]
        dev = self.device
        prefills = [(a, b, keys.to(dev), None if m is None else m.to(dev), c) for a, b, keys, m, c in prefills]
        return KindPlan(torch.tensor(decode_rows, dtype=torch.long, device=dev), slots.to(dev),
                        None if mask is None else mask.to(dev), prefills)

    @torch.inference_mode()
    def run(self, batch: Batch) -> tuple[torch.Tensor, list[Sequence]]:
        """Run the step; return logits (S, vocab) for the S sequences whose step ends their known tokens."""
        ids, positions, slots, sample_at, sampling = [], [], [], [], []
        for seq, n in zip(batch.seqs, batch.num_tokens):
            start, end = seq.num_computed, seq.num_computed + n
            ids.extend(seq.all_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(self._slots(seq, start, end))
            if end == seq.num_tokens:
                sample_at.append(len(ids) - 1)
                sampling.append(seq)
        input_ids = torch.tensor([ids], device=self.device)
        pos = torch.tensor([positions], device=self.device)
        slot_mapping = torch.tensor(slots, dtype=torch.long, device=self.device)
        contexts = {}
        for kind in set(self.model.config.layer_types):
            plan = self._plan(batch, self.model.window(kind))
            contexts[kind] = PagedAttention(self.cache, slot_mapping, plan, self.model.rope_at(kind, pos))
        logits = self.model(input_ids, positions=pos, contexts=contexts,
                            output_index=torch.tensor(sample_at, dtype=torch.long, device=self.device))
        return logits[0].float().cpu(), sampling  # sampling runs on the CPU, per request

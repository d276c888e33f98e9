"""One batched forward over the paged KV cache.

All scheduled tokens of all sequences are packed into one row (1, N), so every matrix
multiply is shared. Attention then splits by sequence: decode queries are batched over
their gathered, padded key slots; each prefill chunk attends over its own slots.

Every index the layers need (new-token slots, each decode's key slots, prefill masks) is
built once per step with a few tensor ops over a padded block table, and reused by all
layers of a kind; a step of decodes only reads its queries and writes its output as views.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lmforge.generation.fused_decode import paged_step
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
class Prefill:
    """One prefill chunk: packed rows [start, end) attend over cache `slots` with `mask` (or causal)."""

    start: int
    end: int
    slots: torch.Tensor  # (S,) cache slots of its keys
    mask: torch.Tensor | None  # (1, 1, T, S) bool, or None when plain causal suffices
    causal: bool


@dataclass
class KindPlan:
    """Gather indices and masks for one layer kind (global or sliding) in one step."""

    decode_rows: slice | torch.Tensor  # packed positions of the Bd decode queries (a slice when adjacent)
    num_decode: int  # Bd
    decode_len: int  # L: keys per decode query, padded to the longest
    decode_slots: torch.Tensor  # (Bd * L,) cache slots of their keys, row by row, padded with slot 0
    decode_lens: torch.Tensor  # (Bd,) how many of each row's L slots are keys, on the CPU (for decode.cpp)
    decode_mask: torch.Tensor | None  # (Bd, 1, 1, L) False at padding, or None when none padded
    decode_only: bool  # every packed token is a decode query (the output is a view of theirs)
    prefills: list[Prefill] = field(default_factory=list)


class PagedAttention:
    """The engine's attention context: write new keys/values to slots, attend per sequence."""

    def __init__(self, cache: PagedKVCache, slot_mapping: torch.Tensor, plan: KindPlan, rope) -> None:
        self.cache, self.slot_mapping, self.plan, self.rope = cache, slot_mapping, plan, rope

    def attend(self, module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (1, n_head, N, hd), k/v (1, n_kv, N, hd) -> (1, n_head, N, hd)."""
        kc, vc = self.cache.k[module.layer_idx], self.cache.v[module.layer_idx]
        kc.index_copy_(0, self.slot_mapping, k[0].transpose(0, 1))  # (N, n_kv, hd)
        vc.index_copy_(0, self.slot_mapping, v[0].transpose(0, 1))
        plan = self.plan
        if plan.decode_only:
            return self._decode(module, q, kc, vc).squeeze(2).transpose(0, 1).unsqueeze(0)
        out = torch.empty_like(q)
        if plan.num_decode:
            out[0, :, plan.decode_rows] = self._decode(module, q, kc, vc).squeeze(2).transpose(0, 1)
        for p in plan.prefills:
            kp = kc.index_select(0, p.slots).transpose(0, 1).unsqueeze(0)  # (1, n_kv, S, hd)
            vp = vc.index_select(0, p.slots).transpose(0, 1).unsqueeze(0)
            out[:, :, p.start:p.end] = module.scores(q[:, :, p.start:p.end], kp, vp, p.mask, p.causal)
        return out

    def _decode(self, module, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor) -> torch.Tensor:
        """All decode queries at once over their gathered keys: (Bd, n_head, 1, hd)."""
        plan = self.plan
        shape = (plan.num_decode, plan.decode_len) + kc.shape[1:]
        qd = q[0, :, plan.decode_rows].transpose(0, 1).unsqueeze(2)  # (Bd, n_head, 1, hd)
        kd = kc.index_select(0, plan.decode_slots).view(shape).transpose(1, 2)  # (Bd, n_kv, L, hd)
        vd = vc.index_select(0, plan.decode_slots).view(shape).transpose(1, 2)
        return module.scores(qd, kd, vd, plan.decode_mask, False)


def _tokens(seq: Sequence, start: int, end: int) -> list[int]:
    """(seq.all_ids + seq.draft_ids)[start:end] without concatenating prompt and output."""
    if end > seq.num_tokens:  # a decode that verifies draft tokens
        return _tokens(seq, start, seq.num_tokens) + seq.draft_ids[:end - seq.num_tokens]
    p = len(seq.prompt_ids)
    if end <= p:
        return seq.prompt_ids[start:end]
    if start >= p:
        return seq.output_ids[start - p:end - p]
    return seq.prompt_ids[start:] + seq.output_ids[:end - p]


@dataclass
class StepLayout:
    """Where each scheduled sequence sits in this step, on the CPU: the input of every plan."""

    tables: torch.Tensor  # (B, W) block tables padded with block 0
    starts: list[int]  # first position each sequence computes
    counts: list[int]  # tokens it computes
    offsets: list[int]  # its first packed row
    decodes: list[int]  # batch indices of the one-token (decode) sequences


class ModelRunner:
    """Turns a scheduled Batch into logits for the sequences that sample this step."""

    def __init__(self, model, cache: PagedKVCache) -> None:
        if model.config.arch != "transformer":
            raise ValueError(f"the serving engine pages a KV cache; {model.config.name} is arch={model.config.arch!r}, "
                             "whose Mamba layers keep a recurrent state instead: run it with `lmforge generate` or "
                             "`lmforge chat` (lmforge.generation)")
        if model.config.sparse_patterns:
            raise ValueError("the serving engine's paged attention knows only full and sliding-window layers, not "
                             f"sparse_patterns {sorted(model.config.sparse_patterns)}; run sparse models with "
                             "`lmforge generate` or `lmforge chat` (static cache)")
        self.model, self.cache, self.bs = model, cache, cache.block_size
        self.alibi = model.config.position == "alibi"  # masks become per-head additive biases
        self.device = next(model.parameters()).device
        self.adapters = None  # multi-LoRA serving: an AdapterRegistry (serving/multi_lora.py), set by the engine

    def _slots(self, tables: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Cache slots of `positions` (R, P) in the block tables (R, W) of their rows."""
        return tables.gather(1, positions // self.bs) * self.bs + positions % self.bs

    def _layout(self, batch: Batch) -> StepLayout:
        width = max(len(seq.block_table) for seq in batch.seqs)
        tables = torch.tensor([seq.block_table + [0] * (width - len(seq.block_table)) for seq in batch.seqs],
                              dtype=torch.long)
        starts = [seq.num_computed for seq in batch.seqs]
        offsets, total = [], 0
        for n in batch.num_tokens:
            offsets.append(total)
            total += n
        decodes = [i for i, n in enumerate(batch.num_tokens) if n == 1]
        return StepLayout(tables, starts, list(batch.num_tokens), offsets, decodes)

    def _decode_plan(self, layout: StepLayout, window: int | None
                     ) -> tuple[torch.Tensor, int, torch.Tensor, torch.Tensor | None]:
        """Slots (Bd * L,), key counts and mask of every decode query's keys; a sliding window trims the oldest."""
        d = layout.decodes
        ends = torch.tensor([layout.starts[i] + 1 for i in d], dtype=torch.long)
        lo = (ends - window).clamp(min=0) if window else torch.zeros_like(ends)  # keys the window still sees
        lens = ends - lo
        length = int(lens.max())
        valid = torch.arange(length)[None] < lens[:, None]  # (Bd, L)
        positions = (lo[:, None] + torch.arange(length)[None]).masked_fill(~valid, 0)
        slots = self._slots(layout.tables[d], positions).masked_fill(~valid, 0)
        mask = None if bool(valid.all()) else valid[:, None, None, :]
        if self.alibi:  # (Bd, n_head, 1, L)
            mask = self.model.alibi(ends[:, None] - 1, positions, valid[:, None, None, :]).to(self.device)
        return slots.view(-1), length, lens, mask

    def _prefill_plan(self, layout: StepLayout, i: int, window: int | None) -> Prefill:
        """Key slots and mask of prefill chunk `i` (its queries see the cache up to themselves)."""
        start, n = layout.starts[i], layout.counts[i]
        end = start + n
        lo = max(0, end - window - n + 1) if window else 0  # keys a sliding window can still see
        k_pos = torch.arange(lo, end)
        slots = self._slots(layout.tables[i:i + 1], k_pos[None])[0]
        fresh = start == 0 and (window is None or end <= window) and not self.alibi
        q_pos = torch.arange(start, end)[None]
        mask = None if fresh else attention_mask(q_pos, k_pos[None], None, window)
        if self.alibi:  # (1, n_head, n, S)
            mask = self.model.alibi(q_pos, k_pos[None], mask)
        dev = self.device
        return Prefill(layout.offsets[i], layout.offsets[i] + n, slots.to(dev),
                       None if mask is None else mask.to(dev), fresh)

    def _plan(self, layout: StepLayout, window: int | None) -> KindPlan:
        d, dev = layout.decodes, self.device
        if d:
            slots, length, lens, mask = self._decode_plan(layout, window)
        else:
            slots = lens = torch.zeros(0, dtype=torch.long)
            length, mask = 0, None
        adjacent = not d or d[-1] - d[0] + 1 == len(d)  # decode rows form one packed range
        rows = slice(layout.offsets[d[0]], layout.offsets[d[0]] + len(d)) if d and adjacent else \
            torch.tensor([layout.offsets[i] for i in d], dtype=torch.long, device=dev)
        prefills = [self._prefill_plan(layout, i, window) for i, n in enumerate(layout.counts) if n > 1]
        return KindPlan(rows, len(d), length, slots.to(dev), lens, None if mask is None else mask.to(dev),
                        len(d) == len(layout.counts), prefills)

    def _new_slots(self, layout: StepLayout) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions (N,) of the packed tokens and the cache slots (N,) their keys/values go to."""
        counts = torch.tensor(layout.counts, dtype=torch.long)
        rows = torch.repeat_interleave(torch.arange(len(layout.counts)), counts)
        shift = torch.tensor(layout.starts, dtype=torch.long) - torch.tensor(layout.offsets, dtype=torch.long)
        positions = torch.arange(int(counts.sum())) + shift[rows]
        slots = layout.tables[rows, positions // self.bs] * self.bs + positions % self.bs
        return positions, slots

    @torch.inference_mode()
    def run(self, batch: Batch) -> tuple[torch.Tensor, list[Sequence]]:
        """Run the step; return logits for the sequences whose step ends their known tokens, in order: one
        row each, or 1 + k rows for a sequence verifying k draft tokens (its last token's, then each draft's)."""
        ids, sample_at, sampling = [], [], []
        for seq, n in zip(batch.seqs, batch.num_tokens):
            start = seq.num_computed
            ids.extend(_tokens(seq, start, start + n))
            if start + n == seq.num_tokens + len(seq.draft_ids):
                sample_at.extend(range(len(ids) - 1 - len(seq.draft_ids), len(ids)))
                sampling.append(seq)
        layout = self._layout(batch)
        positions, slots = self._new_slots(layout)
        dev = self.device
        input_ids = torch.tensor([ids], device=dev)
        pos = positions[None].to(dev)
        slot_mapping = slots.to(dev)
        kinds = set(self.model.config.layer_types)
        if self.adapters is not None:  # which packed rows take which adapter's update this step
            self.adapters.set_rows([seq.adapter for seq in batch.seqs], list(batch.num_tokens), dev)
        lora = self.adapters is not None and self.adapters.mask is not None
        if not lora and all(n == 1 or seq.draft_ids for seq, n in zip(batch.seqs, batch.num_tokens)):
            # decodes and draft verifications only: every token is a row of the fused C++ step, with its own keys
            keys = {kind: self._token_keys(layout, positions, self.model.window(kind)) for kind in kinds}
            logits = paged_step(self.model, input_ids[0], pos[0], self.cache, slot_mapping,
                                {kind: slots for kind, (slots, _) in keys.items()},
                                {kind: lens for kind, (_, lens) in keys.items()})
            if logits is not None:  # a one-token prefill chunk that does not end its prompt samples nothing
                return logits[sample_at].float().cpu(), sampling
        contexts = {kind: PagedAttention(self.cache, slot_mapping, self._plan(layout, self.model.window(kind)),
                                         self.model.rope_at(kind, pos)) for kind in kinds}
        logits = self.model(input_ids, positions=pos, contexts=contexts,
                            output_index=torch.tensor(sample_at, dtype=torch.long, device=dev))
        return logits[0].float().cpu(), sampling  # sampling runs on the CPU

    def _token_keys(self, layout: StepLayout, positions: torch.Tensor, window: int | None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, L) cache slots of every packed token's keys (its sequence's positions up to its own, a window
        trimming the oldest; padded with slot 0) and (N,) their counts: causal within a verified chunk."""
        rows = torch.repeat_interleave(torch.arange(len(layout.counts)), torch.tensor(layout.counts))
        ends = positions + 1
        lo = (ends - window).clamp(min=0) if window else torch.zeros_like(ends)
        lens = ends - lo
        valid = torch.arange(int(lens.max()))[None] < lens[:, None]
        keys = (lo[:, None] + torch.arange(valid.shape[1])[None]).masked_fill(~valid, 0)
        return self._slots(layout.tables[rows], keys).masked_fill(~valid, 0), lens

"""Block-sparse attention: compute only the (query block, key block) tiles a sparse pattern can see.

The queries and keys are cut into blocks of BLOCK tokens. From the positions alone, a plan finds
for each query block the key blocks that hold at least one visible key (`block_layout`, a superset
that is exact for unpadded rows), gathers those blocks' keys and values, and computes scores only
there, with the element mask of the pattern (masks.pattern_mask) inside the partially visible
tiles. Compute and memory follow the pattern: T * (key blocks per query block) * BLOCK scores
instead of T * S. Autograd runs through the gathers (their backward is a scatter-add).
The block-sparse layout is that of Child et al. 2019 and BigBird (Zaheer et al. 2020).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F

from lmforge.model.attention import Attention, AttentionContext
from lmforge.model.masks import RANDOM_BLOCK_SIZE, attention_mask, pattern_mask, random_block_table, window_reach

BLOCK_SPARSE = True  # sparse kinds run the block-sparse kernel; `dense()` swaps in the dense masked path
BLOCK = 64  # tokens per tile: a window of 256 reads 5 key blocks + 1 block of global tokens per query block
CHUNK_SCORES = 1 << 20  # scores per chunk of query blocks (4 MiB in fp32): the working set stays in cache
_EMPTY = 1 << 40  # the low end of a block without a real token: no rule can reach it


@dataclass
class BlockPlan:
    """What every layer of one sparse kind needs in one forward: which key blocks each query block
    reads, and the element mask inside them."""

    index: torch.Tensor  # (nQ, M) long: key blocks read by each query block (padded with blocks it cannot see)
    hidden: torch.Tensor  # (B, nQ, BLOCK, M * BLOCK) bool: True where a query may NOT see a gathered key
    block: int
    q_len: int  # T before padding to whole blocks
    k_len: int  # S before padding
    tiles: int  # (query block, key block) tiles that hold a visible key; dense causal would be ~nQ * nK / 2


def _pad(x: torch.Tensor, length: int, dim: int, value=0) -> torch.Tensor:
    """x padded with `value` along `dim` (counted from the end) to `length`."""
    extra = length - x.shape[dim]
    if extra == 0:
        return x
    pad = [0, 0] * (-dim - 1) + [0, extra]
    return F.pad(x, pad, value=value)


def block_ranges(pos: torch.Tensor, valid: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lowest and highest position (B, n_blocks) of the real tokens in each block (an empty block: lo past
    every position, hi = -1). pos, valid: (B, n_blocks * block)."""
    B = pos.shape[0]
    pos, valid = pos.view(B, -1, block), valid.view(B, -1, block)
    lo = pos.masked_fill(~valid, _EMPTY).amin(-1)
    hi = pos.masked_fill(~valid, -1).amax(-1)
    return lo, hi


def _has_multiple(lo: torch.Tensor, hi: torch.Tensor, step: int) -> torch.Tensor:
    """Whether [lo, hi] (lo >= 0) holds a multiple of `step`."""
    return (lo + step - 1) // step * step <= hi


def _random_reach(pattern: dict, q_lo, q_hi, k_lo, k_hi) -> torch.Tensor:
    """(B, nQ, nK): some query in the query block's range draws a random block inside the key block's range."""
    size = pattern.get("random_block_size", RANDOM_BLOCK_SIZE)
    top = int(torch.stack([q_hi.max(), k_hi.max()]).max()) // size + 1  # position blocks in play
    table = random_block_table(pattern, top, q_lo.device)  # (top, r)
    drawn = torch.zeros(top, top + 1, dtype=torch.int32, device=q_lo.device)
    drawn.scatter_(1, table.masked_fill(table < 0, top), 1)  # row p: blocks drawn by position block p
    drawn = F.pad(drawn[:, :top].cumsum(0), (0, 0, 1, 0))  # prefix over drawing rows
    first, last = (q_lo // size).clamp(max=top - 1), (q_hi // size).clamp(0, top - 1)
    union = (drawn[last + 1] - drawn[first]) > 0  # (B, nQ, top): drawn by a query block's position blocks
    reach = F.pad(union.int().cumsum(-1), (1, 0))  # prefix over key position blocks
    k_first, k_last = (k_lo // size).clamp(max=top - 1), (k_hi // size).clamp(0, top - 1)
    n_q = q_lo.shape[1]
    upto = reach.gather(2, (k_last + 1)[:, None].expand(-1, n_q, -1))  # (B, nQ, nK) drawn blocks <= k_last
    below = reach.gather(2, k_first[:, None].expand(-1, n_q, -1))  # drawn blocks < k_first
    return upto > below


def block_layout(pattern: dict, q_lo, q_hi, k_lo, k_hi) -> torch.Tensor:
    """(B, nQ, nK) bool: tiles that may hold a visible key, from each block's position range.

    A superset of the tiles the element mask leaves non-empty, equal to it when a block's positions are
    consecutive (no padding inside). q_*: (B, nQ), k_*: (B, nK) from block_ranges.
    """
    a, b = q_lo[:, :, None], q_hi[:, :, None]  # query positions of a tile lie in [a, b]
    c, e = k_lo[:, None, :], k_hi[:, None, :]  # key positions in [c, e]
    t_lo, t_hi = (a - e).clamp(min=0), b - c  # i - j over the tile, causal part
    hit = torch.zeros(t_hi.shape, dtype=torch.bool, device=q_lo.device)
    if pattern.get("window"):
        d = pattern.get("dilation", 1)
        hit |= _has_multiple(t_lo, torch.minimum(t_hi, torch.full_like(t_hi, (pattern["window"] - 1) * d)), d)
    if pattern.get("stride"):
        hit |= _has_multiple(t_lo, t_hi, pattern["stride"])
    if pattern.get("block"):
        size = pattern["block"]
        hit |= (a // size <= e // size) & (c // size <= b // size)
    if pattern.get("global_tokens"):
        hit |= (c < pattern["global_tokens"]) | (a < pattern["global_tokens"])
    if pattern.get("random_blocks"):
        hit |= _random_reach(pattern, q_lo, q_hi, k_lo, k_hi)
    return hit & (t_hi >= 0) & (b >= 0) & (e >= 0)


def build_plan(pattern: dict, q_pos: torch.Tensor, k_pos: torch.Tensor, k_valid: torch.Tensor | None = None,
               seq_ids: tuple[torch.Tensor, torch.Tensor] | None = None, block: int = BLOCK) -> BlockPlan:
    """The tiles and element mask of `pattern` for queries at q_pos (B, T) over keys at k_pos (B, S).

    Args:
        k_valid: (B, S) False at padding or unused cache slots; None: all real.
        seq_ids: (query ids (B, T), key ids (B, S)) of packed examples; a query sees only its own example.
    """
    B, T = q_pos.shape
    S = k_pos.shape[1]
    n_q, n_k = -(-T // block), -(-S // block)
    q_real = _pad(torch.ones_like(q_pos, dtype=torch.bool), n_q * block, -1, False)
    qp = _pad(q_pos, n_q * block, -1)
    kp = _pad(k_pos, n_k * block, -1)
    kv = _pad(torch.ones_like(k_pos, dtype=torch.bool) if k_valid is None else k_valid, n_k * block, -1, False)
    layout = block_layout(pattern, *block_ranges(qp, q_real, block), *block_ranges(kp, kv, block)).any(0)
    counts = layout.sum(1)  # (nQ,) key blocks per query block
    width = max(1, int(counts.max()))
    index = torch.argsort((~layout).to(torch.int8), dim=1, stable=True)[:, :width]  # visible blocks first
    used = torch.arange(width, device=q_pos.device)[None] < counts[:, None]  # (nQ, M)

    def gather(x: torch.Tensor) -> torch.Tensor:  # (B, nK * block) -> (B, nQ, M * block)
        return x.view(B, n_k, block)[:, index].reshape(B, n_q, width * block)

    k_ok = gather(kv) & used.repeat_interleave(block, 1)[None]
    mask = pattern_mask(pattern, qp.view(B, n_q, block), gather(kp), k_ok)  # (B, nQ, block, M * block)
    mask &= q_real.view(B, n_q, block, 1)
    if seq_ids is not None:
        q_ids = _pad(seq_ids[0], n_q * block, -1, -1).view(B, n_q, block, 1)
        mask &= q_ids == gather(_pad(seq_ids[1], n_k * block, -1, -2))[:, :, None]
    return BlockPlan(index, ~mask, block, T, S, int(counts.sum()))


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: BlockPlan, scale: float,
                           softcap: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v over the plan's tiles only; equals dense attention with its mask.

    Args:
        q: (B, n_head, T, hd); k, v: (B, n_kv_head, S, hd), n_head a multiple of n_kv_head (GQA).
    Returns (B, n_head, T, hd).
    """
    B, H, T, D = q.shape
    H_kv, bs = k.shape[1], plan.block
    G, n_q, n_k = H // H_kv, plan.index.shape[0], -(-plan.k_len // bs)
    q = _pad(q * scale, n_q * bs, -2).view(B, H_kv, G, n_q, bs, D)
    q = q.transpose(2, 3).reshape(B, H_kv, n_q, G * bs, D)  # a query block's rows of every head in the group
    k = _pad(k, n_k * bs, -2).view(B, H_kv, n_k, bs, D)
    v = _pad(v, n_k * bs, -2).view(B, H_kv, n_k, bs, D)
    out = _BlockSparse.apply(q, k, v, plan.index, plan.hidden, softcap)  # (B, H_kv, nQ, G * bs, hd)
    out = out.view(B, H_kv, n_q, G, bs, D).transpose(2, 3)  # (B, H_kv, G, nQ, bs, D)
    return out.reshape(B, H, n_q * bs, D)[:, :, :T]


def _chunks(q: torch.Tensor, width: int, block: int) -> list[tuple[int, int]]:
    """(start, end) of runs of query blocks whose scores fill about CHUNK_SCORES floats."""
    B, H_kv, n_q, rows, _ = q.shape
    step = max(1, CHUNK_SCORES // (B * H_kv * rows * width * block))
    return [(i, min(i + step, n_q)) for i in range(0, n_q, step)]


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Blocks x (B, H_kv, nK, bs, hd) at index (n, M), as (B, H_kv, n, M * bs, hd)."""
    B, H_kv, _, bs, D = x.shape
    return x.index_select(2, index.reshape(-1)).view(B, H_kv, index.shape[0], index.shape[1] * bs, D)


def _probs(q, k, index, hidden, softcap) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention probabilities (B, H_kv, n, G * bs, M * bs), fp32, of query blocks q (already scaled) over the
    gathered key blocks; also tanh(raw / cap) for the softcap's derivative. hidden: (B, n, bs, M * bs)."""
    B, H_kv, n, rows, _ = q.shape
    scores = (q.contiguous() @ _gather(k, index).transpose(-2, -1)).float()
    capped = None
    if softcap is not None:  # Gemma 2: cap * tanh(scores / cap)
        capped = torch.tanh(scores / softcap)
        scores = softcap * capped
    # the lowest float, not -inf: a padding row with no key gets a finite (unused) softmax, never NaN
    scores.view(B, H_kv, n, rows // hidden.shape[2], hidden.shape[2], -1).masked_fill_(
        hidden[:, None, :, None], torch.finfo(scores.dtype).min)
    return scores.softmax(-1), capped


class _BlockSparse(torch.autograd.Function):
    """Tile attention with a FlashAttention-style backward: forward keeps only q, k, v and the output;
    backward recomputes each chunk's probabilities and scatter-adds the key/value gradients into their
    blocks, so no (T x M * bs) tensor outlives its chunk."""

    @staticmethod
    def forward(ctx, q, k, v, index, hidden, softcap):
        """q (B, H_kv, nQ, G * bs, hd) scaled; k, v (B, H_kv, nK, bs, hd); index (nQ, M); hidden (B, nQ, bs, M * bs)."""
        out = torch.empty_like(q)
        for i, j in _chunks(q, index.shape[1], k.shape[3]):
            probs, _ = _probs(q[:, :, i:j], k, index[i:j], hidden[:, i:j], softcap)
            out[:, :, i:j] = probs.to(v.dtype) @ _gather(v, index[i:j])
        ctx.save_for_backward(q, k, v, index, hidden, out)
        ctx.softcap = softcap
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, index, hidden, out = ctx.saved_tensors
        B, H_kv, _, _, D = q.shape
        bs = k.shape[3]
        dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        delta = (grad_out.float() * out.float()).sum(-1)  # (B, H_kv, nQ, G * bs): rowsum(dO * O)
        for i, j in _chunks(q, index.shape[1], bs):
            idx, qc, go = index[i:j], q[:, :, i:j].contiguous(), grad_out[:, :, i:j].contiguous()
            probs, capped = _probs(qc, k, idx, hidden[:, i:j], ctx.softcap)  # (B, H_kv, n, G * bs, M * bs)
            kc, vc = _gather(k, idx), _gather(v, idx)  # (B, H_kv, n, M * bs, hd)
            dv_c = probs.to(v.dtype).transpose(-2, -1) @ go  # (B, H_kv, n, M * bs, hd)
            dscores = probs.mul_((go @ vc.transpose(-2, -1)).float().sub_(delta[:, :, i:j, :, None]))
            if capped is not None:  # d(cap * tanh(x / cap))/dx = 1 - tanh^2
                dscores *= 1 - capped.square()
            dscores = dscores.to(q.dtype)
            dq[:, :, i:j] = dscores @ kc
            flat = idx.reshape(-1)  # the gathered blocks' places in k (padding slots add zero)
            dk.index_add_(2, flat, (dscores.transpose(-2, -1) @ qc).view(B, H_kv, -1, bs, D))
            dv.index_add_(2, flat, dv_c.view(B, H_kv, -1, bs, D))
        return dq, dk, dv, None, None, None


class SparseContext:
    """KVContext of a sparse layer kind: stores new keys/values in the static cache when there is one,
    then attends block-sparsely over the plan's tiles."""

    __slots__ = ("rope", "plan", "cache", "start", "key_lo")

    def __init__(self, rope, plan: BlockPlan, cache=None, start: int = 0, key_lo: int = 0) -> None:
        self.rope, self.plan, self.cache, self.start, self.key_lo = rope, plan, cache, start, key_lo

    def attend(self, module: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.cache is not None:
            k, v = self.cache.update(module.layer_idx, k, v, self.start, self.key_lo)  # (B, n_kv, S, hd)
        return block_sparse_attention(q, k, v, self.plan, module.scale, module.softcap)


def sparse_context(pattern: dict, rope, positions: torch.Tensor, valid: torch.Tensor | None, cache=None,
                   start: int = 0, seq_ids: torch.Tensor | None = None):
    """The context of a sparse kind for one forward: block-sparse for a prompt or training batch, the
    dense masked path (same pattern mask) for one decoded token per row, where there is nothing to skip.

    Args:
        positions, valid: (B, T) of the new tokens; cache: a static KVCache already holding their slots.
        seq_ids: (B, T) example ids of packed training rows (no cache).
    """
    end, reach = start + positions.shape[1], window_reach(pattern)
    key_lo = max(0, start - reach + 1) if reach and cache is not None else 0  # a window sees no older slot
    if cache is not None:
        k_pos, k_valid = cache.positions[:, key_lo:end], cache.valid[:, key_lo:end]
    else:
        k_pos, k_valid = positions, valid
    if positions.shape[1] == 1 or not BLOCK_SPARSE:
        mask = attention_mask(positions, k_pos, k_valid, pattern=pattern)  # (B, 1, T, S)
        if seq_ids is not None:
            mask = mask & (seq_ids[:, :, None] == seq_ids[:, None, :])[:, None]
        return AttentionContext(rope, mask, False, cache, start, key_lo)
    ids = None if seq_ids is None else (seq_ids, seq_ids)
    return SparseContext(rope, build_plan(pattern, positions, k_pos, k_valid, ids), cache, start, key_lo)


@contextlib.contextmanager
def dense() -> Iterator[None]:
    """Run sparse kinds through the dense masked path (SDPA or math, the same pattern mask) inside the
    block: the reference in tests and the baseline in benchmarks."""
    global BLOCK_SPARSE
    before, BLOCK_SPARSE = BLOCK_SPARSE, False
    try:
        yield
    finally:
        BLOCK_SPARSE = before

"""Attention masks from positions: causal, padding, sliding window and sparse patterns in one rule.

A sparse pattern (Config.sparse_patterns) is a union of components, each a rule on a query position
i and a key position j; the union is always intersected with causality (j <= i) and padding:
  window (+ dilation)  0 <= i - j < window * dilation and d | (i - j)  (local; dilated as Longformer)
  stride               s | (i - j)                (Child et al. 2019, "strided" sparse transformer)
  block                i // b == j // b            (block-local)
  global_tokens        j < n or i < n              (Longformer / BigBird global tokens)
  random_blocks        j's block is one of r blocks drawn for i's block, seeded (BigBird)
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

MASK_CHUNK = 1 << 24  # (query, key) pairs per piece of a dense pattern mask: 128 MiB of int64 differences
RANDOM_BLOCK_SIZE = 64  # default random_block_size: BigBird's block is 64 tokens (Zaheer et al. 2020, sec. 4)


def attention_mask(
    q_pos: torch.Tensor, k_pos: torch.Tensor, k_valid: torch.Tensor | None, window: int | None = None,
    pattern: dict | None = None,
) -> torch.Tensor:
    """Boolean mask (B, 1, T, S): query i may see key j when j is a real token at or before i.

    Args:
        q_pos: (B, T) positions of the queries.
        k_pos: (B, S) positions of the keys (cache slots).
        k_valid: (B, S) False where a key slot is padding or unused; None means all valid.
        window: with sliding-window attention, keys more than `window - 1` positions back are hidden.
        pattern: a sparse pattern spec (see the module docstring); keys outside it are hidden.
    """
    if pattern is not None:
        return pattern_mask(pattern, q_pos, k_pos, k_valid)[:, None]
    delta = q_pos[:, :, None] - k_pos[:, None, :]  # (B, T, S)
    allowed = delta >= 0
    if window is not None:
        allowed &= delta < window
    if k_valid is not None:
        allowed &= k_valid[:, None, :]
    return allowed[:, None]  # (B, 1, T, S)


def pattern_mask(pattern: dict, q_pos: torch.Tensor, k_pos: torch.Tensor, k_valid: torch.Tensor | None
                 ) -> torch.Tensor:
    """Boolean (..., T, S): the pattern's union of components, causal, over real keys.

    Args:
        q_pos: (..., T) query positions; k_pos, k_valid: (..., S) key positions and validity (None: all valid).
    """
    T, S = q_pos.shape[-1], k_pos.shape[-1]
    rows = max(1, MASK_CHUNK // max(1, S * k_pos[..., 0].numel()))  # query rows per piece
    if rows < T:  # a long dense mask in pieces: the int64 position differences of all rows at once would not fit
        return torch.cat([pattern_mask(pattern, q_pos[..., i:i + rows], k_pos, k_valid)
                          for i in range(0, T, rows)], dim=-2)
    qp, kp = q_pos[..., :, None], k_pos[..., None, :]
    allowed = pattern_allows(pattern, qp, kp) & (kp <= qp)
    if k_valid is not None:
        allowed &= k_valid[..., None, :]
    return allowed


def pattern_allows(pattern: dict, qp: torch.Tensor, kp: torch.Tensor) -> torch.Tensor:
    """Where the union of the pattern's components lets query position `qp` see key position `kp`
    (broadcast together), before causality and padding."""
    delta = qp - kp
    allowed = torch.zeros(torch.broadcast_shapes(qp.shape, kp.shape), dtype=torch.bool, device=qp.device)
    if pattern.get("window"):
        d = pattern.get("dilation", 1)
        allowed |= (delta < pattern["window"] * d) & (delta % d == 0)
    if pattern.get("stride"):
        allowed |= delta % pattern["stride"] == 0
    if pattern.get("block"):
        allowed |= qp // pattern["block"] == kp // pattern["block"]
    if pattern.get("global_tokens"):
        allowed |= (kp < pattern["global_tokens"]) | (qp < pattern["global_tokens"])
    if pattern.get("random_blocks"):
        size = pattern.get("random_block_size", RANDOM_BLOCK_SIZE)
        table = random_block_table(pattern, int(qp.max()) // size + 1, qp.device)  # (n_blocks, r)
        q_rows, k_block = table[qp // size], kp // size  # (..., r), (...)
        for r in range(table.shape[1]):
            allowed |= q_rows[..., r] == k_block
    return allowed


def window_reach(pattern: dict | None) -> int | None:
    """Positions back a pure sliding-window pattern can see, the query's own included ((window - 1) *
    dilation + 1); None when the pattern has another component (global tokens, strides, ...) or is None."""
    if not pattern or set(pattern) - {"window", "dilation"} or not pattern.get("window"):
        return None
    return (pattern["window"] - 1) * pattern.get("dilation", 1) + 1


def random_block_table(pattern: dict, n_blocks: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(n_blocks, random_blocks) long: the key blocks drawn for each query block (-1 pads a short row).

    Query block p draws among blocks 0..p (causal) from a generator seeded by (seed, p), so a row never
    depends on the sequence length and the same pattern spec gives the same blocks in every forward.
    """
    count, seed = pattern["random_blocks"], pattern.get("seed", 0)
    rows = [_random_row(seed, count, p) for p in range(n_blocks)]
    return torch.tensor([row + (-1,) * (count - len(row)) for row in rows], dtype=torch.long, device=device)


@functools.lru_cache(maxsize=65536)
def _random_row(seed: int, count: int, block: int) -> tuple[int, ...]:
    """The `count` key blocks (of 0..block) that query block `block` attends to, sorted."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + block)
    return tuple(sorted(torch.randperm(block + 1, generator=generator)[:count].tolist()))


def layer_schedule(n_layer: int, sparse_kinds: Sequence[str], global_every: int = 0) -> list[str]:
    """Config.layer_types: full attention ("global") on every `global_every`-th layer (0: none), the
    sparse kinds in turn on the others, e.g. (6, ["local"], 3) -> local, local, global, local, local, global."""
    if not sparse_kinds:
        raise ValueError("layer_schedule needs at least one sparse kind (a key of Config.sparse_patterns)")
    types, turn = [], 0
    for i in range(n_layer):
        if global_every and (i + 1) % global_every == 0:
            types.append("global")
        else:
            types.append(sparse_kinds[turn % len(sparse_kinds)])
            turn += 1
    return types


def positions_from_padding(valid: torch.Tensor) -> torch.Tensor:
    """Positions (B, T) that count only real tokens, so left padding does not shift RoPE."""
    return (valid.long().cumsum(-1) - 1).clamp(min=0)

"""FlashAttention on the CPU: exact attention in tiles with an online softmax, forward and backward.

FlashAttention (Dao et al. 2022, https://arxiv.org/abs/2205.14135) in the loop order of
FlashAttention-2 (Dao 2023, https://arxiv.org/abs/2307.08691): forward walks query tiles outside and
key tiles inside, keeping a running row maximum ``m``, row sum ``l`` and unnormalised output; it
saves only the output and the row logsumexp. Backward walks key tiles outside, recomputes each
tile's probabilities from q, k and the logsumexp, and uses ``D = rowsum(dO * O)`` for the softmax
gradient. No (T, S) matrix is ever kept: memory grows linearly in the sequence length.

Grouped-query heads share their key/value head without copies: the G query heads of one key/value
head are stacked as G rows per query position, so one matrix product serves the whole group.
"""

from __future__ import annotations

import torch

# 256 queries x 512 keys: fp32 scores of 512 KiB stay in L2; at 8k tokens on one thread this was
# 1.2-1.4x SDPA's time, 512 x 512 1.2-1.5x, 256 x 256 and 128 x 512 slower (Python's per-op cost)
BLOCK_Q = 256  # query positions per tile (G * BLOCK_Q rows with grouped-query heads)
BLOCK_K = 512  # keys per tile


def flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False, scale: float | None = None,
    key_valid: torch.Tensor | None = None, block_q: int = BLOCK_Q, block_k: int = BLOCK_K,
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v, tile by tile, differentiable in q, k and v.

    Args:
        q: (B, n_head, T, head_dim); k, v: (B, n_kv_head, S, head_dim), n_head a multiple of n_kv_head.
        causal: query i sees keys j <= i + S - T (queries are the last T positions, as in a KV-cache prefill).
        scale: multiplies the scores; default head_dim ** -0.5.
        key_valid: bool (B, S), False at keys no query may see (padding, per-row lengths).
    Returns:
        (B, n_head, T, head_dim); a row that sees no key is zero.
    """
    _check(q, k, v, key_valid)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return _FlashAttention.apply(q, k, v, key_valid, causal, float(scale), block_q, block_k)


def lengths_to_valid(lengths: torch.Tensor, size: int) -> torch.Tensor:
    """Key validity (B, size) from per-row key lengths (B,): the first lengths[b] keys are real."""
    return torch.arange(size, device=lengths.device) < lengths[:, None]


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor | None) -> None:
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(f"flash_attention wants q (B, H, T, D) and k, v (B, H_kv, S, D) of one shape; "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1] or q.shape[1] % k.shape[1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must share batch and head_dim, and "
                         f"n_head must be a multiple of n_kv_head")
    if key_valid is not None and (key_valid.dtype != torch.bool or key_valid.shape != (k.shape[0], k.shape[2])):
        raise ValueError(f"key_valid must be bool (B, S) = {(k.shape[0], k.shape[2])}; got "
                         f"{key_valid.dtype} {tuple(key_valid.shape)}")


# --- layout: the G query heads of a key/value head as rows (t, g) of one matrix ---------------

def _group_rows(x: torch.Tensor, n_kv: int) -> torch.Tensor:
    """(B, n_head, T, D) -> (B * n_kv, T * G, D), row t * G + g is query head g of the group at t."""
    B, H, T, D = x.shape
    return x.view(B, n_kv, H // n_kv, T, D).transpose(2, 3).reshape(B * n_kv, T * (H // n_kv), D)


def _ungroup_rows(x: torch.Tensor, B: int, H: int) -> torch.Tensor:
    """Inverse of `_group_rows`: (B * n_kv, T * G, D) -> (B, n_head, T, D)."""
    N, R, D = x.shape
    n_kv = N // B
    G = H // n_kv
    return x.view(B, n_kv, R // G, G, D).transpose(2, 3).reshape(B, H, R // G, D)


def _key_bias(key_valid: torch.Tensor | None, n_kv: int, dtype: torch.dtype) -> torch.Tensor | None:
    """Additive mask (B * n_kv, 1, S): 0 at valid keys, -inf at the others."""
    if key_valid is None:
        return None
    bias = torch.zeros(key_valid.shape, dtype=dtype, device=key_valid.device).masked_fill_(~key_valid, float("-inf"))
    return bias.repeat_interleave(n_kv, dim=0)[:, None, :]


def _live_tiles(key_valid: torch.Tensor | None, S: int, block_k: int) -> list[bool]:
    """Per key tile: does any row of the batch have a valid key in it (dead tiles are skipped)?"""
    n = (S + block_k - 1) // block_k
    if key_valid is None:
        return [True] * n
    padded = torch.nn.functional.pad(key_valid.any(0), (0, n * block_k - S))
    return padded.view(n, block_k).any(1).tolist()


class _Tiles:
    """Tile geometry shared by forward and backward: which key range a query tile reaches, and masks."""

    def __init__(self, T: int, S: int, G: int, causal: bool, block_q: int, block_k: int, device):
        self.T, self.S, self.G, self.causal = T, S, G, causal
        self.block_q, self.block_k, self.device = block_q, block_k, device
        self.offset = S - T  # query t sits at key position t + offset
        self._masks: dict[tuple[int, int, int], torch.Tensor] = {}  # diagonal tiles repeat one pattern

    def key_end(self, i1: int) -> int:
        """One past the last key the query tile ending at i1 may see."""
        return min(self.S, i1 + self.offset) if self.causal else self.S

    def first_query_tile(self, j0: int) -> int:
        """Start of the first query tile that sees key j0 (earlier tiles are masked by causality)."""
        if not self.causal:
            return 0
        return max(0, j0 - self.offset) // self.block_q * self.block_q

    def causal_mask(self, i0: int, i1: int, j0: int, j1: int) -> torch.Tensor | None:
        """(rows, j1 - j0) True where key j is after query t; None when the tile is wholly visible."""
        if not self.causal or j1 - 1 <= i0 + self.offset:
            return None
        key = (i1 - i0, j1 - j0, i0 + self.offset - j0)  # the mask depends on sizes and diagonal shift only
        if key not in self._masks:
            t = torch.arange(i1 - i0, device=self.device).repeat_interleave(self.G) + key[2]
            self._masks[key] = torch.arange(j1 - j0, device=self.device)[None, :] > t[:, None]
        return self._masks[key]


def _tile_scores(q_i: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None, tiles: _Tiles,
                 i0: int, i1: int, j0: int, j1: int) -> tuple[torch.Tensor, bool]:
    """Scores (N, rows, keys) of query tile [i0, i1) (q_i, pre-scaled) against key tile [j0, j1), masked;
    and whether any entry may be masked (-inf)."""
    s = torch.bmm(q_i, k[:, j0:j1].transpose(1, 2))  # (N, rows, keys)
    masked = tiles.causal_mask(i0, i1, j0, j1)
    if masked is not None:
        s.masked_fill_(masked, float("-inf"))
    if bias is not None:
        s.add_(bias[:, :, j0:j1])
    return s, masked is not None or bias is not None


def _forward(qs, k, v, bias, live, tiles: _Tiles) -> tuple[torch.Tensor, torch.Tensor]:
    """Output (N, T * G, D) and row logsumexp (N, T * G, 1) by the online softmax over key tiles."""
    G, bq, bk = tiles.G, tiles.block_q, tiles.block_k
    out = torch.zeros_like(qs)
    lse = torch.full((*qs.shape[:2], 1), float("-inf"), dtype=qs.dtype, device=qs.device)
    for i0 in range(0, tiles.T, bq):
        i1, end = min(i0 + bq, tiles.T), tiles.key_end(min(i0 + bq, tiles.T))
        rows = slice(i0 * G, i1 * G)
        m = l = acc = None  # running row max, sum of exp(s - m), unnormalised output
        for j0 in range(0, end, bk):
            if not live[j0 // bk]:
                continue
            s, masked = _tile_scores(qs[:, rows], k, bias, tiles, i0, i1, j0, min(j0 + bk, end))
            m_tile = s.amax(-1, keepdim=True)  # (N, rows, 1)
            m_new = m_tile if m is None else torch.maximum(m, m_tile)
            ref = m_new.masked_fill(m_new == float("-inf"), 0.0) if masked else m_new  # rows with no key yet
            p = s.sub_(ref).exp_()  # in place of s
            if m is None:
                l, acc = p.sum(-1, keepdim=True), torch.bmm(p, v[:, j0:j0 + p.shape[-1]])
            else:
                alpha = (m - ref).exp_()  # rescales what earlier tiles summed
                l = torch.addcmul(p.sum(-1, keepdim=True), l, alpha)
                acc = acc.mul_(alpha).baddbmm_(p, v[:, j0:j0 + p.shape[-1]])
            m = m_new
        if m is not None:
            out[:, rows] = acc / l.masked_fill(l == 0, 1.0)
            lse[:, rows] = m + l.log()  # -inf where a row saw no key
    return out, lse


def _backward(qs, k, v, out, lse, d_out, bias, live, tiles: _Tiles):
    """dqs (scaled-q gradient), dk, dv by recomputing each tile's probabilities from the logsumexp."""
    G, bq, bk = tiles.G, tiles.block_q, tiles.block_k
    delta = (d_out * out).sum(-1, keepdim=True)  # D = rowsum(dO * O), (N, T * G, 1)
    lse = lse.masked_fill(lse == float("-inf"), float("inf"))  # empty rows: p = exp(s - inf) = 0
    d_q_tiles = [torch.zeros_like(qs[:, i0 * G:min(i0 + bq, tiles.T) * G]) for i0 in range(0, tiles.T, bq)]
    d_k, d_v = torch.zeros_like(k), torch.zeros_like(v)
    for j0 in range(0, tiles.S, bk):
        if not live[j0 // bk]:
            continue
        j1 = min(j0 + bk, tiles.S)
        k_j, v_j = k[:, j0:j1], v[:, j0:j1]
        d_k_j, d_v_j = torch.zeros_like(k_j), torch.zeros_like(v_j)  # (N, keys, D)
        for i0 in range(tiles.first_query_tile(j0), tiles.T, bq):
            i1 = min(i0 + bq, tiles.T)
            rows = slice(i0 * G, i1 * G)
            q_i, d_o = qs[:, rows], d_out[:, rows]
            p = _tile_scores(q_i, k, bias, tiles, i0, i1, j0, j1)[0].sub_(lse[:, rows]).exp_()
            d_v_j.baddbmm_(p.transpose(1, 2), d_o)  # dV += P^T dO
            d_s = p.mul_(torch.bmm(d_o, v_j.transpose(1, 2)).sub_(delta[:, rows]))  # dS = P * (dO V^T - D)
            d_q_tiles[i0 // bq].baddbmm_(d_s, k_j)  # dQ += dS K
            d_k_j.baddbmm_(d_s.transpose(1, 2), q_i)  # dK += dS^T Q
        d_k[:, j0:j1], d_v[:, j0:j1] = d_k_j, d_v_j
    return torch.cat(d_q_tiles, dim=1), d_k, d_v


class _FlashAttention(torch.autograd.Function):
    """Tiled attention whose backward recomputes the scores; saves q, k, v, output and logsumexp."""

    @staticmethod
    def forward(ctx, q, k, v, key_valid, causal, scale, block_q, block_k):
        B, H, T, D = q.shape
        n_kv, S = k.shape[1], k.shape[2]
        work = torch.promote_types(q.dtype, torch.float32)  # bf16/fp16 inputs are computed in fp32
        qs = _group_rows(q.to(work), n_kv) * scale  # (B * n_kv, T * G, D)
        kf = k.to(work).reshape(B * n_kv, S, D)
        vf = v.to(work).reshape(B * n_kv, S, D)
        tiles = _Tiles(T, S, H // n_kv, causal, block_q, block_k, q.device)
        bias, live = _key_bias(key_valid, n_kv, work), _live_tiles(key_valid, S, block_k)
        out, lse = _forward(qs, kf, vf, bias, live, tiles)
        ctx.save_for_backward(qs, kf, vf, out, lse, key_valid)
        ctx.tiles, ctx.scale, ctx.shape, ctx.dtypes = tiles, scale, (B, H, n_kv), (q.dtype, k.dtype, v.dtype)
        return _ungroup_rows(out, B, H).to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        qs, kf, vf, out, lse, key_valid = ctx.saved_tensors
        B, H, n_kv = ctx.shape
        d_out = _group_rows(grad_out.to(out.dtype), n_kv)
        bias = _key_bias(key_valid, n_kv, out.dtype)
        live = _live_tiles(key_valid, ctx.tiles.S, ctx.tiles.block_k)
        d_qs, d_k, d_v = _backward(qs, kf, vf, out, lse, d_out, bias, live, ctx.tiles)
        S, D = kf.shape[1:]
        dq = _ungroup_rows(d_qs * ctx.scale, B, H).to(ctx.dtypes[0])  # s = (q * scale) k^T
        dk = d_k.view(B, n_kv, S, D).to(ctx.dtypes[1])
        dv = d_v.view(B, n_kv, S, D).to(ctx.dtypes[2])
        return dq, dk, dv, None, None, None, None, None


# --- the model's entry: a context's (mask, is_causal) as causal + key validity ----------------

def split_mask(mask: torch.Tensor) -> tuple[bool, torch.Tensor | None] | None:
    """(causal, key_valid) when a self-attention bool mask (B, 1, T, S) is causal and/or key validity, else None.

    Causal is bottom-right aligned (query t sees keys j <= t + S - T, its own slot after a KV cache).
    Rows of padding queries (whose own key slot is not valid) are not compared: no real query sees
    them, so what they attend to never reaches a real token (left padding gives them other rows).
    """
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] > mask.shape[3]:
        return None
    rows = mask[:, 0]  # (B, T, S)
    T, S = rows.shape[1:]
    key_valid = rows.any(1)  # (B, S): a real key is seen by the last real query under either rule
    real_query = key_valid[:, S - T:, None]  # (B, T, 1)
    tril = torch.ones(T, S, dtype=torch.bool, device=mask.device).tril(S - T)
    for causal in (True, False):
        expected = key_valid[:, None, :] & tril if causal else key_valid[:, None, :]
        if bool(((rows == expected) | ~real_query).all()):
            return causal, None if bool(key_valid.all()) else key_valid
    return None


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
           scale: float) -> torch.Tensor | None:
    """Flash attention under an attention context's mask, or None when the mask is another pattern.

    On a CUDA tensor with Triton installed the Triton kernels run (lmforge/kernels/flash_triton.py).
    """
    if mask is None:
        causal, key_valid = is_causal, None
    else:
        split = split_mask(mask)
        if split is None:
            return None
        causal, key_valid = split
    if q.is_cuda and _triton_kernel() is not None:
        return _triton_kernel()(q, k, v, causal=causal, scale=scale, key_valid=key_valid)
    return flash_attention(q, k, v, causal=causal, scale=scale, key_valid=key_valid)


def _triton_kernel():
    """lmforge.kernels.flash_triton.flash_attention_triton, or None without Triton."""
    try:
        from lmforge.kernels.flash_triton import flash_attention_triton
    except ImportError:
        return None
    return flash_attention_triton

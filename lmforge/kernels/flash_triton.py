"""FlashAttention-2 in Triton for a GPU: forward and backward, causal or not, grouped-query heads.

The structure of FlashAttention-2 (Dao 2023, https://arxiv.org/abs/2307.08691), as in Triton's
fused-attention tutorial: forward runs one program per (query block, batch * head) with an online
softmax over key blocks and stores the output and the row logsumexp; backward runs one program per
(key block, batch * key/value head) for dK and dV, summing over the group's query heads so grouped
heads need no atomics, and one per (query block, batch * head) for dQ. Both recompute the
probabilities from the logsumexp. Exponentials are base 2 (scores pre-multiplied by log2 e).

On the CPU it runs in Triton's interpreter (TRITON_INTERPRET=1 before this module is imported),
which is how tests/kernels/test_flash_triton.py checks it against torch's attention.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # scores * log2(e) lets the kernels use exp2
FWD_BLOCKS = (128, 64)  # (BLOCK_M queries, BLOCK_N keys) per forward program
BWD_BLOCKS = (64, 64)  # the same for both backward kernels


@triton.jit
def _scores(q, k, rows, cols, T, S, OFFSET, VALID, b, qk_scale,
            CAUSAL: tl.constexpr, HAS_VALID: tl.constexpr, PRECISION: tl.constexpr):
    """Scores (BLOCK_M, BLOCK_N) in log2 units for q (M, D) against k (D, N); -inf where masked."""
    s = tl.dot(q, k, input_precision=PRECISION) * qk_scale
    ok = (rows[:, None] < T) & (cols[None, :] < S)
    if CAUSAL:
        ok = ok & (cols[None, :] <= rows[:, None] + OFFSET)
    if HAS_VALID:
        key_ok = tl.load(VALID + b * S + cols, mask=cols < S, other=0)
        ok = ok & (key_ok[None, :] != 0)
    return tl.where(ok, s, float("-inf"))


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, VALID, qk_scale, T, S, OFFSET, H, G,
                sq_b, sq_h, sq_t, sk_b, sk_h, sk_s,
                D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                CAUSAL: tl.constexpr, HAS_VALID: tl.constexpr, PRECISION: tl.constexpr):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    hk = h // G  # the key/value head this query head reads
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    q = tl.load(Q + b * sq_b + h * sq_h + rows[:, None] * sq_t + dims[None, :],
                mask=(rows[:, None] < T) & (dims[None, :] < D), other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max (log2 units)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(s - m)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # unnormalised output
    hi = S
    if CAUSAL:  # key blocks past the last query's diagonal are skipped
        hi = tl.minimum(S, (pid_m + 1) * BLOCK_M + OFFSET)
    k_base, v_base = K + b * sk_b + hk * sk_h, V + b * sk_b + hk * sk_h
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        kv_mask = (cols[:, None] < S) & (dims[None, :] < D)
        k = tl.load(k_base + cols[:, None] * sk_s + dims[None, :], mask=kv_mask, other=0.0)
        s = _scores(q, tl.trans(k), rows, cols, T, S, OFFSET, VALID, b, qk_scale, CAUSAL, HAS_VALID, PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw no key yet
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None] * sk_s + dims[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # a row with no key (or past T) stays zero
    out = acc / l_safe[:, None]
    tl.store(O + b * sq_b + h * sq_h + rows[:, None] * sq_t + dims[None, :], out.to(O.dtype.element_ty),
             mask=(rows[:, None] < T) & (dims[None, :] < D))
    lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(l_safe))
    tl.store(LSE + bh * T + rows, lse, mask=rows < T)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, VALID, qk_scale, sm_scale, T, S, OFFSET, H, G,
                     sq_b, sq_h, sq_t, sk_b, sk_h, sk_s,
                     D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     CAUSAL: tl.constexpr, HAS_VALID: tl.constexpr, PRECISION: tl.constexpr):
    pid_n, bhk = tl.program_id(0), tl.program_id(1)
    H_kv = H // G
    b, hk = bhk // H_kv, bhk % H_kv
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    kv_mask = (cols[:, None] < S) & (dims[None, :] < D)
    kv_off = b * sk_b + hk * sk_h + cols[:, None] * sk_s + dims[None, :]
    k = tl.load(K + kv_off, mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
    v = tl.load(V + kv_off, mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lo = 0
    if CAUSAL:  # query blocks wholly before this key block's diagonal are skipped
        lo = tl.maximum(pid_n * BLOCK_N - OFFSET, 0) // BLOCK_M * BLOCK_M
    for g in range(0, G):  # every query head of the group adds to this key/value head
        h = hk * G + g
        for start_m in range(lo, T, BLOCK_M):
            rows = start_m + tl.arange(0, BLOCK_M)
            q_mask = (rows[:, None] < T) & (dims[None, :] < D)
            q_off = b * sq_b + h * sq_h + rows[:, None] * sq_t + dims[None, :]
            q = tl.load(Q + q_off, mask=q_mask, other=0.0)
            do = tl.load(DO + q_off, mask=q_mask, other=0.0)
            lse = tl.load(LSE + (b * H + h) * T + rows, mask=rows < T, other=0.0)
            delta = tl.load(DELTA + (b * H + h) * T + rows, mask=rows < T, other=0.0)
            s = _scores(q, tl.trans(k), rows, cols, T, S, OFFSET, VALID, b, qk_scale, CAUSAL, HAS_VALID, PRECISION)
            p = tl.where(s == float("-inf"), 0.0, tl.math.exp2(s - lse[:, None]))  # (BLOCK_M, BLOCK_N)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)  # dV += P^T dO
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # dP = dO V^T
            ds = p * (dp - delta[:, None])  # dS = P * (dP - D)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)  # dK += dS^T Q
    tl.store(DK + kv_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, VALID, qk_scale, sm_scale, T, S, OFFSET, H, G,
                   sq_b, sq_h, sq_t, sk_b, sk_h, sk_s,
                   D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAUSAL: tl.constexpr, HAS_VALID: tl.constexpr, PRECISION: tl.constexpr):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    hk = h // G
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    q_mask = (rows[:, None] < T) & (dims[None, :] < D)
    q_off = b * sq_b + h * sq_h + rows[:, None] * sq_t + dims[None, :]
    q = tl.load(Q + q_off, mask=q_mask, other=0.0)
    do = tl.load(DO + q_off, mask=q_mask, other=0.0)
    lse = tl.load(LSE + bh * T + rows, mask=rows < T, other=0.0)
    delta = tl.load(DELTA + bh * T + rows, mask=rows < T, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = S
    if CAUSAL:
        hi = tl.minimum(S, (pid_m + 1) * BLOCK_M + OFFSET)
    k_base, v_base = K + b * sk_b + hk * sk_h, V + b * sk_b + hk * sk_h
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        kv_mask = (cols[:, None] < S) & (dims[None, :] < D)
        k = tl.load(k_base + cols[:, None] * sk_s + dims[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * sk_s + dims[None, :], mask=kv_mask, other=0.0)
        s = _scores(q, tl.trans(k), rows, cols, T, S, OFFSET, VALID, b, qk_scale, CAUSAL, HAS_VALID, PRECISION)
        p = tl.where(s == float("-inf"), 0.0, tl.math.exp2(s - lse[:, None]))
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)  # dQ += dS K
    tl.store(DQ + q_off, (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_mask)


def _precision(dtype: torch.dtype) -> str:
    """fp32 inputs multiply in full fp32 ("ieee"), so results match torch's fp32 attention."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _warps(block_m: int, block_n: int) -> int:
    """Warps per program: 8 for 128-row tiles (as Triton's tutorial configs), 4 below."""
    return 8 if max(block_m, block_n) >= 128 else 4


def _launch_args(q: torch.Tensor, k: torch.Tensor, has_valid: bool, causal: bool) -> tuple[tuple, dict]:
    """Runtime arguments (T, S, OFFSET, H, G, strides) and constexprs shared by the three kernels."""
    B, H, T, D = q.shape
    S = k.shape[2]
    scalars = (T, S, S - T, H, H // k.shape[1], q.stride(0), q.stride(1), q.stride(2),
               k.stride(0), k.stride(1), k.stride(2))
    meta = dict(D=D, BLOCK_D=max(16, triton.next_power_of_2(D)), CAUSAL=causal, HAS_VALID=has_valid,
                PRECISION=_precision(q.dtype))
    return scalars, meta


class FlashAttentionTriton(torch.autograd.Function):
    """The three kernels as one differentiable op; saves q, k, v, the output and the logsumexp."""

    @staticmethod
    def forward(ctx, q, k, v, key_valid, causal, scale, fwd_blocks, bwd_blocks):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        B, H, T, _ = q.shape
        has_valid = key_valid is not None
        valid = key_valid.to(torch.int8).contiguous() if has_valid else q.new_zeros(1, dtype=torch.int8)
        out = torch.empty_like(q)  # q's layout, so q's strides address it
        lse = torch.empty(B, H, T, dtype=torch.float32, device=q.device)  # log2 units
        scalars, meta = _launch_args(q, k, has_valid, causal)
        bm, bn = fwd_blocks
        _fwd_kernel[(triton.cdiv(T, bm), B * H)](q, k, v, out, lse, valid, scale * LOG2E, *scalars,
                                                  BLOCK_M=bm, BLOCK_N=bn, num_warps=_warps(bm, bn), **meta)
        ctx.save_for_backward(q, k, v, out, lse, valid)
        ctx.causal, ctx.scale, ctx.has_valid, ctx.bwd_blocks = causal, scale, has_valid, bwd_blocks
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, out, lse, valid = ctx.saved_tensors
        d_out = d_out.contiguous()
        B, H, T, _ = q.shape
        delta = (d_out.float() * out.float()).sum(-1)  # D = rowsum(dO * O), (B, H, T)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        scalars, meta = _launch_args(q, k, ctx.has_valid, ctx.causal)
        bm, bn = ctx.bwd_blocks
        scales = (ctx.scale * LOG2E, ctx.scale)
        _bwd_dkdv_kernel[(triton.cdiv(k.shape[2], bn), B * k.shape[1])](
            q, k, v, d_out, lse, delta, dk, dv, valid, *scales, *scalars, BLOCK_M=bm, BLOCK_N=bn,
            num_warps=_warps(bm, bn), **meta)
        _bwd_dq_kernel[(triton.cdiv(T, bm), B * H)](
            q, k, v, d_out, lse, delta, dq, valid, *scales, *scalars, BLOCK_M=bm, BLOCK_N=bn,
            num_warps=_warps(bm, bn), **meta)
        return dq, dk, dv, None, None, None, None, None


def flash_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False, scale: float | None = None,
    key_valid: torch.Tensor | None = None, fwd_blocks: tuple[int, int] = FWD_BLOCKS,
    bwd_blocks: tuple[int, int] = BWD_BLOCKS,
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v by the Triton kernels, differentiable in q, k and v.

    Args:
        q: (B, n_head, T, head_dim); k, v: (B, n_kv_head, S, head_dim), n_head a multiple of n_kv_head.
        causal: query i sees keys j <= i + S - T (queries are the last T positions).
        key_valid: bool (B, S), False at keys no query may see.
        fwd_blocks, bwd_blocks: (queries, keys) per block, each a power of two >= 16.
    """
    if q.shape[1] % k.shape[1] or k.shape != v.shape or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: want (B, H, T, D) and "
                         f"(B, H_kv, S, D) with H a multiple of H_kv")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return FlashAttentionTriton.apply(q, k, v, key_valid, causal, scale, fwd_blocks, bwd_blocks)

"""Mamba's selective state-space mixer (Gu & Dao 2023, https://arxiv.org/abs/2312.00752).

Per channel d and state index n, with input-dependent delta, B and C ("selective"):

    h_t = exp(delta_t A) * h_{t-1} + delta_t B_t u_t        (zero-order hold for A, Euler for B)
    y_t = C_t . h_t + D u_t,  gated by silu(z_t)

Two ways to run the recurrence, equal to float rounding (tests/model/test_ssm.py):
- `selective_scan`, for training and prefill: a parallel scan. Each step is the affine map
  h -> a_t h + b_t, and composing two maps is associative: (a1, b1) then (a2, b2) is
  (a1 a2, a2 b1 + b2). Inside chunks of CHUNK tokens a Hillis-Steele scan composes every map
  with the one `step` tokens back, step = 1, 2, 4, ... (log2 CHUNK passes, all tokens at once);
  the chunks' total maps are scanned by the same function (recursively), and each chunk's
  states follow from the state that enters it: O(T) work in O(log T) passes. Its gradient is the
  same scan run backwards (`LinearScan`). Sequences longer than SEGMENT run segment after
  segment, carrying the state, so memory stays (batch, SEGMENT, d_inner, d_state) however long
  the prompt.
  Numerics: only products of decay factors exp(delta A) in (0, 1] and sums, no logs and no
  exponent of a positive number, so nothing overflows in fp32 (a log-space cumulative sum
  would need exp(-cumsum(delta A)), which overflows after a few dozen tokens of strong decay);
  it differs from the sequential loop only in the order of additions (in fp32 about 1e-7
  relative over a few hundred tokens, 1e-5 over 4k; bench/bench_ssm.py prints it per length).
- `ssm_step`, for decoding: one token against a constant-size state (the conv's last d_conv - 1
  inputs and h), whatever the context length.
Padding never enters the state: at a padded position the input is zeroed and delta is 0, so
exp(0 A) = 1 keeps h and delta B u adds nothing. A packed training row resets h (decay 0) and the
conv window at each example's first token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import Config
from lmforge.model.linear import Linear

CHUNK = 8  # tokens per chunk of the parallel scan (log2 CHUNK passes inside a chunk)
SEGMENT = 1024  # tokens scanned at once; longer inputs run segment by segment with the state carried


@dataclass
class SSMState:
    """One Mamba layer's decoding state, the same size at every context length."""

    conv: torch.Tensor  # (B, d_inner, d_conv - 1): the inputs the causal conv still reads
    ssm: torch.Tensor  # (B, d_inner, d_state) float32: h

    @classmethod
    def zeros(cls, config: Config, batch_size: int, dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu") -> SSMState:
        """The state before any token: the conv sees zeros (its left padding) and h = 0."""
        conv = torch.zeros(batch_size, config.d_inner, config.d_conv - 1, dtype=dtype, device=device)
        return cls(conv, torch.zeros(batch_size, config.d_inner, config.d_state, dtype=torch.float32, device=device))

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows `index` (beam search)."""
        self.conv, self.ssm = self.conv.index_select(0, index), self.ssm.index_select(0, index)

    @property
    def nbytes(self) -> int:
        return self.conv.numel() * self.conv.element_size() + self.ssm.numel() * self.ssm.element_size()


def discretize(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b), each (batch, T, d_inner, d_state): the decay exp(delta A) and the input delta B u."""
    a = torch.exp(delta[..., None] * A)  # (batch, T, D, N)
    b = (delta * u)[..., None] * B[:, :, None, :]  # (batch, T, D, N)
    return a, b


def ssm_step(h: torch.Tensor, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
             C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of the recurrence: (y (batch, D), new h (batch, D, N)) from h, u and delta (batch, D),
    A (D, N), B and C (batch, N)."""
    h = torch.exp(delta[..., None] * A) * h + (delta * u)[..., None] * B[:, None, :]
    return (h @ C[..., None]).squeeze(-1), h


def sequential_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                    h0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence one token at a time (`ssm_step` in a loop): the baseline the parallel scan is
    measured against (bench/bench_ssm.py). Same arguments and results as `selective_scan`."""
    h = h0 if h0 is not None else u.new_zeros(u.shape[0], u.shape[2], A.shape[1], dtype=torch.float32)
    ys = []
    for t in range(u.shape[1]):
        y, h = ssm_step(h, u[:, t], delta[:, t], A, B[:, t], C[:, t])
        ys.append(y)
    return torch.stack(ys, dim=1), h


def prefix_scan(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive Hillis-Steele scan along dim 1 of the maps h -> a_t h + b_t: afterwards (a_t, b_t) is
    maps 1..t composed, so b_t is the state at t from a zero state (log2 T passes, into new tensors)."""
    step, T = 1, a.shape[1]
    while step < T:
        # compose each map with the one `step` back: (a', b') then (a, b) = (a' a, b + a b')
        new_a, new_b = torch.empty_like(a), torch.empty_like(b)
        new_a[:, :step], new_b[:, :step] = a[:, :step], b[:, :step]  # nothing `step` back: unchanged
        torch.addcmul(b[:, step:], a[:, step:], b[:, :-step], out=new_b[:, step:])
        torch.mul(a[:, step:], a[:, :-step], out=new_a[:, step:])
        a, b, step = new_a, new_b, 2 * step
    return a, b


def chunked_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """States (batch, T, D, N) of h_t = a_t h_{t-1} + b_t from h0 (batch, D, N): scan inside chunks of
    `chunk` (default CHUNK) steps, scan the chunks' total maps by this same function, then each chunk's
    states from the state entering it (Blelloch's work-efficient shape: O(T) work, log T depth)."""
    chunk = chunk or CHUNK
    batch, T, D, N = a.shape
    if T <= chunk:
        a_in, b_in = prefix_scan(a, b)
        return torch.addcmul(b_in, a_in, h0[:, None])
    pad = (-T) % chunk
    if pad:  # identity maps (a = 1, b = 0) fill the last chunk
        a, b = F.pad(a, (0, 0, 0, 0, 0, pad), value=1.0), F.pad(b, (0, 0, 0, 0, 0, pad))
    n = a.shape[1] // chunk
    a_in, b_in = prefix_scan(a.reshape(batch * n, chunk, D, N), b.reshape(batch * n, chunk, D, N))
    a_in, b_in = a_in.view(batch, n, chunk, D, N), b_in.view(batch, n, chunk, D, N)
    after = chunked_scan(a_in[:, :, -1], b_in[:, :, -1], h0, chunk)  # (batch, n, D, N): state after each chunk
    entering = torch.cat([h0[:, None], after[:, :-1]], dim=1)  # (batch, n, D, N)
    states = torch.addcmul(b_in, a_in, entering[:, :, None])  # (batch, n, chunk, D, N)
    return states.view(batch, n * chunk, D, N)[:, :T]


class LinearScan(torch.autograd.Function):
    """chunked_scan with the gradient of a linear recurrence, which is the same recurrence run backwards:
    g_t = dL/dh_t + a_{t+1} g_{t+1}, then dL/db_t = g_t, dL/da_t = g_t h_{t-1}, dL/dh0 = a_1 g_1 (the
    backward of mamba.py's pscan). Autograd through the scan's slices would instead allocate a
    full-size zero tensor for every slice of every pass."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
        states = chunked_scan(a, b, h0)
        ctx.save_for_backward(a, states, h0)
        return states

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a, states, h0 = ctx.saved_tensors
        a_next = torch.cat([a[:, 1:], torch.ones_like(a[:, :1])], dim=1)  # a_{t+1}; the last one meets g = 0
        g = chunked_scan(a_next.flip(1), grad.flip(1), torch.zeros_like(h0)).flip(1)  # (batch, T, D, N)
        h_prev = torch.cat([h0[:, None], states[:, :-1]], dim=1)
        return g * h_prev, g, a[:, 0] * g[:, 0]


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   h0: torch.Tensor | None = None, resets: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """y (batch, T, D) and the last state (batch, D, N) of the selective SSM, every token at once.

    Args:
        u, delta: (batch, T, D) inputs and positive step sizes; A: (D, N), negative.
        B, C: (batch, T, N) input and output projections of the state.
        h0: (batch, D, N) state before the first token; None is zeros.
        resets: (batch, T) True where the state is cleared before the token (packed examples).
    """
    u, delta, B, C = u.float(), delta.float(), B.float(), C.float()
    h = h0 if h0 is not None else u.new_zeros(u.shape[0], u.shape[2], A.shape[1])
    ys = []
    for s in range(0, u.shape[1], SEGMENT):
        a, b = discretize(u[:, s:s + SEGMENT], delta[:, s:s + SEGMENT], A, B[:, s:s + SEGMENT])
        if resets is not None:  # decay 0: nothing from before the reset survives
            a = a.masked_fill(resets[:, s:s + SEGMENT, None, None], 0.0)
        states = LinearScan.apply(a, b, h)  # (batch, L, D, N)
        ys.append((states @ C[:, s:s + SEGMENT, :, None]).squeeze(-1))  # y_t = C_t . h_t
        h = states[:, -1]
    return torch.cat(ys, dim=1), h


def causal_conv(x: torch.Tensor, conv: nn.Conv1d, prev: torch.Tensor | None, seq_ids: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal conv of x (batch, D, T) after `prev` (batch, D, K-1) inputs (zeros if None);
    returns the output (batch, D, T) and the last K-1 inputs. With seq_ids (batch, T) a tap never
    reaches into another packed example."""
    K = conv.kernel_size[0]
    if prev is None:
        prev = x.new_zeros(x.shape[0], x.shape[1], K - 1)
    full = torch.cat([prev.to(x.dtype), x], dim=-1)  # (batch, D, K - 1 + T)
    tail = full[..., full.shape[-1] - (K - 1):]
    if seq_ids is None:
        return F.conv1d(full, conv.weight, conv.bias, groups=x.shape[1]), tail
    T = x.shape[-1]
    ids = F.pad(seq_ids, (K - 1, 0), value=-1)  # (batch, K - 1 + T), -1 before the row
    out = 0.0 if conv.bias is None else conv.bias[None, :, None]
    for j in range(K):  # tap j reads the input K - 1 - j tokens back
        same = (ids[:, j:j + T] == seq_ids)[:, None]  # (batch, 1, T)
        out = out + conv.weight[None, :, 0, j, None] * full[..., j:j + T] * same
    return out, tail


class MambaMixer(nn.Module):
    """in_proj to (u, z), causal conv, x_proj to (delta, B, C), the selective scan, D skip, silu(z) gate,
    out_proj. Parameter names are Hugging Face's MambaMixer's."""

    def __init__(self, config: Config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        D, N, R = config.d_inner, config.d_state, config.dt_rank
        self.d_inner, self.d_state, self.dt_rank, self.d_conv = D, N, R, config.d_conv
        self.in_proj = Linear(config.n_embd, 2 * D, bias=config.bias)
        self.conv1d = nn.Conv1d(D, D, config.d_conv, groups=D, padding=config.d_conv - 1, bias=config.conv_bias)
        self.x_proj = Linear(D, R + 2 * N, bias=False)
        self.dt_proj = Linear(R, D, bias=True)
        self.A_log = nn.Parameter(torch.empty(D, N))  # A = -exp(A_log): real, negative, per channel and state
        self.D = nn.Parameter(torch.empty(D))
        self.out_proj = Linear(D, config.n_embd, bias=config.bias)

    def ssm_inputs(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """delta (..., D) = softplus(dt_proj(.)) and B, C (..., N), all from the conv output u (..., D)."""
        dt, B, C = self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        return F.softplus(self.dt_proj(dt).float()), B, C

    def forward(self, x: torch.Tensor, state: SSMState | None = None, valid: torch.Tensor | None = None,
                seq_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x (batch, T, n_embd) -> (batch, T, n_embd); `state` (if given) is read and advanced.

        Args:
            valid: (batch, T) False at padding, which leaves the state unchanged.
            seq_ids: (batch, T) packed-example ids (training, no state): each example starts afresh.
        """
        if state is not None:
            self.check_state(state, x.shape[0])
            if x.shape[1] == 1 and valid is None:
                return self.step(x, state)
        u, z = self.in_proj(x).chunk(2, dim=-1)  # (batch, T, D) each
        if valid is not None:
            u = u * valid[..., None]
        u, tail = causal_conv(u.transpose(1, 2), self.conv1d, None if state is None else state.conv, seq_ids)
        u = F.silu(u).transpose(1, 2)  # (batch, T, D)
        if valid is not None:
            u = u * valid[..., None]
        delta, B, C = self.ssm_inputs(u)
        if valid is not None:
            delta = delta * valid[..., None]  # exp(0 A) = 1: the state passes padding unchanged
        resets = None if seq_ids is None else F.pad(seq_ids[:, 1:] != seq_ids[:, :-1], (1, 0), value=False)
        y, h = selective_scan(u, delta, -torch.exp(self.A_log.float()), B, C,
                              None if state is None else state.ssm, resets)
        if state is not None:
            state.conv, state.ssm = tail, h
        return self.out_proj(self.gate(y, u, z))

    def step(self, x: torch.Tensor, state: SSMState) -> torch.Tensor:
        """One token per row, x (batch, 1, n_embd), against the constant-size state (decoding)."""
        u, z = self.in_proj(x[:, 0]).chunk(2, dim=-1)  # (batch, D) each
        window = torch.cat([state.conv, u[..., None].to(state.conv.dtype)], dim=-1)  # (batch, D, K)
        u = (window * self.conv1d.weight[:, 0]).sum(-1)
        if self.conv1d.bias is not None:
            u = u + self.conv1d.bias
        u = F.silu(u)
        delta, B, C = self.ssm_inputs(u)
        y, state.ssm = ssm_step(state.ssm, u.float(), delta, -torch.exp(self.A_log.float()), B.float(), C.float())
        state.conv = window[..., 1:]
        return self.out_proj(self.gate(y, u, z))[:, None]

    def gate(self, y: torch.Tensor, u: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """(y + D u) * silu(z), back in the input's dtype."""
        return ((y + u.float() * self.D.float()) * F.silu(z.float())).to(z.dtype)

    def check_state(self, state: SSMState, batch: int) -> None:
        """Refuse a state built for another model (or batch) before it is mixed in."""
        want = {"conv": (batch, self.d_inner, self.d_conv - 1), "ssm": (batch, self.d_inner, self.d_state)}
        got = {"conv": tuple(state.conv.shape), "ssm": tuple(state.ssm.shape)}
        if got != want:
            raise ValueError(f"Mamba layer {self.layer_idx}: SSM state has shapes {got}, this layer needs {want} "
                             "(batch, d_inner, d_conv - 1 | d_state); the state belongs to another model or batch: "
                             "build it for this model (lmforge.generation.state_cache.make_cache)")

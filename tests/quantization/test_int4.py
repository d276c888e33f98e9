"""Int4 codes (group_params, quantize_codes, RTN) and Int4Linear on torch's int4 CPU kernel."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmforge.quantization.int4 import (Int4Linear, dequantize_int4, group_params, pack_nibbles, quantize_codes,
                                       quantize_rtn, unpack_nibbles)

BF16_EPS = 2.0 ** -8  # bf16 keeps 8 significant bits: relative rounding error <= 2^-9, 2^-8 with margin


def _groups(w: torch.Tensor, g: int) -> torch.Tensor:
    n, k = w.shape
    return w.reshape(n, k // g, g)  # (N, G, g)


def test_group_params_asymmetric_maps_min_and_max_to_the_end_codes():
    w = torch.randn(6, 32)
    scale, zero = group_params(w, symmetric=False)
    lo, hi = w.min(dim=1).values, w.max(dim=1).values
    torch.testing.assert_close(scale, (hi - lo) / 15)
    torch.testing.assert_close(zero, lo + 8 * scale)
    q = quantize_codes(w, scale, zero)
    assert q.dtype == torch.uint8
    assert (q[torch.arange(6), w.argmin(dim=1)] == 0).all() and (q[torch.arange(6), w.argmax(dim=1)] == 15).all()
    err = ((q.float() - 8) * scale[:, None] + zero[:, None] - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-6).all()


def test_group_params_symmetric_has_zero_zero_and_absmax_over_7():
    w = torch.randn(5, 64)
    scale, zero = group_params(w, symmetric=True)
    torch.testing.assert_close(scale, w.abs().max(dim=1).values / 7)
    assert (zero == 0).all()
    assert (quantize_codes(torch.zeros(5, 3), scale, zero) == 8).all()  # 0.0 is exactly representable
    q = quantize_codes(w, scale, zero)
    assert int(q.min()) >= 1 and int(q.max()) <= 15  # -absmax -> 1, +absmax -> 15
    assert (group_params(torch.zeros(2, 32), True)[0] == 1e-8).all()  # all-zero group: clamped scale


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [False, True])
def test_rtn_error_is_at_most_half_a_step_per_group(group_size, symmetric):
    w = torch.randn(48, 256) * torch.rand(48, 1)  # rows of different scales
    q, scale, zero = quantize_rtn(w, group_size, symmetric)
    assert q.shape == w.shape and scale.shape == zero.shape == (48, 256 // group_size)
    groups = _groups(w, group_size)
    if symmetric:
        torch.testing.assert_close(scale, groups.abs().amax(dim=2) / 7)
    else:
        torch.testing.assert_close(scale, (groups.amax(dim=2) - groups.amin(dim=2)) / 15)
    err = (_groups(dequantize_int4(q, scale, zero, group_size), group_size) - groups).abs()
    assert (err <= scale[..., None] / 2 + 1e-6).all()


def test_rtn_accepts_a_column_major_weight():
    w = torch.randn(32, 64)
    q1, s1, z1 = quantize_rtn(w, 32)
    q2, s2, z2 = quantize_rtn(w.t().contiguous().t(), 32)  # lmforge loads linears column-major
    assert torch.equal(q1, q2) and torch.equal(s1, s2) and torch.equal(z1, z2)


@pytest.mark.parametrize("group_size,k", [(48, 96), (16, 64), (100, 64)])
def test_bad_group_size_is_a_value_error(group_size, k):
    with pytest.raises(ValueError, match="group_size"):
        quantize_rtn(torch.randn(16, k), group_size)
    with pytest.raises(ValueError, match="group_size"):
        Int4Linear.from_linear(nn.Linear(k, 16), group_size)


def test_from_codes_rejects_bad_codes_and_shapes():
    q = torch.randint(0, 16, (16, 64), dtype=torch.uint8)
    scale, zero = torch.rand(16, 2), torch.zeros(16, 2)
    with pytest.raises(ValueError, match="0..15"):
        Int4Linear.from_codes(q.int() + 16, scale, zero, 32)
    with pytest.raises(ValueError, match="0..15"):
        Int4Linear.from_codes(q.float(), scale, zero, 32)
    with pytest.raises(ValueError, match="must both be"):
        Int4Linear.from_codes(q, scale[:, :1], zero, 32)


def test_nibble_packing_round_trips_and_codes_are_kept():
    q = torch.randint(0, 16, (8, 64), dtype=torch.uint8)
    assert torch.equal(unpack_nibbles(pack_nibbles(q)), q)
    assert (pack_nibbles(q)[:, 0] == q[:, 0] + 16 * q[:, 1]).all()  # column 0 in the low nibble
    m = Int4Linear.from_codes(q, torch.rand(8, 2), torch.randn(8, 2), 32)
    assert torch.equal(m.codes, q)
    assert m.qweight.shape == (8, 32) and m.qweight.dtype == torch.uint8


def _bf16_reference(m: Int4Linear, x: torch.Tensor) -> torch.Tensor:
    """x @ W_hat^T as the kernel computes it: bf16 x, W_hat from bf16 scales/zeros, fp32 sums, bf16 output."""
    w = dequantize_int4(m.codes, m.scale.bfloat16().float(), m.zero.bfloat16().float(), m.group_size)
    return (x.bfloat16().float() @ w.t()).bfloat16().float()


@pytest.mark.parametrize("n,k,g", [(64, 64, 32), (40, 128, 64), (96, 256, 128), (7, 32, 32)])
def test_forward_matches_dequantized_weight_within_bf16_rounding(n, k, g):
    linear = nn.Linear(k, n)
    linear.weight.data += 0.5  # groups away from 0: large zeros, so a wrong zero shows
    m = Int4Linear.from_linear(linear, g)
    x = torch.randn(2, 5, k)
    y = m(x)
    assert y.shape == (2, 5, n) and y.dtype == torch.float32
    ref = _bf16_reference(m, x) + linear.bias.detach()
    # one bf16 ulp (2^-7 relative) where a different summation order rounds the other way
    assert ((y - ref).abs() <= 2 * BF16_EPS * (ref - linear.bias.detach()).abs() + 1e-6).all()


@pytest.mark.parametrize("symmetric", [False, True])
def test_forward_is_within_the_quantization_error_of_the_float_linear(symmetric):
    linear = nn.Linear(128, 64)
    m = Int4Linear.from_linear(linear, 32, symmetric)
    x = torch.randn(9, 128)
    y = m(x)
    exact = linear(x).detach()
    step = m.scale.repeat_interleave(32, dim=1)  # (N, K): the step of each weight's group
    w_abs = linear.weight.detach().abs() + m.zero.abs().repeat_interleave(32, dim=1) + 8 * step
    # |w - w_hat| <= step/2 per weight; the kernel's bf16 x, scale, zero and output add < 2^-8 relative each
    bound = x.abs() @ (step / 2).t() + BF16_EPS * (x.abs() @ w_abs.t() + exact.abs()) + 1e-5
    assert ((y - exact).abs() <= bound).all()
    assert (y - exact).abs().max() > 0  # it is quantized


def test_weight_property_is_the_dequantized_matrix_and_state_dict_is_portable():
    linear = nn.Linear(64, 32)
    m = Int4Linear.from_linear(linear, 32)
    q, scale, zero = quantize_rtn(linear.weight, 32)
    torch.testing.assert_close(m.weight, dequantize_int4(q, scale, zero, 32))
    assert set(m.state_dict()) == {"qweight", "scale", "zero", "bias"}
    fresh = Int4Linear(64, 32, 32, bias=True)
    x = torch.randn(3, 64)
    fresh(x)  # packs its initial (zero) codes ...
    fresh.load_state_dict(m.state_dict())  # ... loading must drop that packing
    assert torch.equal(fresh(x), m(x))


def test_bf16_input_gives_bf16_output_for_any_width():
    m = Int4Linear.from_linear(nn.Linear(32, 7, bias=False), 32)  # 7 rows: padded to 16 inside the kernel
    x = torch.randn(2, 3, 32)
    y = m(x.bfloat16())
    assert y.dtype == torch.bfloat16 and y.shape == (2, 3, 7)
    # the same kernel on the same (bf16-representable) input values, then rounded to bf16
    torch.testing.assert_close(y.float(), m(x.bfloat16().float()), rtol=2 * BF16_EPS, atol=1e-6)


def test_backward_uses_the_dequantized_weight():
    m = Int4Linear.from_linear(nn.Linear(64, 32, bias=False), 32)
    x = torch.randn(4, 64, requires_grad=True)
    m(x).sum().backward()
    torch.testing.assert_close(x.grad, m.weight.sum(dim=0).expand(4, 64))


def test_no_kernel_off_the_cpu_is_a_clear_runtime_error():
    m = Int4Linear(64, 32, 32, device="meta")
    with pytest.raises(RuntimeError, match="only on the CPU"):
        m(torch.randn(1, 64, device="meta"))


@pytest.mark.parametrize("group_size,k", [(64, 96), (128, 576), (128, 64)])
def test_ragged_last_group(group_size, k):
    """A group size that does not divide K (SmolLM2's 576 at g128): the last group is narrower, its
    params come from its own columns only, and the kernel's zero padding adds nothing."""
    w, x = torch.randn(48, k), torch.randn(3, k)
    q, scale, zero = quantize_rtn(w, group_size)
    assert scale.shape == (48, -(-k // group_size)) and q.shape == (48, k)
    tail = w[:, (scale.shape[1] - 1) * group_size:]  # the last group's real columns
    s_ref, z_ref = group_params(tail, symmetric=False)
    assert torch.equal(scale[:, -1], s_ref) and torch.equal(zero[:, -1], z_ref)
    w_hat = dequantize_int4(q, scale, zero, group_size)
    assert ((w_hat - w).abs() <= scale.repeat_interleave(group_size, 1)[:, :k] / 2 + 1e-6).all()
    layer = Int4Linear.from_codes(q, scale, zero, group_size)
    ref = (x.bfloat16().float() @ w_hat.t())
    torch.testing.assert_close(layer(x), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())

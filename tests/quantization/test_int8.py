"""Int8 per-channel weights, the activation observer, and the dynamic and static int8 linears (fbgemm)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmforge.quantization.int8 import (Int8DynamicLinear, Int8StaticLinear, MinMaxObserver, activation_qmax,
                                       dequantize_int8, quantize_per_channel)


def test_per_channel_weights_are_within_half_a_step():
    w = torch.randn(40, 96) * torch.rand(40, 1)
    q, scale = quantize_per_channel(w)
    assert q.dtype == torch.int8 and scale.shape == (40,)
    torch.testing.assert_close(scale, w.abs().amax(dim=1) / 127)
    assert int(q.abs().max()) == 127
    assert ((dequantize_int8(q, scale) - w).abs() <= scale[:, None] / 2 + 1e-7).all()


def test_minmax_observer_range_and_qparams():
    obs = MinMaxObserver()
    obs.update(torch.tensor([[-1.0, 0.5]]))
    obs.update(torch.tensor([[2.0, 3.0]]))
    scale, zero_point = obs.qparams(255)
    assert scale == pytest.approx(4.0 / 255) and zero_point == round(1.0 / (4.0 / 255))
    obs = MinMaxObserver()
    obs.update(torch.tensor([1.0, 2.0]))  # all positive: the range is widened to hold 0
    assert obs.qparams(255) == (pytest.approx(2.0 / 255), 0)


def test_percentile_observer_ignores_outliers():
    x = torch.rand(10000)  # U(0, 1)
    x[0] = 100.0
    minmax, pct = MinMaxObserver("minmax"), MinMaxObserver("percentile", 99.9)
    minmax.update(x), pct.update(x)
    assert minmax.qparams()[0] == pytest.approx(100.0 / 255)
    assert pct.qparams()[0] == pytest.approx(1.0 / 255, rel=0.01)


def test_observer_errors():
    with pytest.raises(ValueError, match="no calibration data"):
        MinMaxObserver().qparams()
    with pytest.raises(ValueError, match="observer method"):
        MinMaxObserver("histogram")


def test_activation_probe_is_exact_on_this_cpu():
    assert activation_qmax() in (127, 255)


def _bound_vs_dequantized(w_hat: torch.Tensor, x_err: float, ref: torch.Tensor) -> torch.Tensor:
    """|y - x W_hat^T| when every x is off by at most x_err: sum_k |W_hat[n, k]| * x_err (+ fp32 sums)."""
    return (w_hat.abs().sum(dim=1) * x_err)[None] + 1e-5 * ref.abs().max()


def _fake_quant(x: torch.Tensor, scale: float, zero_point: int, qmax: int) -> torch.Tensor:
    """x rounded onto the uint8 grid 0..qmax of (scale, zero_point) and back."""
    return (torch.clamp(torch.round(x / scale) + zero_point, 0, qmax) - zero_point) * scale


@pytest.mark.parametrize("offset", [0.0, 2.0])
def test_dynamic_equals_per_call_min_max_quantize_dequantize_reference(offset):
    linear = nn.Linear(96, 40)
    m = Int8DynamicLinear.from_linear(linear)
    x = torch.randn(2, 7, 96) + offset
    y = m(x)
    assert y.shape == (2, 7, 40) and y.dtype == torch.float32
    qmax = activation_qmax()  # x's own range, widened to hold 0, onto 0..qmax
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = (hi - lo) / qmax
    ref = (_fake_quant(x, scale, round(-lo / scale), qmax) @ m.weight.t() + linear.bias).detach()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_dynamic_is_within_the_quantization_error_of_the_float_linear():
    linear = nn.Linear(128, 64)
    m = Int8DynamicLinear.from_linear(linear)
    x = torch.randn(5, 128)
    exact = linear(x).detach()
    x_step = float(x.max() - x.min()) / activation_qmax()
    # x W^T - x_q W_hat^T = x (W - W_hat)^T + (x - x_q) W_hat^T
    bound = x.abs() @ (m.weight_scale / 2)[None].expand(128, 64) + _bound_vs_dequantized(m.weight, x_step, exact)
    err = (m(x) - exact).abs()
    assert (err <= bound).all() and err.max() > 0


def _static(linear: nn.Linear, calibration: list[torch.Tensor]) -> Int8StaticLinear:
    obs = MinMaxObserver()
    for x in calibration:
        obs.update(x)
    return Int8StaticLinear.from_linear(linear, obs)


def test_static_equals_fixed_scale_quantize_dequantize_reference():
    linear = nn.Linear(64, 48)
    m = _static(linear, [torch.randn(4, 64) for _ in range(3)])
    scale, zp = float(m.input_scale), int(m.input_zero_point)
    x = torch.randn(3, 5, 64) * 1.5  # partly outside the calibrated range: clamped like the reference
    ref = (_fake_quant(x, scale, zp, 255) @ m.weight.t() + linear.bias).detach()
    torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_static_is_within_the_quantization_error_inside_the_calibrated_range():
    linear = nn.Linear(128, 64)
    calib = [torch.randn(8, 128) for _ in range(4)]
    m = _static(linear, calib)
    x = torch.randn(6, 128).clamp(min(float(c.min()) for c in calib), max(float(c.max()) for c in calib))
    exact = linear(x).detach()
    bound = x.abs() @ (m.weight_scale / 2)[None].expand(128, 64) + \
        _bound_vs_dequantized(m.weight, float(m.input_scale) / 2, exact)
    assert ((m(x) - exact).abs() <= bound).all()


@pytest.mark.parametrize("cls", [Int8DynamicLinear, Int8StaticLinear])
def test_state_dict_is_portable_and_reloads(cls):
    linear = nn.Linear(64, 32)
    m = cls.from_linear(linear) if cls is Int8DynamicLinear else _static(linear, [torch.randn(4, 64)])
    keys = {"qweight", "weight_scale", "bias"} | ({"input_scale", "input_zero_point"} if cls is Int8StaticLinear
                                                  else set())
    assert set(m.state_dict()) == keys
    fresh = cls(64, 32, bias=True)
    x = torch.randn(3, 64)
    fresh(x)  # packs its initial weights; loading must drop that packing
    fresh.load_state_dict(m.state_dict())
    assert torch.equal(fresh(x), m(x))


def test_bf16_input_and_backward():
    m = Int8DynamicLinear.from_linear(nn.Linear(64, 32, bias=False))
    assert m(torch.randn(2, 64).bfloat16()).dtype == torch.bfloat16
    x = torch.randn(4, 64, requires_grad=True)
    m(x).sum().backward()
    torch.testing.assert_close(x.grad, m.weight.sum(dim=0).expand(4, 64))


def test_wrong_width_and_device_errors():
    m = Int8DynamicLinear.from_linear(nn.Linear(64, 32))
    with pytest.raises(ValueError, match="expects 64"):
        m(torch.randn(2, 63))
    with pytest.raises(RuntimeError, match="only on the CPU"):
        Int8DynamicLinear(64, 32, device="meta")(torch.randn(1, 64, device="meta"))

"""lmforge's CPU decode kernels against plain torch arithmetic."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.kernels import gemv
from lmforge.model.linear import Linear
from lmforge.quantization.int4 import Int4Linear, dequantize_int4, quantize_rtn

ext = gemv.extension()
needs_kernels = pytest.mark.skipif(ext is None, reason="lmforge's CPU kernels could not be built here")


@needs_kernels
@pytest.mark.parametrize("m, n, k", [(1, 960, 576), (3, 7, 33), (8, 130, 1536), (5, 1, 16), (1, 5, 10), (7, 64, 40),
                                     (64, 36, 576), (4, 20, 48), (9, 24, 7), (16, 200, 576), (17, 13, 100),
                                     (32, 8, 1536), (33, 40, 64), (47, 9, 576), (2, 11, 576), (1, 3, 64),
                                     (4, 1003, 100)])
def test_linear_f32_equals_matmul(m, n, k):
    """Every way the kernel splits a shape: dot products up to 4 rows (weight rows in 4 streams, and the
    rows left over), 8 lanes up to 8, 16-lane vectors in chunks of 32 rows above (one or two per chunk);
    N not a multiple of 8, K not a multiple of 16."""
    torch.manual_seed(0)
    x, w = torch.randn(m, k), torch.randn(n, k)
    torch.testing.assert_close(ext.linear_f32(x, w), x @ w.t(), rtol=1e-5, atol=1e-4)


@needs_kernels
@pytest.mark.parametrize("m", [1, 3])
def test_a_rows_result_does_not_depend_on_where_it_is_read(m):
    """The 4-stream dot products sum each weight row in one fixed order: the same bits whichever stream,
    leftover row or thread reads it (decode gives the same tokens on any core count)."""
    torch.manual_seed(1)
    x, w = torch.randn(m, 200), torch.randn(203, 200)
    pick = torch.randperm(203)[:37]
    before = torch.get_num_threads()
    try:
        full = ext.linear_f32(x, w)
        torch.set_num_threads(1)
        assert torch.equal(ext.linear_f32(x, w), full)
        assert torch.equal(ext.linear_f32(x, w[pick].contiguous()), full[:, pick])
    finally:
        torch.set_num_threads(before)


@needs_kernels
def test_int4_pack_puts_column_j_and_j_plus_16_in_one_byte():
    q = torch.randint(0, 16, (3, 64), dtype=torch.uint8)
    packed = ext.int4_pack(q)
    assert packed.shape == (3, 32)
    for block in range(2):
        b = packed[:, block * 16:(block + 1) * 16]
        torch.testing.assert_close(b & 15, q[:, block * 32:block * 32 + 16])
        torch.testing.assert_close(b >> 4, q[:, block * 32 + 16:block * 32 + 32])


def int4_reference(x, q, scale, zero, group):
    """What the kernel computes, in float64: sum_g scale_g * sum q x' + (zero_g - 8 scale_g) * sum x'.

    x' is x itself, or, on VNNI machines, x rounded to int8 per 32 columns (scale amax / 127, in fp32).
    """
    m, k = x.shape
    rounded = x
    if ext.INT4_INT8_INPUTS:
        units = x.view(m, -1, 32)
        d = units.abs().amax(-1, keepdim=True) / 127
        inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
        rounded = (torch.round(units * inv) * d).view(m, k)
    g_count = scale.shape[1]
    width = g_count * group
    pad = lambda t: torch.nn.functional.pad(t.double(), (0, width - k)).view(t.shape[0], g_count, group)  # noqa: E731
    codes_dot = torch.einsum("ngc,mgc->mng", pad(q), pad(rounded))
    sums = pad(rounded).sum(-1)  # (m, g): the zero-point term sees the same inputs as the codes
    return (codes_dot * scale.double()).sum(-1) + sums @ (zero.double() - 8 * scale.double()).t()


@needs_kernels
@pytest.mark.parametrize("m", [1, 2, 5, 8])
@pytest.mark.parametrize("k, group", [(576, 128), (256, 64), (96, 32), (160, 128), (1536, 128)])
def test_int4_linear_computes_the_int4_product(m, k, group):
    """Including a narrower last group (576 = 4 * 128 + 64, 160 = 128 + 32) and partial 128-column steps."""
    torch.manual_seed(1)
    w, x = torch.randn(37, k), torch.randn(m, k)
    q, scale, zero = quantize_rtn(w, group)
    y = ext.int4_linear(x, ext.int4_pack(q), scale, zero, group)
    torch.testing.assert_close(y.double(), int4_reference(x, q, scale, zero, group), rtol=1e-4, atol=1e-4)
    # and close to the float product with the dequantized weight (int8 inputs cost < 1 %)
    exact = x @ dequantize_int4(q, scale, zero, group).t()
    assert (y - exact).norm() / exact.norm() < 0.01


@needs_kernels
def test_int4_linear_rejects_too_many_rows_clearly():
    q, scale, zero = quantize_rtn(torch.randn(4, 64), 32)
    with pytest.raises(RuntimeError, match="1 to 8 rows"):
        ext.int4_linear(torch.randn(9, 64), ext.int4_pack(q), scale, zero, 32)


@needs_kernels
def test_int4_module_takes_the_gemv_for_few_rows_and_torch_kernel_for_many():
    torch.manual_seed(2)
    module = Int4Linear.from_linear(nn.Linear(128, 48), 64)
    reference = lambda x: x @ module.weight.t() + module.bias  # noqa: E731
    few, many = torch.randn(3, 128), torch.randn(20, 128)
    y = module(few)  # lmforge's GEMV (int8 inputs on VNNI machines)
    assert (y - reference(few)).norm() / reference(few).norm() < 0.01
    torch.testing.assert_close(module(many), reference(many), rtol=0.02, atol=0.05)  # torch's bf16 kernel
    assert "gemv" in module._kernel_cache and "torch" in module._kernel_cache


def test_linear_module_matches_nn_linear_with_and_without_grad():
    torch.manual_seed(3)
    plain = nn.Linear(40, 24)
    ours = Linear(40, 24)
    ours.load_state_dict(plain.state_dict())
    x = torch.randn(2, 1, 40)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), plain(x), rtol=1e-5, atol=1e-5)
    y = ours(x.requires_grad_())
    y.sum().backward()  # training goes through F.linear, so autograd works
    assert ours.weight.grad is not None and x.grad.shape == x.shape


def test_kernels_can_be_turned_off(monkeypatch):
    """LMFORGE_KERNELS=0: no extension, and the model's linears still compute through torch."""
    monkeypatch.setenv("LMFORGE_KERNELS", "0")
    gemv.extension.cache_clear()
    try:
        assert gemv.extension() is None
        layer = Linear(16, 8)
        with torch.no_grad():
            x = torch.randn(1, 16)
            torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
    finally:
        gemv.extension.cache_clear()
    monkeypatch.delenv("LMFORGE_KERNELS")
    assert (gemv.extension() is None) == (ext is None)

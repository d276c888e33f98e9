"""lmforge's fused encoder kernels against plain torch: bias + exact GELU, bias + residual + LayerNorm,
attention over packed variable-length sequences (every tile shape, one-token sequences), and the
bf16x3 AMX products against the exact (float64) product."""

import pytest
import torch
import torch.nn.functional as F

from lmforge.kernels import encoder

ext = encoder.extension()
pytestmark = pytest.mark.skipif(ext is None, reason="lmforge's encoder kernels could not be built here")


@pytest.mark.parametrize("width", [1536, 37])
def test_bias_gelu_equals_torch_exact_gelu(width):
    torch.manual_seed(0)
    h, b = torch.randn(33, width) * 4, torch.randn(width)
    expected = F.gelu(h + b)
    ext.bias_gelu_(h, b)
    torch.testing.assert_close(h, expected, rtol=1e-6, atol=2e-6)


@pytest.mark.parametrize("width", [384, 50])
def test_add_layernorm_equals_torch(width):
    torch.manual_seed(1)
    x, y = torch.randn(17, width) * 3 + 1, torch.randn(17, width)
    b, w, beta = torch.randn(width), torch.randn(width), torch.randn(width)
    expected = F.layer_norm(x + y + b, (width,), w, beta, 1e-12)
    ext.add_layernorm_(x, y, b, w, beta, 1e-12)
    torch.testing.assert_close(x, expected, rtol=1e-5, atol=1e-5)


def reference(qkv, bias, lengths, n_head):
    """Each sequence alone through torch's SDPA, heads side by side."""
    d = qkv.shape[1] // 3
    outs, start = [], 0
    for n in lengths:
        q, k, v = ((qkv[start:start + n] + bias).view(n, 3, n_head, d // n_head).permute(1, 2, 0, 3))  # (3, H, n, hd)
        outs.append(F.scaled_dot_product_attention(q, k, v).transpose(0, 1).reshape(n, d))
        start += n
    return torch.cat(outs)


@pytest.mark.parametrize("d, n_head", [(384, 12), (64, 4), (256, 4), (48, 4), (64, 1)],
                         ids=["hd32", "hd16", "hd64", "hd12-plain-loops", "hd64-one-head"])
def test_varlen_attention_equals_sdpa_per_sequence(d, n_head):
    torch.manual_seed(2)
    lengths = [1, 7, 8, 9, 16, 31, 33, 70]  # query tiles of 8 with tails; key tiles of 32 and 16
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    qkv, bias = torch.randn(sum(lengths), 3 * d), torch.randn(3 * d)
    out = ext.varlen_attention(qkv, bias, cu, n_head, (d // n_head) ** -0.5)
    torch.testing.assert_close(out, reference(qkv, bias, lengths, n_head), rtol=1e-5, atol=1e-5)


amx = pytest.mark.skipif(ext is None or not ext.amx_available(), reason="this CPU has no AMX-BF16 tiles")


@amx
@pytest.mark.parametrize("m, k, n", [(1, 384, 384), (37, 64, 96), (300, 384, 1152), (129, 1536, 384), (64, 2048, 32)])
def test_linear_bf16x3_is_within_1e_5_of_the_exact_product(m, k, n):
    """Three bf16 products accumulated in fp32 on AMX: rows not a multiple of 32 (padded tiles), K of
    several 1152-long stretches (the carried accumulators)."""
    torch.manual_seed(3)
    x, w, b = torch.randn(m, k), torch.randn(n, k) * 0.05, torch.randn(k)
    packed = ext.pack_bf16x3(w)
    exact = x.double() @ w.double().t()
    y = ext.linear_bf16x3(x, packed, n)
    assert y.shape == (m, n) and y.is_contiguous()
    assert float((y.double() - exact).abs().max() / exact.abs().max()) < 1e-5
    assert float((x @ w.t() - y).abs().max() / exact.abs().max()) < 2e-5  # fp32 is ~1e-6 from exact
    gelu_exact = F.gelu(x.double() + b.double()) @ w.double().t()
    g = ext.gelu_linear_bf16x3(x, b, packed, n)
    assert float((g.double() - gelu_exact).abs().max() / gelu_exact.abs().max()) < 1e-5


@amx
def test_bf16x3_refuses_shapes_it_cannot_tile():
    with pytest.raises(RuntimeError, match="multiples of 32"):
        ext.pack_bf16x3(torch.randn(48, 64))
    with pytest.raises(RuntimeError, match="packed weight does not match"):
        ext.linear_bf16x3(torch.randn(4, 96), ext.pack_bf16x3(torch.randn(64, 64)), 64)


def test_bad_shapes_are_refused():
    qkv, bias = torch.randn(5, 48), torch.randn(48)
    with pytest.raises(RuntimeError, match="cu_seqlens must run from 0 to the 5 rows"):
        ext.varlen_attention(qkv, bias, torch.tensor([0, 4]), 4, 0.25)
    with pytest.raises(RuntimeError, match="sequence 1 is empty"):
        ext.varlen_attention(qkv, bias, torch.tensor([0, 5, 5]), 4, 0.25)
    with pytest.raises(RuntimeError, match="not 3 \\* n_head \\* head_dim"):
        ext.varlen_attention(torch.randn(5, 50), torch.randn(50), torch.tensor([0, 5]), 4, 0.25)
    with pytest.raises(RuntimeError, match="bias must be a contiguous float32 CPU vector of 8"):
        ext.bias_gelu_(torch.randn(2, 8), torch.randn(7))

"""lmforge's GGUF block kernels against the gguf library's numpy dequantizers (ggml's reference layouts)."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from lmforge.checkpoint.gguf_blocks import NATIVE_TYPES, random_blocks
from lmforge.kernels import gemv

ext = gemv.extension()
pytestmark = pytest.mark.skipif(ext is None, reason="lmforge's CPU kernels could not be built here")
TYPES = sorted(NATIVE_TYPES)
QUANTIZABLE = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q8_0]  # types gguf.quants can also quantize


def reference(blocks: torch.Tensor, qtype: Q, k: int) -> torch.Tensor:
    """The gguf library's fp32 dequantization of blocks (N, bytes per row) to (N, k)."""
    return torch.from_numpy(dequantize(blocks.numpy(), qtype).astype(np.float32).reshape(-1, k))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_equals_the_gguf_reference_bit_for_bit(qtype):
    """Random bytes cover every code, high bit and 6-bit scale pattern; only the fp16 fields are kept sane."""
    blocks = random_blocks(qtype, 37, 512, torch.Generator().manual_seed(int(qtype)))
    got = ext.gguf_dequantize(blocks, int(qtype), 512)
    assert torch.equal(got, reference(blocks, qtype, 512))


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda t: t.name)
def test_dequantize_of_quantized_weights_equals_the_reference(qtype):
    w = np.random.default_rng(0).standard_normal((19, 96)).astype(np.float32)
    blocks = torch.from_numpy(quantize(w, qtype))
    got = ext.gguf_dequantize(blocks, int(qtype), 96)
    assert torch.equal(got, reference(blocks, qtype, 96))
    assert (got - torch.from_numpy(w)).abs().max() < 0.5  # and it is a quantization of w


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("rows", [1, 3, 8, 17, 64])
def test_linear_equals_x_times_the_dequantized_weight(qtype, rows):
    """Up to 4 rows: slices decoded in registers; above, decoded rows and transposed lanes; N = 37 leaves
    a partial block of 8 rows and of 4."""
    g = torch.Generator().manual_seed(rows)
    blocks = random_blocks(qtype, 37, 512, g)
    x = torch.randn(rows, 512, generator=g)
    expected = x.double() @ reference(blocks, qtype, 512).double().t()
    got = ext.gguf_linear(x, blocks, int(qtype), 512)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q8_0], ids=lambda t: t.name)
def test_linear_on_a_wide_ragged_shape(qtype):
    """SmolLM2's K = 576 (18 blocks) with N = 203 split unevenly over threads."""
    g = torch.Generator().manual_seed(1)
    blocks, x = random_blocks(qtype, 203, 576, g), torch.randn(2, 576, generator=g)
    expected = x.double() @ reference(blocks, qtype, 576).double().t()
    torch.testing.assert_close(ext.gguf_linear(x, blocks, int(qtype), 576).double(), expected, rtol=1e-5,
                               atol=1e-5 * float(expected.abs().max()))


def test_bad_shapes_and_types_are_named():
    blocks = random_blocks(Q.Q4_K, 4, 256)
    x = torch.randn(1, 256)
    with pytest.raises(RuntimeError, match="not a positive multiple of the block size 256"):
        ext.gguf_linear(torch.randn(1, 200), blocks, int(Q.Q4_K), 200)
    with pytest.raises(RuntimeError, match="bytes per row"):
        ext.gguf_linear(x, blocks[:, :100].contiguous(), int(Q.Q4_K), 256)
    with pytest.raises(RuntimeError, match="has no lmforge kernel"):
        ext.gguf_dequantize(blocks, int(Q.Q5_1), 256)
    with pytest.raises(RuntimeError, match="1 to 64 rows"):
        ext.gguf_linear(torch.randn(65, 256), blocks, int(Q.Q4_K), 256)
    with pytest.raises(RuntimeError, match="features"):
        ext.gguf_linear(torch.randn(1, 512), blocks, int(Q.Q4_K), 256)

"""lmforge's torch dequantization against the gguf library's, bit for bit."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from lmforge.checkpoint import dequant


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0])
def test_dequantize_equals_gguf_bit_for_bit(qtype):
    """Blocks quantized by gguf from weights with outliers and a zero row, then dequantized both ways."""
    rng = np.random.default_rng(0)
    weights = (rng.standard_normal((24, 96)) * rng.uniform(0.001, 3, (24, 1))).astype(np.float32)
    weights[3] = 0
    weights[5, 7] = 40.0
    data = gguf_quantize(weights, qtype)  # (rows, row_bytes) uint8, as GGUFFile.raw gives them
    ours = dequant.dequantize(data, qtype, weights.shape)
    reference = gguf_dequantize(data, qtype).astype(np.float32).reshape(weights.shape)
    assert ours.dtype == torch.float32 and ours.shape == weights.shape
    assert torch.equal(ours, torch.from_numpy(reference))
    w = torch.from_numpy(weights)
    error = (ours - w).abs().amax(1) / w.abs().amax(1).clamp(min=1e-6)
    assert error.max() < 0.15  # and it is the weights, to within about a 4-bit step of each row's largest


def test_other_types_are_left_to_gguf():
    assert dequant.dequantize(np.zeros((1, 210), np.uint8), Q.Q6_K, (1, 256)) is None

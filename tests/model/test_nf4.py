"""NF4 (QLoRA): the paper's codebook, quantization error bound, double-quantization memory."""

from __future__ import annotations

import pytest
import torch

from lmforge.model.nf4 import (NF4_CODEBOOK, NF4Linear, codebook, dequantize_nf4, normal_float_codebook,
                                      quantize_nf4)

# QLoRA paper, appendix E (also bitsandbytes' NF4 table)
PAPER = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
         -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
         0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
         0.7229568362236023, 1.0]


def test_codebook_is_the_papers_16_values() -> None:
    assert list(NF4_CODEBOOK) == PAPER
    torch.testing.assert_close(normal_float_codebook(), codebook(), atol=1e-6, rtol=0)  # derived from N(0,1)


def test_round_trip_error_is_within_half_a_level_gap() -> None:
    w = torch.randn(96, 128) * 0.02
    q = quantize_nf4(w)
    err = (dequantize_nf4(q) - w).abs().view(-1, 64)
    absmax = w.abs().view(-1, 64).amax(dim=1, keepdim=True)
    half_gap = (codebook()[1:] - codebook()[:-1]).max() / 2  # 0.1385: between 0.7230 and 1.0
    assert bool((err <= absmax * (half_gap + 0.01)).all())  # + double-quantized absmax error
    rel = (dequantize_nf4(q) - w).norm() / w.norm()
    assert rel < 0.12  # ~0.1 for normal weights at 4 bits


def test_exact_levels_survive() -> None:
    w = codebook().repeat(8) * 3.0  # one block of 64 holding every level times absmax 3
    torch.testing.assert_close(dequantize_nf4(quantize_nf4(w, double_quant=False)), w)


@pytest.mark.parametrize("double_quant,bits", [(True, 4 + 8 / 64 + 32 / (64 * 256)), (False, 4 + 32 / 64)])
def test_double_quantization_memory(double_quant: bool, bits: float) -> None:
    w = torch.randn(1024, 1024)
    q = quantize_nf4(w, double_quant=double_quant)
    assert q.bits_per_parameter() == pytest.approx(bits, abs=1e-3)  # paper: 0.5 -> 0.127 bits of constants


def test_odd_sizes_pad_and_come_back_in_shape() -> None:
    w = torch.randn(7, 13)
    assert dequantize_nf4(quantize_nf4(w)).shape == (7, 13)


def test_nf4_linear_gradient_wrt_input_uses_dequantized_weight() -> None:
    base = torch.nn.Linear(64, 16)
    layer = NF4Linear(base.weight, base.bias)
    x = torch.randn(3, 64, requires_grad=True)
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, layer.dequantize().sum(0).expand(3, 64))


def test_equals_bitsandbytes_nf4_when_installed() -> None:
    """Same codes and values as bitsandbytes' NF4 (block 64); with double quantization the same error."""
    functional = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(256, 512) * 0.02
    q, state = functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    torch.testing.assert_close(dequantize_nf4(quantize_nf4(w, double_quant=False)), functional.dequantize_4bit(q, state),
                               atol=0, rtol=0)
    q, state = functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    theirs = (functional.dequantize_4bit(q, state) - w).norm() / w.norm()
    ours = (dequantize_nf4(quantize_nf4(w)) - w).norm() / w.norm()
    assert abs(float(ours - theirs)) < 0.002

"""Dequantize the common GGUF block types (Q4_0, Q4_1, Q8_0) with multithreaded torch ops.

The `gguf` library's numpy dequantization is single-threaded and took ~1.2 s of SmolLM2's 2.4 s
load; these few vectorized ops give the same fp32 values bit for bit (the same products and sums,
in the same order; tests compare them) in a fraction of that. Every other type goes to `gguf`.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from gguf import GGMLQuantizationType

Q = GGMLQuantizationType
BLOCK_BYTES = {Q.Q4_0: 18, Q.Q4_1: 20, Q.Q8_0: 34}  # per 32 weights: fp16 scale (and min), then codes


def _half(column: torch.Tensor) -> torch.Tensor:
    """Two bytes per block as an fp16 number, widened to fp32: (blocks, 1)."""
    return column.contiguous().view(torch.float16).float()


def _nibbles(codes: torch.Tensor) -> torch.Tensor:
    """16 bytes per block -> 32 codes: byte j holds weight j (low nibble) and weight j + 16 (high)."""
    return torch.cat([codes & 15, codes >> 4], dim=1)


def dequantize(data: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> torch.Tensor | None:
    """fp32 weights of `shape` from the stored bytes `data`, or None for a type this module leaves to gguf."""
    if qtype not in BLOCK_BYTES:
        return None
    with warnings.catch_warnings():  # the bytes are a read-only memory map; they are only read here
        warnings.simplefilter("ignore", UserWarning)
        blocks = torch.from_numpy(data).view(-1, BLOCK_BYTES[qtype])
    if qtype == Q.Q8_0:
        out = blocks[:, 2:].contiguous().view(torch.int8).float().mul_(_half(blocks[:, :2]))
    elif qtype == Q.Q4_0:
        out = (_nibbles(blocks[:, 2:]).to(torch.int8) - 8).float().mul_(_half(blocks[:, :2]))
    else:  # Q4_1: d * q + m
        out = _nibbles(blocks[:, 4:]).float().mul_(_half(blocks[:, :2])).add_(_half(blocks[:, 2:4]))
    return out.view(shape)

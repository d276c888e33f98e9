"""NF4: 4-bit NormalFloat weights with double-quantized absmax constants (QLoRA).

Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", https://arxiv.org/abs/2305.14314
Weights are split into blocks of 64; each block is scaled by its absmax into [-1, 1] and every
value is rounded to the nearest of 16 NormalFloat levels (quantiles of N(0, 1), section 3).
Double quantization (section 3) stores the fp32 absmax constants as 8-bit values in blocks of
256 (after subtracting their mean): 0.5 bits/parameter of constants become 8/64 + 32/(64*256)
= 0.127, so a weight costs 4.127 bits instead of 4.5. Compression (lmforge/compression) reuses it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# QLoRA appendix E / bitsandbytes `create_normal_map(0.9677083)`: 8 positive and 7 negative
# normal quantiles plus an exact zero, normalised to [-1, 1].
NF4_CODEBOOK = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
BLOCK_SIZE = 64  # weights per absmax constant (paper: 64)
ABSMAX_BLOCK_SIZE = 256  # absmax constants per second-level fp32 scale (paper: 256)


def normal_float_codebook(offset: float = 0.9677083) -> torch.Tensor:
    """The 16 NF4 levels derived from N(0, 1) quantiles (the paper's construction, for tests)."""
    ndtri = torch.special.ndtri
    pos = ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])  # 8 positive levels
    neg = -ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])  # 7 negative levels
    values = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return (values / values.max()).float()


def codebook(device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.tensor(NF4_CODEBOOK, dtype=torch.float32, device=device)


def _blocks(x: torch.Tensor, size: int) -> torch.Tensor:
    """x flattened and zero-padded to (n_blocks, size)."""
    flat = x.reshape(-1)
    pad = (-flat.numel()) % size
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, size)


def quantize_absmax(absmax: torch.Tensor, block: int = ABSMAX_BLOCK_SIZE) -> tuple[torch.Tensor, ...]:
    """Second-level quantization: (int8 codes, fp32 scale per block of 256, fp32 mean)."""
    mean = absmax.mean()
    blocks = _blocks(absmax - mean, block)  # (n, 256)
    scale = blocks.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    codes = torch.round(blocks / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return codes, scale, mean


def dequantize_absmax(codes: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor, n: int) -> torch.Tensor:
    return (codes.float() * scale[:, None]).reshape(-1)[:n] + mean


@dataclass
class NF4Weight:
    """A weight matrix in NF4: packed 4-bit codes plus double-quantized absmax constants."""

    codes: torch.Tensor  # uint8 (numel_padded // 2,), two 4-bit indices per byte
    absmax_codes: torch.Tensor  # int8 (n_absmax_blocks, 256)
    absmax_scale: torch.Tensor  # fp32 (n_absmax_blocks,)
    absmax_mean: torch.Tensor  # fp32 scalar
    shape: tuple[int, ...]
    block_size: int = BLOCK_SIZE

    @property
    def n_blocks(self) -> int:
        return -(-_numel(self.shape) // self.block_size)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"codes": self.codes, "absmax_codes": self.absmax_codes, "absmax_scale": self.absmax_scale,
                "absmax_mean": self.absmax_mean}

    def nbytes(self) -> int:
        """Storage in bytes, everything counted."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def bits_per_parameter(self) -> float:
        return 8 * self.nbytes() / _numel(self.shape)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def quantize_nf4(w: torch.Tensor, block_size: int = BLOCK_SIZE, double_quant: bool = True) -> NF4Weight:
    """Quantize a float tensor to NF4 (block absmax scaling, nearest level, double-quantized absmax)."""
    if block_size % 2:
        raise ValueError(f"block_size={block_size} must be even (two 4-bit codes per byte)")
    blocks = _blocks(w.detach().float(), block_size)  # (n_blocks, 64)
    absmax = blocks.abs().amax(dim=1).clamp(min=1e-12)
    normed = blocks / absmax[:, None]
    levels = codebook(w.device)
    midpoints = (levels[1:] + levels[:-1]) / 2
    idx = torch.bucketize(normed, midpoints).to(torch.uint8).reshape(-1)  # nearest level
    packed = (idx[0::2] << 4) | idx[1::2]
    if double_quant:
        a_codes, a_scale, a_mean = quantize_absmax(absmax)
    else:  # keep fp32 constants, stored as "codes" with unit scale for one code path
        a_codes, a_scale, a_mean = absmax[None], torch.ones(1), torch.zeros(())
    return NF4Weight(packed, a_codes, a_scale, a_mean, tuple(w.shape), block_size)


def dequantize_nf4(q: NF4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float tensor an NF4Weight stands for (computed on the fly, never stored)."""
    n = _numel(q.shape)
    absmax = dequantize_absmax(q.absmax_codes, q.absmax_scale, q.absmax_mean, q.n_blocks)
    values = torch.index_select(_pair_table(q.codes.device), 0, q.codes.int())  # (numel/2, 2): one lookup per byte
    values = values.view(-1, q.block_size) * absmax[:, None]
    return values.view(-1)[:n].view(q.shape).to(dtype)


_PAIR_TABLES: dict[torch.device, torch.Tensor] = {}


def _pair_table(device: torch.device) -> torch.Tensor:
    """(256, 2): byte -> its (high, low) NF4 levels, so dequantization is one gather per byte."""
    device = torch.device(device)
    if device not in _PAIR_TABLES:
        levels = codebook(device)
        _PAIR_TABLES[device] = torch.stack([levels.repeat_interleave(16), levels.repeat(16)], dim=1)
    return _PAIR_TABLES[device]


class _NF4Matmul(torch.autograd.Function):
    """y = x W^T with W dequantized in forward and again in backward, so no float W is kept."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: "NF4Linear") -> torch.Tensor:
        ctx.module = module
        return x @ module.dequantize(x.dtype).t()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ ctx.module.dequantize(grad.dtype), None


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight lives in NF4; `weight` dequantizes on access."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, block_size: int = BLOCK_SIZE,
                 double_quant: bool = True) -> None:
        super().__init__()
        q = quantize_nf4(weight, block_size, double_quant)
        self.shape, self.block_size = q.shape, q.block_size
        self.out_features, self.in_features = weight.shape
        for name, tensor in q.tensors().items():
            self.register_buffer(f"nf4_{name}", tensor)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    @property
    def nf4(self) -> NF4Weight:
        return NF4Weight(self.nf4_codes, self.nf4_absmax_codes, self.nf4_absmax_scale, self.nf4_absmax_mean,
                         self.shape, self.block_size)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_nf4(self.nf4, dtype)

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _NF4Matmul.apply(x, self)
        return y + self.bias if self.bias is not None else y

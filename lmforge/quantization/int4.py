"""Int4 weight-only linear (group-wise round-to-nearest codes) on packed int4 CPU kernels.

Decode (up to 8 rows of fp32 input) runs lmforge's own int4 GEMV (lmforge/kernels/gemv.cpp);
larger batches, and machines where that kernel cannot be built, run torch's packed int4 kernel.

Codes follow the convention of torch's `_weight_int4pack_mm_for_cpu` kernel (and gpt-fast):
w_hat = (q - 8) * scale + zero with q in 0..15, one (scale, zero) per output row and group of
`group_size` input columns. When group_size does not divide the input width (SmolLM2's 576 at
g128) the last group is narrower; the kernel sees zero-padded columns there, which add nothing. GPTQ and AWQ (lmforge/quantization/{gptq,awq}.py) produce the same codes.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from lmforge.kernels import gemv
from lmforge.quantization.lazy_kernel import LazyKernel

GROUP_SIZES = (32, 64, 128)  # the group sizes torch's int4 CPU kernel supports
GEMV_BLOCK = 32  # lmforge's int4 GEMV packs 32 columns per 16 bytes: it needs in_features % 32 == 0
KERNEL_N_MULTIPLE = 16  # the CPU kernel packs rows in blocks of 16; other widths are zero-padded


def group_params(w: Tensor, symmetric: bool) -> tuple[Tensor, Tensor]:
    """Per-row scale and zero for one group of columns w (N, g): w_hat = (q - 8) * scale + zero, q in 0..15.

    Symmetric: scale = absmax / 7, zero = 0. Asymmetric: scale = (max - min) / 15, zero = min + 8 * scale,
    so q = 0 is the minimum and q = 15 the maximum. Scales are clamped to >= 1e-8. Leading dimensions
    broadcast: w (..., g) gives scale and zero (...,). Returns fp32.
    """
    w = w.detach().float()
    if symmetric:
        scale = (w.abs().amax(dim=-1) / 7).clamp(min=1e-8)
        zero = torch.zeros_like(scale)
    else:
        lo, hi = w.aminmax(dim=-1)
        scale = ((hi - lo) / 15).clamp(min=1e-8)
        zero = lo + 8 * scale
    return scale, zero


def quantize_codes(w: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """q = clamp(round((w - zero) / scale) + 8, 0, 15) for w (N, g), scale/zero (N,) -> uint8 (N, g)."""
    q = torch.round((w.detach().float() - zero[..., None]) / scale[..., None]).add_(8)
    return q.clamp_(0, 15).to(torch.uint8)


def check_group_size(in_features: int, group_size: int) -> None:
    """Raise ValueError unless group_size is one the kernel supports (a ragged last group is fine)."""
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size={group_size} is not supported; use one of {GROUP_SIZES}")


def n_groups(in_features: int, group_size: int) -> int:
    """Groups per row, the last one narrower when group_size does not divide in_features."""
    return -(-in_features // group_size)


def pad_columns(w: Tensor, width: int, mode: str = "replicate") -> Tensor:
    """w (N, K) -> (N, width): repeating the last column keeps a group's min/max/absmax unchanged."""
    pad = width - w.shape[1]
    if pad == 0:
        return w
    fill = w[:, -1:].expand(-1, pad) if mode == "replicate" else w.new_full((w.shape[0], pad), 8)
    return torch.cat([w, fill], dim=1)


def dequantize_int4(q: Tensor, scale: Tensor, zero: Tensor, group_size: int) -> Tensor:
    """The fp32 (N, K) matrix of codes q (N, K) in 0..15 with scale/zero (N, ceil(K / group_size))."""
    n, k = q.shape
    padded = pad_columns(q.float(), scale.shape[1] * group_size)
    groups = (padded.reshape(n, -1, group_size) - 8) * scale[..., None] + zero[..., None]
    return groups.reshape(n, -1)[:, :k]


def quantize_rtn(w: Tensor, group_size: int = 128, symmetric: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Round-to-nearest int4 codes of w (N, K): (q uint8 (N, K), scale, zero fp32 (N, ceil(K / group_size)))."""
    n, k = w.shape
    check_group_size(k, group_size)
    padded = pad_columns(w.detach().float(), n_groups(k, group_size) * group_size)
    groups = padded.reshape(n, -1, group_size)  # (N, G, g), all groups at once
    scale, zero = group_params(groups, symmetric)
    return quantize_codes(groups, scale, zero).reshape(n, -1)[:, :k].contiguous(), scale, zero


def pack_nibbles(q: Tensor) -> Tensor:
    """uint8 codes (N, K) in 0..15 -> (N, K // 2), column 2j in the low nibble, 2j+1 in the high one."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(packed: Tensor) -> Tensor:
    """Inverse of pack_nibbles: (N, K // 2) -> uint8 (N, K)."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).view(packed.shape[0], -1)


@functools.lru_cache(maxsize=1)
def _cpu_kernel_ops() -> tuple:
    """torch's packed int4 CPU kernel (convert, matmul); RuntimeError naming it if this build lacks it."""
    ops = torch.ops.aten
    if not (hasattr(ops, "_convert_weight_to_int4pack_for_cpu") and hasattr(ops, "_weight_int4pack_mm_for_cpu")):
        raise RuntimeError("this torch build has no torch.ops.aten._weight_int4pack_mm_for_cpu / "
                           "_convert_weight_to_int4pack_for_cpu; Int4Linear needs that int4 CPU kernel "
                           f"(torch {torch.__version__})")
    return ops._convert_weight_to_int4pack_for_cpu, ops._weight_int4pack_mm_for_cpu


class Int4Linear(LazyKernel):
    """A frozen int4 weight-only linear: portable codes in the state_dict, kernel packing built lazily.

    Buffers: `qweight` uint8 (N, K // 2) two codes per byte, `scale` and `zero` fp32 (N, ceil(K / group_size)).
    forward returns x.dtype; torch's kernel (batches over 8 rows) computes in bf16, lmforge's GEMV in fp32
    (with int8-rounded inputs on VNNI CPUs).
    """

    def __init__(self, in_features: int, out_features: int, group_size: int = 128, bias: bool = False,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        check_group_size(in_features, group_size)
        if in_features % 2:
            raise ValueError(f"in_features={in_features} must be even (two int4 codes per byte)")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = n_groups(in_features, group_size)
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.ones(out_features, groups, device=device))
        self.register_buffer("zero", torch.zeros(out_features, groups, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_codes(cls, q: Tensor, scale: Tensor, zero: Tensor, group_size: int,
                   bias: Tensor | None = None) -> "Int4Linear":
        """Wrap codes q (N, K) in 0..15 with scale/zero (N, ceil(K / group_size)): w = (q - 8) * scale + zero."""
        n, k = q.shape
        if q.dtype.is_floating_point or int(q.min()) < 0 or int(q.max()) > 15:
            raise ValueError(f"int4 codes must be integers in 0..15, got dtype {q.dtype} "
                             f"range [{q.min().item()}, {q.max().item()}]")
        expected = (n, n_groups(k, group_size))
        if tuple(scale.shape) != expected or tuple(zero.shape) != expected:
            raise ValueError(f"scale {tuple(scale.shape)} and zero {tuple(zero.shape)} must both be {expected} "
                             f"for codes {tuple(q.shape)} with group_size={group_size}")
        module = cls(k, n, group_size, bias is not None, device=q.device)
        module.qweight.copy_(pack_nibbles(q))
        module.scale.copy_(scale.float())
        module.zero.copy_(zero.float())
        if bias is not None:
            module.bias.data.copy_(bias.detach().float())
        module.reset_kernel()
        return module

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128, symmetric: bool = False) -> "Int4Linear":
        """Round-to-nearest int4 of a float linear."""
        q, scale, zero = quantize_rtn(linear.weight, group_size, symmetric)
        return cls.from_codes(q, scale, zero, group_size, linear.bias)

    @property
    def padded_in(self) -> int:
        """Input width the kernel sees: in_features rounded up to whole groups."""
        return self.scale.shape[1] * self.group_size

    @property
    def codes(self) -> Tensor:
        """uint8 (N, K) codes in 0..15."""
        return unpack_nibbles(self.qweight)

    @property
    def weight(self) -> Tensor:
        """The dequantized fp32 (N, K) weight (for inspection, tests and export; forward never builds it)."""
        return dequantize_int4(self.codes, self.scale, self.zero, self.group_size)

    def kernel_weight(self) -> tuple[Tensor, Tensor]:
        """(packed int4 weight, bf16 scales_and_zeros (K // g, N, 2)) for torch's kernel, built on first use.

        Call reset_kernel() after editing the buffers in place (loading and .to() do it themselves).
        """
        cache = self._packings()
        if "torch" not in cache:
            convert, _ = _cpu_kernel_ops()
            pad = (-self.out_features) % KERNEL_N_MULTIPLE  # extra rows of zero weight, sliced off the output
            codes = pad_columns(self.codes.to(torch.int32), self.padded_in, mode="code8")  # ragged last group
            codes = nn.functional.pad(codes, (0, 0, 0, pad), value=8)
            scale, zero = (nn.functional.pad(t, (0, 0, 0, pad)) for t in (self.scale, self.zero))
            packed = convert(codes.contiguous(), 1)  # inner_k_tiles=1
            scales_and_zeros = torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()
            cache["torch"] = (packed, scales_and_zeros)
        return cache["torch"]

    def gemv_weight(self) -> Tensor:
        """The codes in lmforge's GEMV block layout (N, K // 2), built on first use."""
        cache = self._packings()
        if "gemv" not in cache:
            cache["gemv"] = gemv.extension().int4_pack(self.codes)
        return cache["gemv"]

    def _packings(self) -> dict:
        if self.qweight.device.type != "cpu":
            raise RuntimeError(f"Int4Linear has kernels only on the CPU (lmforge's int4 GEMV and torch.ops.aten."
                               f"_weight_int4pack_mm_for_cpu); weights are on {self.qweight.device}; move the "
                               f"model to the CPU or use nf4 there")
        if self._kernel_cache is None:
            self._kernel_cache = {}
        return self._kernel_cache

    def kernel(self, x2d: Tensor) -> Tensor:
        """x2d (M, K) -> (M, N) in x2d's dtype: lmforge's GEMV for a few rows, else torch's int4 kernel."""
        if x2d.shape[0] <= gemv.MAX_ROWS and self.in_features % GEMV_BLOCK == 0 and gemv.extension() is not None:
            packed = self.gemv_weight()
            y = gemv.extension().int4_linear(x2d.float().contiguous(), packed, self.scale.contiguous(),
                                             self.zero.contiguous(), self.group_size)
            return y.to(x2d.dtype)
        packed, scales_and_zeros = self.kernel_weight()
        _, mm = _cpu_kernel_ops()
        xb = x2d.to(torch.bfloat16)  # fp32 input takes a ~30x slower fallback in torch's kernel
        if self.padded_in != self.in_features:  # zero inputs for the ragged group's padding columns
            xb = nn.functional.pad(xb, (0, self.padded_in - self.in_features))
        y = mm(xb, packed, self.group_size, scales_and_zeros)  # (M, N padded)
        if y.shape[1] != self.out_features:
            y = y[:, :self.out_features]
        return y.to(x2d.dtype)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, Int4Linear expects {self.in_features}")
        x2d = x.reshape(-1, self.in_features)
        y = self.matmul(x2d)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"

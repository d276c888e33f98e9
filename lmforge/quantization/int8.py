"""Int8 linears on fbgemm's int8 GEMM: dynamic (activation scale per call) and static (calibrated scale).

Weights are int8, symmetric, one scale per output channel; activations are uint8 with a zero point
(asymmetric, per tensor), as in Jacob et al. 2018, "Quantization and Training of Neural Networks for
Efficient Integer-Arithmetic-Only Inference", https://arxiv.org/abs/1712.05877. The state_dict holds
the portable int8 weight and fp32 scales; fbgemm's packed weight is built lazily and never saved.
Per-tensor activation scales suffer from LLMs' outlier features (Dettmers et al. 2022, LLM.int8(),
https://arxiv.org/abs/2208.07339): SmolLM2's down_proj inputs reach |x| ~ 2800 against a mean of 0.2.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Iterator, Literal

import torch
from torch import Tensor, nn

from lmforge.quantization.lazy_kernel import LazyKernel

WEIGHT_QMAX = 127  # symmetric int8 weights in -127..127 (no -128, so the scale is exact both ways)
ObserverMethod = Literal["minmax", "percentile"]


def quantize_per_channel(w: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel int8 of w (N, K): (q int8 (N, K), scale fp32 (N,)), w ~ q * scale."""
    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / WEIGHT_QMAX).clamp(min=1e-8)
    q = torch.round(w / scale[:, None]).clamp(-WEIGHT_QMAX, WEIGHT_QMAX).to(torch.int8)
    return q, scale


def dequantize_int8(q: Tensor, scale: Tensor) -> Tensor:
    """The fp32 (N, K) matrix of int8 codes q (N, K) with per-channel scale (N,)."""
    return q.float() * scale[:, None]


@contextlib.contextmanager
def _fbgemm() -> Iterator[None]:
    """torch's quantized engine set to fbgemm, with the qtensor deprecation warnings silenced, restored after."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        raise RuntimeError("this torch build has no fbgemm quantized engine (torch.ops.quantized.linear_dynamic); "
                           f"int8 linears need it; supported engines: {torch.backends.quantized.supported_engines}")
    previous = torch.backends.quantized.engine
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.quantize_per_channel & co. are deprecated in favour of torchao
        torch.backends.quantized.engine = "fbgemm"
        try:
            yield
        finally:
            torch.backends.quantized.engine = previous


def prepack(q: Tensor, scale: Tensor, bias: Tensor | None) -> torch.ScriptObject:
    """fbgemm's packed form of int8 codes q (N, K) with per-channel scale (N,) and an fp32 bias."""
    n = q.shape[0]
    with _fbgemm():
        qw = torch._make_per_channel_quantized_tensor(q, scale.double(), torch.zeros(n, dtype=torch.long), 0)
        return torch.ops.quantized.linear_prepack(qw, None if bias is None else bias.detach().float())


@functools.lru_cache(maxsize=1)
def activation_qmax() -> int:
    """255 where fbgemm's u8 x s8 products accumulate exactly (AVX512-VNNI), else 127 (reduce_range).

    Without VNNI, fbgemm adds pairs of u8*s8 products in int16, which saturates for large codes;
    torch's observers then use 7-bit activations (`reduce_range`). This probes the worst case once.
    """
    k = 64
    packed = prepack(torch.full((1, k), WEIGHT_QMAX, dtype=torch.int8), torch.ones(1), None)
    with _fbgemm():
        y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(torch.full((1, k), 255.0), 1.0, 0,
                                                                              packed)
    return 255 if float(y) == 255.0 * WEIGHT_QMAX * k else 127


class MinMaxObserver:
    """Per-tensor activation range over calibration batches: running min/max, or averaged percentiles."""

    def __init__(self, method: ObserverMethod = "minmax", percentile: float = 99.99) -> None:
        if method not in ObserverMethod.__args__:
            raise ValueError(f"observer method={method!r} is not one of {ObserverMethod.__args__}")
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile={percentile} must be in (50, 100]")
        self.method, self.percentile = method, percentile
        self.lows: list[float] = []
        self.highs: list[float] = []

    def update(self, x: Tensor) -> None:
        flat = x.detach().float().reshape(-1)
        if self.method == "minmax":
            self.lows.append(float(flat.min())), self.highs.append(float(flat.max()))
            return
        n = flat.numel()
        k_hi = max(1, min(n, round(n * self.percentile / 100)))
        self.lows.append(float(flat.kthvalue(n - k_hi + 1).values)), self.highs.append(float(flat.kthvalue(k_hi).values))

    def qparams(self, qmax: int = 255) -> tuple[float, int]:
        """(scale, zero_point) mapping the observed range (widened to hold 0) onto 0..qmax."""
        if not self.lows:
            raise ValueError("the observer saw no calibration data; run calibration batches through the model first")
        if self.method == "minmax":
            lo, hi = min(self.lows), max(self.highs)
        else:
            lo, hi = sum(self.lows) / len(self.lows), sum(self.highs) / len(self.highs)
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        scale = max((hi - lo) / qmax, 1e-8)
        return scale, int(min(max(round(-lo / scale), 0), qmax))


class _Int8Linear(LazyKernel):
    """Shared part: buffers `qweight` int8 (N, K) and `weight_scale` fp32 (N,), lazy fbgemm packing."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    def _set_weight(self, linear: nn.Linear) -> None:
        q, scale = quantize_per_channel(linear.weight)
        self.qweight.copy_(q)
        self.weight_scale.copy_(scale)
        if linear.bias is not None:
            self.bias.data.copy_(linear.bias.detach().float())
        self.reset_kernel()

    @property
    def weight(self) -> Tensor:
        """The dequantized fp32 (N, K) weight (for inspection, tests and export; forward never builds it)."""
        return dequantize_int8(self.qweight, self.weight_scale)

    def packed(self) -> torch.ScriptObject:
        """fbgemm's packed weight (with bias), built on first use; call reset_kernel() after editing buffers."""
        if self._kernel_cache is None:
            if self.qweight.device.type != "cpu":
                raise RuntimeError(f"{type(self).__name__} has a kernel only on the CPU (fbgemm); weights are on "
                                   f"{self.qweight.device}; move the model to the CPU")
            self._kernel_cache = prepack(self.qweight, self.weight_scale, self.bias)
        return self._kernel_cache

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, {type(self).__name__} expects {self.in_features}")
        x2d = x.reshape(-1, self.in_features).float().contiguous()  # fbgemm takes fp32 activations
        y = self.matmul(x2d)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8DynamicLinear(_Int8Linear):
    """Int8 weights per channel; each call quantizes x per tensor from its own min/max (fbgemm linear_dynamic)."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8DynamicLinear":
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, device=linear.weight.device)
        module._set_weight(linear)
        return module

    def kernel(self, x2d: Tensor) -> Tensor:
        return torch.ops.quantized.linear_dynamic(x2d, self.packed(), activation_qmax() < 255)


class Int8StaticLinear(_Int8Linear):
    """Int8 weights per channel, x quantized with a scale and zero point fixed by calibration.

    Kernel: fbgemm's `quantized.linear_with_input_q_dq_qweight_dq_output_fp32`, which quantizes fp32 x
    with the given (scale, zero point), runs the u8 x s8 GEMM with int32 accumulation and returns fp32.
    Measured here at (1, 576) x (576, 1536): ~25 us, like linear_dynamic and ~2.5x faster than fp32;
    `quantized.linear` on a quint8 input took ~42 us (quantize, requantize and dequantize calls) and
    would also round the output to 8 bits with a second calibrated scale; `torch._int_mm` ~250 us.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 device: torch.device | str | None = None) -> None:
        super().__init__(in_features, out_features, bias, device)
        self.register_buffer("input_scale", torch.ones((), device=device))
        self.register_buffer("input_zero_point", torch.zeros((), dtype=torch.long, device=device))
        self._input_qparams = (1.0, 0)  # python copies of the two buffers, taken when the weight is packed

    @classmethod
    def from_linear(cls, linear: nn.Linear, observer: MinMaxObserver) -> "Int8StaticLinear":
        """Quantize a float linear with the activation range its observer recorded during calibration."""
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, device=linear.weight.device)
        module._set_weight(linear)
        scale, zero_point = observer.qparams(activation_qmax())
        module.input_scale.fill_(scale)
        module.input_zero_point.fill_(zero_point)
        module.reset_kernel()
        return module

    def packed(self) -> torch.ScriptObject:
        if self._kernel_cache is None:
            packed = super().packed()  # raises off the CPU before the scalars are read
            self._input_qparams = float(self.input_scale), int(self.input_zero_point)
            return packed
        return self._kernel_cache

    def kernel(self, x2d: Tensor) -> Tensor:
        packed = self.packed()
        scale, zero_point = self._input_qparams
        return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(x2d, scale, zero_point, packed)


class Int8Embedding(nn.Module):
    """A token embedding stored as int8 rows with one fp32 scale per row (symmetric), read as fp32.

    Once a quantized lm_head is untied from the embedding, the float table (SmolLM2: 113 MB of its
    135M-parameter model) would dominate the checkpoint; a lookup dequantizes only the rows it reads.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.register_buffer("qweight", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(num_embeddings, device=device))

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding) -> "Int8Embedding":
        module = cls(embedding.num_embeddings, embedding.embedding_dim, device=embedding.weight.device)
        q, scale = quantize_per_channel(embedding.weight)
        module.qweight.copy_(q)
        module.weight_scale.copy_(scale)
        return module

    @property
    def weight(self) -> Tensor:
        """The dequantized fp32 table (for inspection and export; forward reads only the looked-up rows)."""
        return dequantize_int8(self.qweight, self.weight_scale)

    def forward(self, ids: Tensor) -> Tensor:
        return nn.functional.embedding(ids, self.qweight).float() * self.weight_scale[ids].unsqueeze(-1)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 rows"

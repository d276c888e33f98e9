"""Layers whose weights stay in GGUF's quantized blocks (ggml's layouts) and compute on lmforge's kernels.

A Q4_1 weight is 20 bytes per 32 values where fp32 is 128, and batch-1 decode is bound by reading
weights, so keeping them in their blocks is both smaller and faster: SmolLM2 Q4_1 loads in 106 MiB instead
of 575 MiB, and a decode step takes 12.6 ms of CPU instead of 27.3 ms (one thread, fused step).
`GGUFLinear` multiplies up to 512 rows with lmforge/kernels/gguf_dot.h, 64 rows per call (x stays
fp32, so results equal x @ dequantize(W)^T to fp32 rounding; at 64 rows decoding the blocks is a few
percent of the arithmetic); more rows dequantize a tile of output rows at a time for torch's GEMM, so
a long prefill never holds the whole fp32 weight. `GGUFEmbedding` dequantizes only the rows
it looks up, so a tied embedding and lm_head share one copy of the blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from torch import Tensor, nn

from lmforge.checkpoint import dequant
from lmforge.kernels import gemv

Q = GGMLQuantizationType
NATIVE_TYPES = frozenset({Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q8_0, Q.Q4_K, Q.Q6_K})  # gguf_blocks.h's kernels
TILE_VALUES = 1 << 20  # fp32 values per dequantized tile of a large product (4 MB)
_HALF_FIELDS = {Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q8_0: (0,), Q.Q4_K: (0, 2), Q.Q6_K: (208,)}


def has_kernel(qtype: GGMLQuantizationType) -> bool:
    """Whether tensors of this GGML type can stay in their blocks (lmforge has a kernel for it)."""
    return qtype in NATIVE_TYPES


def row_bytes(qtype: GGMLQuantizationType, k: int) -> int:
    """Bytes of one row of k weights; ValueError when k is not a whole number of blocks."""
    values, size = GGML_QUANT_SIZES[qtype]
    if k <= 0 or k % values:
        raise ValueError(f"a {qtype.name} row of {k} weights is not a whole number of {values}-weight blocks")
    return k // values * size


@dataclass
class BlockTensor:
    """A GGUF tensor kept as stored: `blocks` uint8 (N, bytes per row) of `qtype`, `shape` (N, K) in weights."""

    blocks: Tensor
    qtype: GGMLQuantizationType
    shape: tuple[int, int]

    def dequantize(self) -> Tensor:
        return dequantize_blocks(self.blocks, self.qtype, self.shape[1])


def dequantize_blocks(blocks: Tensor, qtype: GGMLQuantizationType, k: int) -> Tensor:
    """fp32 (N, k) from blocks (N, bytes per row): lmforge's kernel on the CPU, else torch or the gguf library."""
    ext = gemv.extension() if blocks.device.type == "cpu" else None
    if ext is not None and has_kernel(qtype):
        return ext.gguf_dequantize(blocks.contiguous(), int(qtype), k)
    data = blocks.cpu().contiguous().numpy()
    out = dequant.dequantize(data, qtype, (blocks.shape[0], k))  # Q4_0, Q4_1, Q8_0 in multithreaded torch
    if out is None:
        out = torch.from_numpy(gguf_dequantize(data, qtype).astype(np.float32, copy=False).reshape(-1, k))
    return out.to(blocks.device)


def random_blocks(qtype: GGMLQuantizationType, rows: int, k: int, generator: torch.Generator | None = None,
                  scale: float = 0.05) -> Tensor:
    """Valid blocks (rows, bytes per row) of random codes whose fp16 scales (and mins) are uniform in
    [-scale, scale] (tests, benchmarks)."""
    values, size = GGML_QUANT_SIZES[qtype]
    raw = torch.randint(0, 256, (rows * (k // values), size), dtype=torch.uint8, generator=generator)
    for offset in _HALF_FIELDS[qtype]:
        field = (torch.rand(raw.shape[0], generator=generator) * 2 - 1) * scale
        raw[:, offset:offset + 2] = field.half().view(torch.uint8).view(-1, 2)
    return raw.view(rows, row_bytes(qtype, k))


class GGUFLinear(nn.Module):
    """A frozen linear layer over GGUF blocks: lmforge's kernel up to 512 rows, dequantized tiles above.

    Buffers: `blocks` uint8 (out_features, bytes per row), the GGUF tensor's bytes; `bias` fp32 or None.
    """

    def __init__(self, in_features: int, out_features: int, qtype: GGMLQuantizationType, bias: bool = False,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if not has_kernel(qtype):
            raise ValueError(f"GGUFLinear has kernels for {sorted(t.name for t in NATIVE_TYPES)}, not {qtype.name}; "
                             "dequantize such weights into an nn.Linear")
        self.in_features, self.out_features, self.qtype = in_features, out_features, Q(qtype)
        width = row_bytes(self.qtype, in_features)
        self.register_buffer("blocks", torch.zeros(out_features, width, dtype=torch.uint8, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_blocks(cls, tensor: BlockTensor, bias: Tensor | None = None) -> GGUFLinear:
        """Wrap a BlockTensor (N, K) without copying its blocks."""
        n, k = tensor.shape
        module = cls(k, n, tensor.qtype, bias is not None, device="meta")
        module.blocks = tensor.blocks
        if bias is not None:
            module.bias = nn.Parameter(bias.detach().float(), requires_grad=False)
        return module

    @classmethod
    def tied_to(cls, embedding: GGUFEmbedding) -> GGUFLinear:
        """An output projection sharing a GGUFEmbedding's blocks (tied embeddings: one copy in memory)."""
        module = cls(embedding.embedding_dim, embedding.num_embeddings, embedding.qtype, device="meta")
        module.blocks = embedding.blocks
        return module

    @property
    def dtype(self) -> torch.dtype:
        """The dtype forward computes in for fp32 inputs (cheap, unlike `weight.dtype`)."""
        return torch.float32

    @property
    def device(self) -> torch.device:
        return self.blocks.device

    @property
    def weight(self) -> Tensor:
        """The whole dequantized fp32 (N, K) weight: built on every access, for code that reads `.weight`."""
        return self.dequantize()

    def dequantize(self, start: int = 0, stop: int | None = None) -> Tensor:
        """fp32 rows [start, stop) of the weight."""
        return dequantize_blocks(self.blocks[start:stop], self.qtype, self.in_features)

    def _kernel_takes(self, x2d: Tensor) -> bool:
        return (x2d.shape[0] <= gemv.F32_MAX_ROWS and x2d.dtype == torch.float32 and x2d.device.type == "cpu"
                and self.blocks.device.type == "cpu" and not (torch.is_grad_enabled() and x2d.requires_grad)
                and gemv.extension() is not None)

    def _tiled(self, x2d: Tensor) -> Tensor:
        """x2d @ W^T with W dequantized a tile of output rows at a time (peak memory: one tile)."""
        tile = max(256, min(1024, TILE_VALUES // self.in_features))
        parts = [F.linear(x2d, self.dequantize(lo, lo + tile).to(x2d.device, x2d.dtype))
                 for lo in range(0, self.out_features, tile)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, GGUFLinear expects {self.in_features}")
        x2d = x.reshape(-1, self.in_features)
        if x2d.shape[0] == 0:
            y = x2d.new_zeros(0, self.out_features)
        elif self._kernel_takes(x2d):
            parts = [gemv.extension().gguf_linear(rows, self.blocks, int(self.qtype), self.in_features)
                     for rows in x2d.contiguous().split(gemv.GGUF_MAX_ROWS)]
            y = parts[0] if len(parts) == 1 else torch.cat(parts)
        else:
            y = self._tiled(x2d)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.qtype.name}"


class GGUFEmbedding(nn.Module):
    """A token embedding over GGUF blocks: a lookup dequantizes only the rows it reads."""

    def __init__(self, num_embeddings: int, embedding_dim: int, qtype: GGMLQuantizationType,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.qtype = num_embeddings, embedding_dim, Q(qtype)
        width = row_bytes(self.qtype, embedding_dim)
        self.register_buffer("blocks", torch.zeros(num_embeddings, width, dtype=torch.uint8, device=device))

    @classmethod
    def from_blocks(cls, tensor: BlockTensor) -> GGUFEmbedding:
        """Wrap a BlockTensor (vocab, dim) without copying its blocks."""
        module = cls(tensor.shape[0], tensor.shape[1], tensor.qtype, device="meta")
        module.blocks = tensor.blocks
        return module

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return self.blocks.device

    @property
    def weight(self) -> Tensor:
        """The whole dequantized fp32 (vocab, dim) table: built on every access, for code that reads `.weight`."""
        return dequantize_blocks(self.blocks, self.qtype, self.embedding_dim)

    def forward(self, ids: Tensor) -> Tensor:
        flat = ids.reshape(-1)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.num_embeddings):
            raise IndexError(f"token ids must lie in [0, {self.num_embeddings}), got "
                             f"[{int(flat.min())}, {int(flat.max())}]")
        rows = dequantize_blocks(self.blocks.index_select(0, flat.to(self.blocks.device)), self.qtype,
                                 self.embedding_dim)
        return rows.view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, qtype={self.qtype.name}"


def dequantize_model(model: nn.Module) -> nn.Module:
    """Swap every GGUFLinear/GGUFEmbedding in `model` for a plain fp32 Linear/Embedding, in place (for
    code that rewrites weights: export, quantization, LoRA); modules that shared blocks share the weight."""
    from lmforge.model.linear import Linear

    made: dict[int, nn.Parameter] = {}  # id of blocks -> its fp32 weight, so tied modules stay tied
    for name, module in list(model.named_modules()):
        if not isinstance(module, (GGUFLinear, GGUFEmbedding)):
            continue
        key = id(module.blocks)
        if key not in made:
            made[key] = nn.Parameter(module.weight, requires_grad=False)
        if isinstance(module, GGUFEmbedding):
            new = nn.Embedding(module.num_embeddings, module.embedding_dim, device="meta")
            new.weight = made[key]
        else:
            new = Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
            new.weight, new.bias = made[key], module.bias
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, new)
    return model


def float_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """model.state_dict() with every GGUF block module's `blocks` replaced by its fp32 `weight`, leaving the
    model as it is: exporters write a natively loaded model the way they write a dequantized one."""
    state = model.state_dict()
    for name, module in model.named_modules():
        if isinstance(module, (GGUFLinear, GGUFEmbedding)):
            prefix = f"{name}." if name else ""
            if state.pop(f"{prefix}blocks", None) is not None:
                state[f"{prefix}weight"] = module.weight
    return state

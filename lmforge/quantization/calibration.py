"""Calibration for GPTQ and AWQ: input statistics of each linear from real forwards, block by block.

GPTQ (Frantar et al. 2022, https://arxiv.org/abs/2210.17323) needs, per linear, the Hessian proxy
H = 2/n sum_i x_i x_i^T of its n input rows; AWQ (Lin et al. 2023, https://arxiv.org/abs/2306.00978)
needs the mean |x| per input channel and (for its losses) the same X^T X. Both run
sequentially (GPTQ section 4, "quantize one block at a time"): block 0's inputs are captured
once, each block is quantized from its inputs, and its (already quantized) outputs feed the next.
The helpers at the end (untie, targets, swap) are the pipeline both algorithms share.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from lmforge.quantization.int4 import Int4Linear, check_group_size, dequantize_int4
from lmforge.model.surgery import replace_linear

Codes = tuple[Tensor, Tensor, Tensor]  # q uint8 (N, K), scale (N, G), zero (N, G)
BlockForward = Callable[..., list[Tensor]]  # forward(limit=None): the block over the first `limit` batches
QuantizeBlock = Callable[[str, nn.Module, BlockForward], None]  # (name prefix, block, forward)


@dataclass
class LinearStats:
    """Running statistics of one linear's input rows x (K,): sum x x^T and sum |x| over n rows.

    AWQ's losses ||X D^T||^2 = sum(D (X^T X) * D) use the same sum, so no input rows are kept.
    """

    in_features: int
    rows: int = 0
    xtx: Tensor | None = None  # (K, K) fp64
    abs_sum: Tensor | None = None  # (K,) fp64

    def add(self, x: Tensor) -> None:
        """Accumulate the rows of x (..., K)."""
        x64 = x.detach().reshape(-1, self.in_features).double()
        xtx = x64.t() @ x64
        self.xtx = xtx if self.xtx is None else self.xtx + xtx
        abs_sum = x64.abs().sum(0)
        self.abs_sum = abs_sum if self.abs_sum is None else self.abs_sum + abs_sum
        self.rows += x64.shape[0]

    @property
    def hessian(self) -> Tensor:
        """H = 2/n sum x x^T, fp64 (K, K)."""
        if self.xtx is None:
            raise ValueError("no Hessian: this linear saw no calibration rows")
        return self.xtx * (2.0 / self.rows)

    @property
    def abs_mean(self) -> Tensor:
        """Mean |x| per input channel, fp32 (K,)."""
        if self.abs_sum is None:
            raise ValueError("no statistics: this linear saw no calibration rows")
        return (self.abs_sum / self.rows).float()


class StatsCollector:
    """Forward pre-hooks on named linears that accumulate their LinearStats while forwards run."""

    def __init__(self, linears: dict[str, nn.Module]) -> None:
        self.linears = linears
        self.stats = {name: LinearStats(lin.in_features) for name, lin in linears.items()}
        self._handles: list = []

    def __enter__(self) -> "StatsCollector":
        for name, lin in self.linears.items():
            stats = self.stats[name]
            self._handles.append(lin.register_forward_pre_hook(lambda _m, args, s=stats: s.add(args[0])))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def named_linears(module: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear under module by qualified name."""
    return {name: m for name, m in module.named_modules() if isinstance(m, nn.Linear)}


def input_groups(block: nn.Module, run_once: Callable[[], object]) -> list[list[str]]:
    """The block's linears in call order, grouped by shared input tensor (q/k/v, gate/up, then o, down)."""
    calls: list[tuple[str, Tensor]] = []
    linears = named_linears(block)
    handles = [lin.register_forward_pre_hook(lambda _m, args, n=name: calls.append((n, args[0])))
               for name, lin in linears.items()]
    try:
        run_once()
    finally:
        for handle in handles:
            handle.remove()
    groups: list[list[str]] = []
    last: Tensor | None = None
    for name, x in calls:
        if any(name in g for g in groups):
            continue
        if last is not None and x is last:
            groups[-1].append(name)
        else:
            groups.append([name])
        last = x
    return groups


class _Stop(Exception):
    """Raised by a hook to end a forward once what it needs is captured."""


def capture_block_inputs(model: nn.Module, calibration: list[Tensor]) -> tuple[list[Tensor], list[list]]:
    """Block 0's input hidden states per batch, and each block's attention context per batch.

    The contexts are the ones Transformer.forward builds (rope tables, masks), captured by
    pre-hooks on the blocks; the forward stops at the last block.
    """
    layers = model.model.layers
    device = model.lm_head.weight.device
    hidden: list[Tensor] = []
    contexts: list[list] = []

    def hook(index: int):
        def fn(_module, args):
            if index == 0:
                hidden.append(args[0].detach())
            contexts[-1].append(args[1])
            if index == len(layers) - 1:
                raise _Stop
        return fn

    handles = [layer.register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        for batch in calibration:
            contexts.append([])
            try:
                model(batch.to(device))
            except _Stop:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return hidden, contexts


def check_calibration(calibration: list[Tensor]) -> None:
    """ValueError unless calibration is a non-empty list of (B, T) integer token batches."""
    if not calibration:
        raise ValueError("calibration is empty; pass a list of (1, T) LongTensor token batches")
    for i, batch in enumerate(calibration):
        if batch.dim() != 2 or batch.dtype.is_floating_point:
            raise ValueError(f"calibration[{i}] has shape {tuple(batch.shape)} dtype {batch.dtype}; "
                             f"each batch must be a (B, T) LongTensor of token ids")


@torch.no_grad()
def run_blockwise(model: nn.Module, calibration: list[Tensor], quantize_block: QuantizeBlock,
                  desc: str = "quantize") -> list[Tensor]:
    """Quantize block by block on re-fed calibration activations; returns lm_head's inputs per batch.

    quantize_block(prefix, block, forward) may call forward() (the block over every batch, with the
    weights as they are now; forward(1): the first batch only) as often as it needs; afterwards the
    block's outputs become the next inputs.
    """
    from tqdm.auto import tqdm

    check_calibration(calibration)
    hidden, contexts = capture_block_inputs(model, calibration)
    for i, block in enumerate(tqdm(model.model.layers, desc=desc, unit="block", dynamic_ncols=True)):
        ctxs = [c[i] for c in contexts]

        def forward(limit: int | None = None, block=block, ctxs=ctxs, hidden=hidden) -> list[Tensor]:
            return [block(x, ctx) for x, ctx in zip(hidden[:limit], ctxs[:limit])]

        quantize_block(f"model.layers.{i}.", block, forward)
        hidden = forward()
    return [model.model.norm(x) for x in hidden]


def untie_lm_head(model: nn.Module) -> None:
    """Give lm_head its own copy of a weight tied to the embedding (the embedding stays float)."""
    if model.lm_head.weight is model.model.embed_tokens.weight:
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone(), requires_grad=False)


def quantizable(model: nn.Module, group_size: int, include_lm_head: bool) -> Iterator[tuple[str, nn.Linear]]:
    """The linears to quantize (every block linear, and lm_head if asked), their group size checked."""
    linears = {f"model.layers.{name}": lin for name, lin in named_linears(model.model.layers).items()}
    if include_lm_head and isinstance(model.lm_head, nn.Linear):
        linears["lm_head"] = model.lm_head
    for name, lin in linears.items():
        try:
            check_group_size(lin.in_features, group_size)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
        yield name, lin


def write_fake_quant(linear: nn.Linear, codes: Codes, group_size: int) -> None:
    """Overwrite a float linear's weight with its dequantized codes (in place, strides kept)."""
    q, scale, zero = codes
    linear.weight.data.copy_(dequantize_int4(q, scale, zero, group_size).to(linear.weight.dtype))


def swap_in_int4(model: nn.Module, codes: dict[str, Codes], group_size: int) -> nn.Module:
    """Replace each linear named in codes by Int4Linear.from_codes (in place)."""

    def make(name: str, linear: nn.Linear) -> nn.Module | None:
        if name not in codes:
            return None
        q, scale, zero = codes[name]
        return Int4Linear.from_codes(q, scale, zero, group_size, linear.bias)

    replace_linear(model, make)
    missing = set(codes) - {n for n, m in model.named_modules() if isinstance(m, Int4Linear)}
    assert not missing, f"linears not swapped: {sorted(missing)}"
    return model

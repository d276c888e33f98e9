"""Base of quantized modules whose kernel wants its own packing of the saved buffers.

The state_dict keeps portable codes and scales; the kernel's packed form (fbgemm's prepacked int8
weight, torch's int4pack layout) is built on first use and dropped whenever the buffers may have
changed (loading, `.to()`, `reset_kernel()`), so it is never saved and never stale. A subclass
provides `kernel(x2d)` and a dequantized `weight` (used only for the input gradient).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


class _KernelMatmul(torch.autograd.Function):
    """y = module.kernel(x); backward (only when x needs a gradient) uses the dequantized `weight`."""

    @staticmethod
    def forward(ctx, x2d: Tensor, module: "LazyKernel") -> Tensor:
        ctx.module = module
        return module.kernel(x2d)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad @ ctx.module.weight.to(grad.dtype), None


class LazyKernel(nn.Module):
    _kernel_cache: Any = None

    def matmul(self, x2d: Tensor) -> Tensor:
        """x2d (M, K) through the subclass's `kernel`, differentiable in x when x needs a gradient."""
        if x2d.requires_grad and torch.is_grad_enabled():
            return _KernelMatmul.apply(x2d, self)
        return self.kernel(x2d)

    def reset_kernel(self) -> None:
        """Drop the packing so the next call packs the current buffers (after editing them in place)."""
        self._kernel_cache = None

    def _apply(self, *args, **kwargs):  # .to(), .cpu(), ...: buffers may move, repack lazily
        self.reset_kernel()
        return super()._apply(*args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self.reset_kernel()
        super()._load_from_state_dict(*args, **kwargs)

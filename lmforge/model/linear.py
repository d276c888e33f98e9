"""The model's linear layer: nn.Linear, with batch-few inference calls on lmforge's GEMV kernel.

Decode feeds one row per sequence; there torch's F.linear (MKL) spends most of its time outside
the weight reads, so those calls go to lmforge/kernels/gemv.cpp. Training, prefill and anything
the kernel does not take (other dtypes, devices, layouts) stay on F.linear; results agree to
float rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.kernels import gemv


class Linear(nn.Linear):
    """nn.Linear (same parameters, state_dict and isinstance) with a fast path for decode."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, x.shape[-1])
        if not gemv.usable(x2d, self.weight):
            return F.linear(x, self.weight, self.bias)
        y = gemv.extension().linear_f32(x2d.contiguous(), self.weight)
        if self.bias is not None:
            y += self.bias
        return y.view(*x.shape[:-1], self.out_features)


def is_plain_linear(module: nn.Module) -> bool:
    """A float linear layer as such: nn.Linear or ours, not a subclass that wraps or quantizes it."""
    return type(module) in (nn.Linear, Linear)

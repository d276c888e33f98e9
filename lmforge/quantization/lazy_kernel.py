"""Base of quantized modules whose kernel wants its own packing of the saved buffers.

The state_dict keeps portable codes and scales; the kernel's packed form (fbgemm's prepacked int8
weight, torch's int4pack layout) is built on first use and dropped whenever the buffers may have
changed (loading, `.to()`, `reset_kernel()`), so it is never saved and never stale.
"""

from __future__ import annotations

from typing import Any

from torch import nn


class LazyKernel(nn.Module):
    _kernel_cache: Any = None

    def reset_kernel(self) -> None:
        """Drop the packing so the next call packs the current buffers (after editing them in place)."""
        self._kernel_cache = None

    def _apply(self, *args, **kwargs):  # .to(), .cpu(), ...: buffers may move, repack lazily
        self.reset_kernel()
        return super()._apply(*args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self.reset_kernel()
        super()._load_from_state_dict(*args, **kwargs)

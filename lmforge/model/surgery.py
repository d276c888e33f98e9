"""Module surgery shared by the stages that rewrite a model in place (LoRA, quantization, loading):
swap linear layers by name, then hand the memory the old weights held back to the OS."""

from __future__ import annotations

from typing import Callable

from torch import nn


def replace_linear(module: nn.Module, make: Callable[[str, nn.Linear], nn.Module | None], prefix: str = "") -> None:
    """Swap every nn.Linear for `make(qualified_name, linear)` when it returns a module."""
    for name, child in module.named_children():
        full = f"{prefix}{name}"
        if isinstance(child, nn.Linear):
            new = make(full, child)
            if new is not None:
                setattr(module, name, new)
        else:
            replace_linear(child, make, f"{full}.")


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc `malloc_trim`): without it the fp32 weights that a
    quantized layer replaced stay in the process's arenas and count against it. A no-op elsewhere."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass

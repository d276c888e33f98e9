"""Keep freed CPU memory in the process instead of returning it to the kernel after every op.

glibc hands each allocation above its mmap threshold (128 KiB at first, raised dynamically up to
32 MiB) its own mmap, and munmaps it on free: a training step frees and re-allocates the same
(tokens x hidden) activations hundreds of times, and every fresh mapping is zero-filled page by
page on first touch. Measured on SmolLM2's LoRA step: a (4, 256, 1536) fp32 multiply took 14.6 ms
with fresh mappings, 3.7 ms with reused heap memory. `mallopt` (glibc, man 3 mallopt) switches
that off for the process: no mmap for allocations, no trimming of the heap's free top. The usual
alternative is preloading jemalloc or tcmalloc, which PyTorch's CPU performance guide recommends.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # <malloc.h>
_applied = False


def keep_freed_memory(trim_threshold: int = 1 << 30) -> bool:
    """Serve every allocation from the heap and keep up to `trim_threshold` bytes of free heap;
    True where glibc took the settings (once per process), False elsewhere (musl, macOS) or when
    LMFORGE_KEEP_FREED_MEMORY=0 asks for glibc's defaults."""
    global _applied
    if _applied:
        return True
    if os.environ.get("LMFORGE_KEEP_FREED_MEMORY") == "0":
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))
    return _applied

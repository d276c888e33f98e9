"""lmforge's own CPU decode kernels (f32.h, gemv.h, gguf_blocks.h, gguf_dot.h, attention.h, vecmath.h, gemv.cpp, decode.cpp, gguf_blocks.cpp), compiled once per machine and loaded from a cache.

Batch-1 decode is a chain of matrix-vector products bound by reading the weights; MKL's GEMV and
torch's int4 kernel lose most of their time to per-call overhead at these sizes (see
docs/benchmarks.md). The C++ sources are built with torch's extension builder on first use (about
25 s, needs a C++ compiler) into $LMFORGE_KERNEL_CACHE, else $XDG_CACHE_HOME/lmforge/kernels, keyed
by the source, torch version and CPU flags; later processes import the built library directly.
Without a compiler, or with LMFORGE_KERNELS=0, `extension()` is None and callers use torch's ops.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import platform
import sys
import warnings
from pathlib import Path
from types import ModuleType

import torch

SOURCES = [Path(__file__).with_name(name) for name in ("gemv.cpp", "decode.cpp", "gguf_blocks.cpp", "gemv.h", "f32.h",
                                                       "gguf_blocks.h", "gguf_dot.h", "attention.h", "vecmath.h")]
FLAGS = ["-O3", "-march=native", "-fopenmp"]
MAX_ROWS = 8  # rows of x per int4 call (the kernel's limit); more rows go to torch's int4 kernel
F32_MAX_ROWS = 512  # rows of x per fp32 call (1.07-1.2x MKL at 128-512 rows, docs/benchmarks.md); more go to MKL
GGUF_MAX_ROWS = 64  # rows of x per gguf_linear call (gguf_blocks.h's kGGUFMaxRows); more dequantize tiles
PAGED_MAX_ROWS = 64  # sequences per fused paged decode step (decode.cpp's kPagedMaxRows, the engine's default batch)


def cache_root() -> Path:
    """Where built kernels live: $LMFORGE_KERNEL_CACHE, else $XDG_CACHE_HOME/lmforge/kernels."""
    if os.environ.get("LMFORGE_KERNEL_CACHE"):
        return Path(os.environ["LMFORGE_KERNEL_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lmforge" / "kernels"


def _cpu_flags() -> str:
    """The CPU's feature flags (the build uses -march=native, so a different CPU needs its own build)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def build_key(sources: list[Path] = SOURCES) -> str:
    """The cache key of a build: its sources, torch and Python versions, flags and this CPU's features."""
    digest = hashlib.sha256(b"".join(path.read_bytes() for path in sources))
    for part in (torch.__version__, sys.version, " ".join(FLAGS), _cpu_flags()):
        digest.update(part.encode())
    return digest.hexdigest()[:16]


def _import(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build(directory: Path, name: str, sources: list[Path] = SOURCES, what: str = "CPU decode kernels") -> ModuleType:
    from torch.utils.cpp_extension import load

    directory.mkdir(parents=True, exist_ok=True)
    scripts = str(Path(sys.executable).parent)  # pip's ninja lives beside python, maybe not on PATH
    if scripts not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = scripts + os.pathsep + os.environ.get("PATH", "")
    print(f"lmforge: compiling the {what} once into {directory} (about 25 s)", file=sys.stderr)
    return load(name, [str(path) for path in sources if path.suffix == ".cpp"], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"],
                build_directory=str(directory), verbose=False)


@functools.lru_cache(maxsize=1)
def extension() -> ModuleType | None:
    """The compiled kernels, building them on first use; None (with one warning) when they cannot be."""
    if os.environ.get("LMFORGE_KERNELS", "1") == "0":
        return None
    key = build_key()
    name = f"lmforge_gemv_{key}"
    directory = cache_root() / key
    try:
        built = directory / f"{name}.so"
        return _import(built, name) if built.exists() else _build(directory, name)
    except Exception as err:  # no compiler, no headers, a read-only cache: torch's own ops still work
        warnings.warn(f"lmforge's CPU decode kernels are unavailable ({type(err).__name__}: "
                      f"{str(err).splitlines()[0] if str(err) else ''}); decode falls back to torch's "
                      f"matmul kernels, which are slower at batch 1. Install a C++ compiler (g++) to build "
                      f"them, or set LMFORGE_KERNELS=0 to silence this.", stacklevel=2)
        return None


def usable(x2d: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether linear_f32 takes this call: up to 512 fp32 CPU rows, a row-major fp32 weight, no autograd."""
    return (x2d.shape[0] <= F32_MAX_ROWS and x2d.dtype == torch.float32 and weight.dtype == torch.float32
            and x2d.device.type == "cpu" and weight.device.type == "cpu" and weight.is_contiguous()
            and not torch.is_grad_enabled() and extension() is not None)

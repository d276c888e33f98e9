"""lmforge's fused CPU kernels for encoder inference (encoder.cpp): bias + GELU, bias + residual +
LayerNorm, attention over packed variable-length sequences (encoder_attention.h), and fp32 linears as
bf16x3 products on AMX tiles where the CPU has them (encoder_gemm.h).

Built like the decode kernels (gemv.py: torch's extension builder on first use, cached per source,
torch version and CPU), but as their own small library, so neither rebuilds when the other changes.
Without a compiler, or with LMFORGE_KERNELS=0, `extension()` is None and callers use torch's ops.
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path
from types import ModuleType

from lmforge.kernels import gemv

SOURCES = [Path(__file__).with_name(name) for name in ("encoder.cpp", "encoder_attention.h", "encoder_gemm.h",
                                                       "vecmath.h")]


@functools.lru_cache(maxsize=1)
def extension() -> ModuleType | None:
    """The compiled encoder kernels, building them on first use; None (with one warning) when they cannot be."""
    if os.environ.get("LMFORGE_KERNELS", "1") == "0":
        return None
    key = gemv.build_key(SOURCES)
    name = f"lmforge_encoder_{key}"
    directory = gemv.cache_root() / f"encoder-{key}"
    try:
        built = directory / f"{name}.so"
        return gemv._import(built, name) if built.exists() else gemv._build(directory, name, SOURCES, "encoder kernels")
    except Exception as err:  # no compiler, no headers, a read-only cache: torch's own ops still work
        warnings.warn(f"lmforge's encoder kernels are unavailable ({type(err).__name__}: "
                      f"{str(err).splitlines()[0] if str(err) else ''}); encoders run on torch's ops instead. "
                      "Install a C++ compiler (g++) to build them, or set LMFORGE_KERNELS=0 to silence this.",
                      stacklevel=2)
        return None

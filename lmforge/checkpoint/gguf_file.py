"""A bounds-checked, one-pass reader for the GGUF container (header, metadata, tensor table).

Why not `gguf.GGUFReader` for this part: it builds a numpy view per array element, so a
262k-token vocabulary takes seconds, and a damaged length field can make it walk far.
Here every length is checked against the bytes left before it is used, so damaged files
fail fast with a message. The `gguf` library still supplies the type tables and does all
dequantization (`lmforge.checkpoint.gguf`).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from lmforge.checkpoint.errors import CheckpointError

# GGUF value types -> (struct format, size); 8 = string, 9 = array.
_SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
            6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
MAX_DIMS = 8


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor table; `shape` is numpy order (GGUF lists dims reversed)."""

    name: str
    shape: tuple[int, ...]
    qtype: GGMLQuantizationType
    offset: int  # absolute byte offset in the file
    n_bytes: int


class _Cursor:
    """Reads little-endian values from a buffer, refusing to run past its end."""

    def __init__(self, buf: mmap.mmap | bytes, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def fail(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {what} at byte {self.pos} of {len(self.buf)}; the GGUF file is "
                               "corrupt or truncated, download it again (`lmforge pull NAME --force`)")

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise self.fail(f"{what} needs {n} bytes, past the end of the file")
        view = memoryview(self.buf)[self.pos:self.pos + n]
        self.pos += n
        return view

    def scalar(self, vtype: int, what: str) -> Any:
        fmt, size = _SCALARS[vtype]
        return struct.unpack(fmt, self.take(size, what))[0]

    def string(self, what: str) -> str:
        n = self.scalar(10, what)
        try:
            return bytes(self.take(n, what)).decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not valid UTF-8") from None

    def value(self, vtype: int, key: str) -> Any:
        if vtype in _SCALARS:
            return self.scalar(vtype, key)
        if vtype == 8:
            return self.string(key)
        if vtype == 9:
            return self.array(key)
        raise self.fail(f"metadata {key!r} has unknown value type {vtype}")

    def array(self, key: str) -> Any:
        etype, count = self.scalar(4, key), self.scalar(10, key)
        min_size = 8 if etype == 8 else _SCALARS.get(etype, ("", 1))[1]
        if count * min_size > len(self.buf) - self.pos:
            raise self.fail(f"array {key!r} claims {count} elements, more than the file holds")
        if etype in _NUMPY:
            size = _SCALARS[etype][1]
            return np.frombuffer(self.take(count * size, key), dtype=_NUMPY[etype]).copy()
        return [self.value(etype, key) for _ in range(count)]


class GGUFFile:
    """Metadata dict and tensor table of a GGUF file, with tensor bytes memory-mapped."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such GGUF file; check the path or run `lmforge pull NAME`")
        with open(self.path, "rb") as f:
            if self.path.stat().st_size == 0:
                raise CheckpointError(f"{self.path}: the file is empty; download it again")
            self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        cur = _Cursor(self._mmap, self.path)
        magic = bytes(cur.take(4, "magic")) if len(self._mmap) >= 4 else bytes(self._mmap[:4])
        if magic != b"GGUF":
            raise CheckpointError(f"{self.path}: not a GGUF file (magic {magic!r}, expected b'GGUF'); "
                                  "pass a .gguf file or a Hugging Face directory")
        self.version = cur.scalar(4, "version")
        if self.version not in (2, 3):
            raise CheckpointError(f"{self.path}: GGUF version {self.version} is not supported (2 or 3)")
        n_tensors, n_kv = cur.scalar(10, "tensor count"), cur.scalar(10, "metadata count")
        if n_tensors * 24 + n_kv * 12 > len(self._mmap):
            raise cur.fail(f"header claims {n_tensors} tensors and {n_kv} metadata keys")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string("metadata key")
            self.metadata[key] = cur.value(cur.scalar(4, key), key)
        infos = [self._tensor_info(cur) for _ in range(n_tensors)]
        alignment = int(self.metadata.get("general.alignment", 32))
        if alignment <= 0 or alignment & (alignment - 1):
            raise cur.fail(f"general.alignment={alignment} is not a power of two")
        data_start = -(-cur.pos // alignment) * alignment
        self.tensors = [self._place(info, data_start) for info in infos]

    def _tensor_info(self, cur: _Cursor) -> tuple[str, tuple[int, ...], int, int]:
        name = cur.string("tensor name")
        n_dims = cur.scalar(4, name)
        if not 1 <= n_dims <= MAX_DIMS:
            raise cur.fail(f"tensor {name} has {n_dims} dimensions")
        dims = tuple(cur.scalar(10, name) for _ in range(n_dims))
        return name, dims, cur.scalar(4, name), cur.scalar(10, name)

    def _place(self, info: tuple[str, tuple[int, ...], int, int], data_start: int) -> TensorInfo:
        name, dims, raw_type, rel = info
        try:
            qtype = GGMLQuantizationType(raw_type)
        except ValueError:
            raise CheckpointError(f"{self.path}: tensor {name} has unknown type id {raw_type}") from None
        block, type_size = GGML_QUANT_SIZES[qtype]
        n = int(np.prod(dims, dtype=np.float64))
        if any(d <= 0 for d in dims) or n > 1 << 36 or dims[0] % block:
            raise CheckpointError(f"{self.path}: tensor {name} has an impossible shape {list(dims)} for {qtype.name}")
        n_bytes = n // block * type_size
        offset = data_start + rel
        if offset + n_bytes > len(self._mmap):
            raise CheckpointError(f"{self.path}: tensor {name} ends at byte {offset + n_bytes}, past the end of "
                                  f"the {len(self._mmap)}-byte file; it is truncated, download it again")
        return TensorInfo(name, tuple(reversed(dims)), qtype, offset, n_bytes)

    def raw(self, tensor: TensorInfo) -> np.ndarray:
        """The tensor's stored bytes as numpy: typed for float types, (rows, row_bytes) uint8 otherwise."""
        buf = np.frombuffer(self._mmap, dtype=np.uint8, count=tensor.n_bytes, offset=tensor.offset)
        plain = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}
        if tensor.qtype in plain:
            return buf.view(plain[tensor.qtype]).reshape(tensor.shape)
        rows = int(np.prod(tensor.shape[:-1], dtype=np.int64))
        return buf.reshape(rows, tensor.n_bytes // max(rows, 1))

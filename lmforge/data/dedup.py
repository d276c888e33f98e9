"""De-duplicate texts: exact (hash of normalized text), then near (MinHash LSH, datasketch).

Near-duplicate candidates come from datasketch's MinHashLSH at the chosen Jaccard
threshold; each candidate pair is then confirmed with the exact Jaccard similarity of the
word-shingle sets, so nothing under the threshold is removed because of MinHash noise. The
first text of each group (in input order) is kept; the others are logged with the kept id.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from datasketch import MinHash, MinHashLSH

NON_WORD = re.compile(r"[^\w]+")


@dataclass(frozen=True)
class DedupConfig:
    """Jaccard threshold for near-duplicates, shingle size in words, MinHash permutations."""

    exact: bool = True
    near: bool = True
    threshold: float = 0.8
    shingle: int = 5
    num_perm: int = 128

    def __post_init__(self) -> None:
        if not 0 < self.threshold <= 1:
            raise ValueError(f"dedup threshold must be in (0, 1], got {self.threshold}")
        if self.shingle < 1:
            raise ValueError(f"shingle must be >= 1 word, got {self.shingle}")


def normalize(text: str) -> str:
    """Lowercase words only, single-spaced: what 'the same text' means for exact dedup."""
    return NON_WORD.sub(" ", text.lower()).strip()


def shingles(text: str, k: int) -> set[str]:
    """Word k-grams of the normalized text (the whole text when it is shorter than k words)."""
    words = normalize(text).split()
    if len(words) <= k:
        return {" ".join(words)}
    return {" ".join(words[i:i + k]) for i in range(len(words) - k + 1)}


def jaccard(a: set[str], b: set[str]) -> float:
    """|a ∩ b| / |a ∪ b|."""
    return len(a & b) / len(a | b) if a or b else 1.0


def dedup(texts: list[str], config: DedupConfig = DedupConfig()) -> tuple[list[bool], list[dict]]:
    """A keep-mask over `texts` and one log record per removed text (index, kept index, kind, jaccard)."""
    keep = [True] * len(texts)
    log: list[dict] = []
    if config.exact:
        seen: dict[str, int] = {}
        for i, text in enumerate(texts):
            digest = hashlib.sha256(normalize(text).encode()).hexdigest()
            if digest in seen:
                keep[i] = False
                log.append({"index": i, "duplicate_of": seen[digest], "kind": "exact", "jaccard": 1.0})
            else:
                seen[digest] = i
    if config.near:
        log.extend(_near(texts, keep, config))
    return keep, log


def _minhash(grams: set[str], num_perm: int) -> MinHash:
    m = MinHash(num_perm=num_perm, seed=1)
    m.update_batch([g.encode("utf-8") for g in grams])
    return m


def _near(texts: list[str], keep: list[bool], config: DedupConfig) -> list[dict]:
    """Mark near-duplicates (exact Jaccard >= threshold among LSH candidates) in `keep`; return the log."""
    lsh = MinHashLSH(threshold=config.threshold, num_perm=config.num_perm)
    grams: dict[int, set[str]] = {}
    log = []
    for i, text in enumerate(texts):
        if not keep[i]:
            continue
        grams[i] = shingles(text, config.shingle)
        m = _minhash(grams[i], config.num_perm)
        best, best_j = None, 0.0
        for key in lsh.query(m):
            j = jaccard(grams[i], grams[int(key)])
            if j >= config.threshold and j > best_j:
                best, best_j = int(key), j
        if best is None:
            lsh.insert(str(i), m)
        else:
            keep[i] = False
            log.append({"index": i, "duplicate_of": best, "kind": "near", "jaccard": round(float(best_j), 4)})
    return log


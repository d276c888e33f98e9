"""De-duplication: exact and near duplicates above the threshold go, distinct texts stay."""

from __future__ import annotations

import random

import pytest

from lmforge.data.dedup import DedupConfig, dedup, jaccard, shingles


def text(rng: random.Random, n: int = 120) -> list[str]:
    vocab = [f"w{i}" for i in range(2000)]
    return [rng.choice(vocab) for _ in range(n)]


def test_exact_duplicates_after_normalization():
    keep, log = dedup(["Hello,  World!", "hello world", "Something else entirely here."])
    assert keep == [True, False, True]
    assert log == [{"index": 1, "duplicate_of": 0, "kind": "exact", "jaccard": 1.0}]


@pytest.mark.parametrize("threshold", [0.5, 0.8])
def test_near_duplicates_above_threshold_removed_and_distinct_kept(threshold):
    rng = random.Random(0)
    base = text(rng)
    near = list(base)
    near[60] = "changed"  # one word changed in 120: Jaccard of 5-shingles about 0.92
    distinct = [text(rng) for _ in range(20)]
    texts = [" ".join(base), " ".join(near)] + [" ".join(d) for d in distinct]
    keep, log = dedup(texts, DedupConfig(threshold=threshold))
    assert keep == [True, False] + [True] * 20
    assert log[0]["kind"] == "near" and log[0]["duplicate_of"] == 0 and log[0]["jaccard"] >= threshold


def test_pairs_below_threshold_are_kept():
    rng = random.Random(1)
    base = text(rng)
    half = base[:60] + text(rng, 60)  # about a third of shingles shared
    j = jaccard(shingles(" ".join(base), 5), shingles(" ".join(half), 5))
    assert j < 0.5
    keep, _ = dedup([" ".join(base), " ".join(half)], DedupConfig(threshold=0.8))
    assert keep == [True, True]


def test_threshold_is_validated():
    with pytest.raises(ValueError, match="threshold"):
        DedupConfig(threshold=0)

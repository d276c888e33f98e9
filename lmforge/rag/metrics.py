"""Retrieval metrics: recall@k, MRR and NDCG@k with binary relevance, averaged over queries.

Each takes the ranked ids a system returned and the set of relevant (gold) ids.
"""

from __future__ import annotations

import math
from typing import Sequence


def _check(ranked: Sequence[str], relevant: set[str], k: int | None = None) -> None:
    if k is not None and k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not relevant:
        raise ValueError("a query needs at least one relevant id to be scored")


def recall_at_k(ranked: Sequence[str], relevant: set[str], k: int) -> float:
    """Share of the relevant ids found in the top k."""
    _check(ranked, relevant, k)
    return len(set(ranked[:k]) & relevant) / len(relevant)


def reciprocal_rank(ranked: Sequence[str], relevant: set[str], k: int | None = None) -> float:
    """1 / rank of the first relevant id (0 when none appears, or none in the top k)."""
    _check(ranked, relevant, k)
    for rank, doc in enumerate(ranked[:k] if k else ranked, 1):
        if doc in relevant:
            return 1.0 / rank
    return 0.0


def ndcg_at_k(ranked: Sequence[str], relevant: set[str], k: int) -> float:
    """DCG of the top k (gain 1 / log2(rank + 1) per relevant id) over the best possible DCG."""
    _check(ranked, relevant, k)
    dcg = sum(1.0 / math.log2(rank + 1) for rank, doc in enumerate(ranked[:k], 1) if doc in relevant)
    ideal = sum(1.0 / math.log2(rank + 1) for rank in range(1, min(k, len(relevant)) + 1))
    return dcg / ideal


def evaluate(runs: Sequence[Sequence[str]], golds: Sequence[set[str]], ks: Sequence[int] = (1, 5, 10)
             ) -> dict[str, float]:
    """Mean recall@k and NDCG@k for each k, and MRR, over queries (runs[i] is scored against golds[i])."""
    if len(runs) != len(golds) or not runs:
        raise ValueError(f"need one gold set per run and at least one query: {len(runs)} runs, {len(golds)} golds")
    out: dict[str, float] = {}
    for k in ks:
        out[f"recall@{k}"] = sum(recall_at_k(r, g, k) for r, g in zip(runs, golds)) / len(runs)
        out[f"ndcg@{k}"] = sum(ndcg_at_k(r, g, k) for r, g in zip(runs, golds)) / len(runs)
    out["mrr"] = sum(reciprocal_rank(r, g) for r, g in zip(runs, golds)) / len(runs)
    return out

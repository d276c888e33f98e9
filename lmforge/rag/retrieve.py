"""Retrievers behind one protocol: dense (embedder + store), BM25, and hybrid by reciprocal-rank fusion.

RRF (Cormack, Clarke & Büttcher, SIGIR 2009): score(d) = Σ_r 1 / (k + rank_r(d)), ranks from 1,
k = 60 as in the paper. It needs no score calibration between BM25 and cosine similarity, which
is why it is the usual way to fuse them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, Sequence

from lmforge.rag.bm25 import BM25Index
from lmforge.rag.chunks import Chunk
from lmforge.rag.embed import Embedder
from lmforge.rag.store import Hit, Store, Where

RRF_K = 60  # Cormack et al. 2009, Table 1


class Retriever(Protocol):
    """query -> the k best chunks, best first."""

    def retrieve(self, query: str, k: int, where: Where | None = None) -> list[Hit]: ...


@dataclass
class RetrieveConfig:
    """How to retrieve.

    Args:
        mode: "bm25", "dense" or "hybrid" (RRF of both).
        k: chunks handed to the prompt (after reranking).
        candidates: chunks each retriever contributes before fusion and reranking.
        rrf_k: the RRF constant.
        rerank: rescore the candidates with the reranker (the local model) before keeping k.
        max_query_chars: longer queries are refused (a prompt must fit in the model's context).
    """

    mode: Literal["bm25", "dense", "hybrid"] = "hybrid"
    k: int = 4
    candidates: int = 20
    rrf_k: int = RRF_K
    rerank: bool = False
    max_query_chars: int = 4000

    def __post_init__(self) -> None:
        if self.mode not in ("bm25", "dense", "hybrid"):
            raise ValueError(f"unknown retrieval mode {self.mode!r}; choose bm25, dense or hybrid")
        if self.k < 1 or self.candidates < self.k:
            raise ValueError(f"need 1 <= k <= candidates, got k={self.k}, candidates={self.candidates}")


def check_query(query: str, max_chars: int = 4000) -> str:
    """The stripped query, or a ValueError for an empty, non-text or oversized one."""
    if not isinstance(query, str):
        raise TypeError(f"a query is a str, got {type(query).__name__}")
    query = query.strip()
    if not query:
        raise ValueError("the query is empty; ask a question, e.g. lmforge rag ask \"How do I ...?\"")
    if len(query) > max_chars:
        raise ValueError(f"the query is {len(query):,} characters; the limit is {max_chars:,} "
                         "(shorten it, or raise max_query_chars)")
    return query


def matches(chunk: Chunk, where: Where | None) -> bool:
    """Whether a chunk's metadata satisfies an equality filter (lists mean 'any of')."""
    if not where:
        return True
    meta = chunk.flat_metadata()
    return all(meta.get(key) in (value if isinstance(value, (list, tuple)) else [value])
               for key, value in where.items())


class DenseRetriever:
    """Embed the query, ask the store for its nearest chunks."""

    def __init__(self, store: Store, embedder: Embedder):
        self.store, self.embedder = store, embedder

    def retrieve(self, query: str, k: int, where: Where | None = None) -> list[Hit]:
        return self.store.query(self.embedder.embed([query])[0], k, where)


class BM25Retriever:
    """BM25 over the chunks; filters apply after scoring."""

    def __init__(self, index: BM25Index):
        self.index = index

    def retrieve(self, query: str, k: int, where: Where | None = None) -> list[Hit]:
        hits = self.index.search(query, k if not where else len(self.index.chunks))
        hits = [h for h in hits if matches(h.chunk, where)][:k]
        return [Hit(h.chunk, h.score, rank) for rank, h in enumerate(hits)]


def rrf(rankings: Sequence[Sequence[Hit]], k: int = RRF_K) -> list[Hit]:
    """Fuse ranked lists: each chunk scores Σ 1 / (k + rank), rank counted from 1; ties keep first-seen order."""
    scores: dict[str, float] = {}
    chunks: dict[str, Chunk] = {}
    for ranking in rankings:
        for rank, hit in enumerate(ranking, 1):
            scores[hit.id] = scores.get(hit.id, 0.0) + 1.0 / (k + rank)
            chunks.setdefault(hit.id, hit.chunk)
    order = sorted(scores, key=lambda i: -scores[i])  # sorted() is stable
    return [Hit(chunks[i], scores[i], rank) for rank, i in enumerate(order)]


class HybridRetriever:
    """BM25 and dense candidates fused by RRF."""

    def __init__(self, retrievers: Sequence[Retriever], candidates: int = 20, rrf_k: int = RRF_K):
        self.retrievers, self.candidates, self.rrf_k = list(retrievers), candidates, rrf_k

    def retrieve(self, query: str, k: int, where: Where | None = None) -> list[Hit]:
        n = max(k, self.candidates)
        return rrf([r.retrieve(query, n, where) for r in self.retrievers], self.rrf_k)[:k]


class RerankedRetriever:
    """A retriever's candidates, rescored by a reranker; the top k are kept."""

    def __init__(self, retriever: Retriever, reranker, candidates: int = 20):
        self.retriever, self.reranker, self.candidates = retriever, reranker, candidates

    def retrieve(self, query: str, k: int, where: Where | None = None) -> list[Hit]:
        return self.reranker.rerank(query, self.retriever.retrieve(query, max(k, self.candidates), where))[:k]

"""RRF against its formula; BM25 ranks the obvious document first; query checks; filters."""

from __future__ import annotations

import pytest

from lmforge.rag.bm25 import BM25Index
from lmforge.rag.chunks import Chunk
from lmforge.rag.retrieve import BM25Retriever, HybridRetriever, RetrieveConfig, check_query, matches, rrf
from lmforge.rag.store import Hit

DOCS = [Chunk("a", "How do I sort a list in Python? Use sorted() or list.sort().", "faq", "lists"),
        Chunk("b", "Dictionaries map keys to values.", "faq", "dicts"),
        Chunk("c", "The sort method sorts lists in place.", "tutorial", "lists"),
        Chunk("d", "Tuples are immutable.", "tutorial", "tuples")]


def hits(ids: str) -> list[Hit]:
    by_id = {c.id: c for c in DOCS}
    return [Hit(by_id[i], 0.0, r) for r, i in enumerate(ids)]


def test_rrf_equals_formula():
    rankings = [hits("abc"), hits("cad"), hits("b")]
    fused = rrf(rankings, k=60)
    expected = {"a": 1 / 61 + 1 / 62, "b": 1 / 62 + 1 / 61, "c": 1 / 63 + 1 / 61, "d": 1 / 63}
    assert {h.id: h.score for h in fused} == pytest.approx(expected)
    assert [h.id for h in fused] == sorted(expected, key=lambda i: -expected[i])
    assert [h.rank for h in fused] == [0, 1, 2, 3]
    assert rrf([]) == []


def test_rrf_ties_keep_first_seen_order():
    assert [h.id for h in rrf([hits("ab"), hits("ba")])] == ["a", "b"]


def test_bm25_ranks_and_filters():
    retriever = BM25Retriever(BM25Index(DOCS))
    top = retriever.retrieve("sorting lists", 2)
    assert {h.id for h in top} == {"a", "c"} and top[0].score >= top[1].score > 0
    assert [h.id for h in retriever.retrieve("sorting lists", 5, where={"source": "tutorial"})] == ["c"]
    assert retriever.retrieve("zzzz qqqq", 3) == []


def test_hybrid_fuses_candidates():
    bm25 = BM25Retriever(BM25Index(DOCS))

    class Fixed:
        def retrieve(self, query, k, where=None):
            return hits("dcb")[:k]

    fused = HybridRetriever([bm25, Fixed()], candidates=3).retrieve("sort a list", 2)
    assert fused[0].id == "c"  # second in both lists beats first in one


def test_bad_queries_and_configs():
    assert check_query("  hi ") == "hi"
    for bad in ("", "   \n"):
        with pytest.raises(ValueError, match="empty"):
            check_query(bad)
    with pytest.raises(ValueError, match="100,000 characters"):
        check_query("x" * 100_000)
    with pytest.raises(TypeError):
        check_query(None)
    with pytest.raises(ValueError, match="mode"):
        RetrieveConfig(mode="sparse")
    with pytest.raises(ValueError, match="empty corpus"):
        BM25Index([])


def test_matches():
    assert matches(DOCS[0], {"source": "faq", "section": ["lists", "x"]})
    assert not matches(DOCS[0], {"source": "tutorial"})
    assert matches(DOCS[0], None)

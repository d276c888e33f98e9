"""The Python FAQ retrieval evaluation: questions against chunked answers, scored per FAQ entry.

Corpus: every FAQ answer (never its question heading) cut into chunks of at most 200 embedder
tokens. Queries: the question headings. A retrieved chunk counts for the entry it came from;
ranked lists are de-duplicated to entries, and the gold is the question's own entry, so
recall@k reads "the right FAQ entry is among the first k distinct entries retrieved".
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from lmforge.rag.chunks import Chunk
from lmforge.rag.metrics import evaluate
from lmforge.rag.retrieve import Retriever


@dataclass
class Query:
    """A question and the id of the FAQ entry that answers it."""

    text: str
    gold: str


def faq_eval_set(max_tokens: int = 200) -> tuple[list[Chunk], list[Query]]:
    """(chunks of all answers, one query per question) from Debian's python3.11-doc FAQ."""
    from lmforge.data.chunk import ChunkConfig, chunk_document
    from lmforge.data.python_faq import faq_pairs
    from lmforge.rag.chunks import embedder_tokenizer, paragraph_spans

    tokenizer = embedder_tokenizer()
    chunks, queries = [], []
    for n, pair in enumerate(faq_pairs()):
        entry = f"faq{n:03d}"
        pieces = chunk_document(pair.answer, paragraph_spans(pair.answer), tokenizer, ChunkConfig(max_tokens, 32))
        for j, piece in enumerate(pieces):
            chunks.append(Chunk(f"{entry}-{j}", piece["text"], pair.source, pair.section, {"entry": entry}))
        queries.append(Query(pair.question, entry))
    return chunks, queries


def entries(hits, limit: int) -> list[str]:
    """Distinct FAQ entries of ranked hits, in order."""
    seen: dict[str, None] = {}
    for hit in hits:
        seen.setdefault(str(hit.chunk.metadata.get("entry", hit.id)), None)
    return list(seen)[:limit]


def run_eval(retriever: Retriever, queries: list[Query], k: int = 10, depth: int = 30) -> dict[str, float]:
    """recall@1/5/10, NDCG@5/10 and MRR per entry, and latency p50/p95 in ms."""
    runs, latencies = [], []
    for query in queries:
        start = time.perf_counter()
        hits = retriever.retrieve(query.text, depth)
        latencies.append(time.perf_counter() - start)
        runs.append(entries(hits, k))
    scores = evaluate(runs, [{q.gold} for q in queries], ks=(1, 5, 10))
    ms = np.array(latencies) * 1000
    return {**scores, "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "queries": len(queries)}

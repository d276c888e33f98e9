"""CLI: `lmforge rag index PATH` and `lmforge rag ask "QUESTION"` (also spelled rag-index, rag-ask)."""

from __future__ import annotations

import json
import sys
from typing import Literal

from lmforge import hub


def default_index() -> str:
    """INDEX default: the model cache's rag/default folder, so `rag ask` works from any directory."""
    return str(hub.cache_dir() / "rag" / "default")


def index_command(path: str, index: str | None = None, store: Literal["chroma", "chroma-server"] = "chroma",
                  host: str = "127.0.0.1", port: int = 8000, collection: str = "lmforge", max_tokens: int = 200,
                  batch_size: int = 256, skip_bad: bool = False) -> int:
    """Index documents for retrieval: an ingest chunks.jsonl, text/Markdown files, or a folder of them.

    Chunks are embedded with all-MiniLM-L6-v2 and upserted by id into the store, so running it
    again updates the index in place. Every file is read and checked before anything is written.

    Args:
        path: a chunks.jsonl (from `lmforge ingest`), a .txt/.md/.rst file, or a folder.
        index: index folder (default: the cache's rag/default).
        store: "chroma" (embedded, inside the index folder) or "chroma-server" (a `chroma run` server).
        host: server address for --store chroma-server.
        port: server port for --store chroma-server.
        collection: collection name in the store.
        max_tokens: chunk size for text files, in embedder tokens (the embedder reads 256).
        batch_size: chunks embedded and written per batch.
        skip_bad: skip unreadable or non-UTF-8 files (listed) instead of stopping.
    """
    from lmforge.rag.chunks import load_corpus
    from lmforge.rag.pipeline import index_chunks, store_config_for

    index = index or default_index()
    chunks, skipped = load_corpus(path, skip_bad=skip_bad, max_tokens=max_tokens)
    for file, reason in skipped.items():
        print(f"skipped {file}: {reason}", file=sys.stderr)
    config = store_config_for(index, store, host, port, collection)
    stats = index_chunks(chunks, index, config, batch_size=batch_size)
    print(f"indexed {stats['indexed']} chunks in {stats['seconds']:.1f} s ({stats['chunks_per_s']:.0f}/s); "
          f"{stats['in_store']} in the {store} store; index: {index}")
    return 0


def ask_command(question: str, index: str | None = None, mode: Literal["bm25", "dense", "hybrid"] = "hybrid",
                k: int = 4, candidates: int = 20, rerank: bool = False, model: str = hub.DEFAULT_MODEL,
                max_tokens: int = 256, source: str | None = None, as_json: bool = False) -> int:
    """Answer a question from the index with the local model, citing numbered sources.

    Args:
        question: the question.
        index: index folder (default: the cache's rag/default).
        mode: retrieval: bm25, dense or hybrid (reciprocal-rank fusion of both).
        k: sources given to the model.
        candidates: chunks each retriever proposes before fusion and reranking.
        rerank: rescore candidates with the local model's log P("yes") before keeping k.
        model: a model name, a .gguf file or a Hugging Face directory.
        max_tokens: most new tokens in the answer.
        source: only chunks whose source equals this.
        as_json: print the answer, sources and timings as JSON.
    """
    from lmforge.rag.pipeline import RAG
    from lmforge.rag.retrieve import RetrieveConfig

    rag = RAG(index or default_index(), RetrieveConfig(mode=mode, k=k, candidates=candidates, rerank=rerank), model)
    where = {"source": source} if source else None
    printer = None if as_json else (lambda delta: print(delta, end="", flush=True))
    answer = rag.ask(question, max_tokens=max_tokens, where=where, stream_to=printer)
    if as_json:
        print(json.dumps(answer.to_dict(), ensure_ascii=False, indent=1))
        return 0
    print("\n\n" + answer.render_sources())
    for flag in answer.flags:
        print(f"[guard] {flag}", file=sys.stderr)
    return 0


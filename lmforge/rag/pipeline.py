"""Index chunks, retrieve, and answer with numbered citations from the local model.

    index -> folder with manifest.json (which store, which embedder, how many chunks) + the store
    ask   -> check query -> retrieve (bm25 | dense | hybrid, + rerank) -> prompt with numbered,
             spotlighted sources -> generate -> answer citing [n] + the list of sources
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from lmforge.rag.chunks import Chunk
from lmforge.rag.embed import EmbedConfig, Embedder, MiniLMEmbedder
from lmforge.rag.retrieve import (BM25Retriever, DenseRetriever, HybridRetriever, RerankedRetriever,
                                  RetrieveConfig, Retriever, check_query)
from lmforge.rag.store import Hit, StoreConfig, Where, open_store
from lmforge.safety.guard import Guard, GuardConfig
from lmforge.safety.injection import SPOTLIGHT_RULE

MANIFEST = "manifest.json"
SYSTEM = ("You answer questions using only the numbered sources given. Cite the sources you use like [1] or "
          "[2]. If the sources do not contain the answer, say you do not know. " + SPOTLIGHT_RULE)
CITATION = re.compile(r"\[(\d{1,3})\]")


@dataclass
class Answer:
    """The model's answer, the numbered sources it was given, and which of them it cited."""

    question: str
    text: str
    sources: list[Hit]
    cited: list[int] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def render(self) -> str:
        """Answer text followed by the numbered source list."""
        return f"{self.text.strip()}\n\n{self.render_sources()}"

    def render_sources(self) -> str:
        """The numbered sources, cited ones marked with *."""
        lines = ["Sources:"]
        for n, hit in enumerate(self.sources, 1):
            mark = "*" if n in self.cited else " "
            where = " — ".join(x for x in (hit.chunk.source, hit.chunk.section) if x)
            lines.append(f"{mark}[{n}] {where or hit.id} (id {hit.id}, score {hit.score:.3f})")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"question": self.question, "answer": self.text, "cited": self.cited, "flags": self.flags,
                "seconds": self.seconds,
                "sources": [{"n": n, "id": h.id, "source": h.chunk.source, "section": h.chunk.section,
                             "score": h.score, "text": h.chunk.text} for n, h in enumerate(self.sources, 1)]}


def write_manifest(index_dir: Path, store: StoreConfig, count: int) -> None:
    """Record which store and embedder an index uses (atomic write)."""
    from lmforge.atomic import atomic_write_json

    atomic_write_json(index_dir / MANIFEST, {"store": asdict(store), "embedder": "all-MiniLM-L6-v2", "dim": 384,
                                             "chunks": count, "updated": time.time()})


def read_manifest(index_dir: str | Path) -> dict:
    """The manifest of an index folder, or a ValueError saying how to build one."""
    path = Path(index_dir) / MANIFEST
    if not path.is_file():
        raise ValueError(f"no index at {index_dir} (no {MANIFEST}); build one with "
                         f"`lmforge rag index PATH --index {index_dir}`")
    try:
        return json.loads(path.read_text("utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); rebuild the index with `lmforge rag index`") from None


def store_config_for(index_dir: str | Path, kind: str = "chroma", host: str = "127.0.0.1", port: int = 8000,
                     collection: str = "lmforge") -> StoreConfig:
    """The store config of a new index: the embedded store lives in INDEX/chroma."""
    path = str(Path(index_dir) / "chroma") if kind == "chroma" else None
    return StoreConfig(kind=kind, path=path, host=host, port=port, collection=collection)


def batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def index_chunks(chunks: list[Chunk], index_dir: str | Path, store: StoreConfig, embedder: Embedder | None = None,
                 batch_size: int = 256, progress: bool = True) -> dict:
    """Embed and upsert chunks (by id, so re-indexing replaces them); returns counts and speed."""
    chunks = [c for c in chunks if c.text.strip()]
    if not chunks:
        raise ValueError("the corpus has no chunks with text; nothing to index (is the path right?)")
    from tqdm import tqdm

    index_dir = Path(index_dir)
    index_dir.mkdir(parents=True, exist_ok=True)
    embedder = embedder or MiniLMEmbedder(EmbedConfig(cache_dir=str(index_dir / "embed_cache")))
    target = open_store(store, create=True)
    start = time.perf_counter()
    with tqdm(total=len(chunks), unit="chunk", desc="indexing", disable=not progress) as bar:
        for part in batches(chunks, batch_size):
            target.upsert(part, embedder.embed([c.text for c in part]))
            bar.update(len(part))
    seconds = time.perf_counter() - start
    count = target.count()
    write_manifest(index_dir, store, count)
    return {"indexed": len(chunks), "in_store": count, "seconds": seconds, "chunks_per_s": len(chunks) / seconds}


class RAG:
    """An opened index with its retriever, and (lazily) the local model for answers and reranking."""

    def __init__(self, index_dir: str | Path, retrieve: RetrieveConfig | None = None, model: str = "smollm2-135m-instruct",
                 embedder: Embedder | None = None, guard: Guard | None = None, store: StoreConfig | None = None,
                 loaded=None):
        self.index_dir = Path(index_dir)
        self.config = retrieve or RetrieveConfig()
        manifest = read_manifest(self.index_dir) if store is None else {}
        self.store = open_store(store or StoreConfig(**manifest["store"]))
        self.embedder = embedder or MiniLMEmbedder(EmbedConfig(cache_dir=None))
        self.guard = guard or Guard(GuardConfig())
        self.model_name, self._loaded = model, loaded
        self._retriever: Retriever | None = None

    @property
    def loaded(self):
        """(model, tokenizer) of the local model, loaded on first use."""
        if self._loaded is None:
            from lmforge import hub
            from lmforge.checkpoint.load import load

            self._loaded = load(hub.resolve(self.model_name, pull_missing=self.model_name in hub.REGISTRY))
        return self._loaded

    def retriever(self) -> Retriever:
        """The configured retriever; BM25 is built from the store's texts on first use."""
        if self._retriever is None:
            self._retriever = build_retriever(self.config, self.store, self.embedder,
                                              self.loaded if self.config.rerank else None)
        return self._retriever

    def search(self, query: str, k: int | None = None, where: Where | None = None) -> list[Hit]:
        """The top-k chunks for a query (checked: not empty, not oversized)."""
        query = check_query(query, self.config.max_query_chars)
        return self.retriever().retrieve(query, k or self.config.k, where)

    def ask(self, question: str, max_tokens: int = 256, where: Where | None = None, stream_to=None) -> Answer:
        """Retrieve, prompt with numbered spotlighted sources, generate, and collect citations."""
        from lmforge.generation.generate import stream
        from lmforge.generation.sampling import SamplingParams

        timings: dict[str, float] = {}
        start = time.perf_counter()
        question = check_query(question, self.config.max_query_chars)
        checked = self.guard.check_input(question)
        if checked.blocked:
            raise ValueError(f"the question was refused by the guard: {'; '.join(checked.reasons)}")
        hits = self.search(checked.text, where=where)
        timings["retrieve"] = time.perf_counter() - start
        messages, flags = build_messages(checked.text, hits, self.guard)
        model, tok = self.loaded
        ids = tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)
        ids = ids[-(model.config.block_size - max_tokens):]  # keep the question at the end in context
        text = ""
        start = time.perf_counter()
        for delta in stream(model, tok, ids, SamplingParams(temperature=0.0, max_new_tokens=max_tokens)):
            text += delta
            if stream_to is not None:
                stream_to(delta)
        timings["generate"] = time.perf_counter() - start
        out = self.guard.check_output(text)
        cited = sorted({int(n) for n in CITATION.findall(out.text) if 1 <= int(n) <= len(hits)})
        return Answer(question, out.text, hits, cited, checked.reasons + flags + out.reasons, timings)


def build_retriever(config: RetrieveConfig, store, embedder: Embedder, loaded=None) -> Retriever:
    """bm25 | dense | hybrid from the config, wrapped by the LM reranker when `config.rerank`."""
    from lmforge.rag.bm25 import BM25Index

    dense = DenseRetriever(store, embedder)
    if config.mode == "dense":
        base: Retriever = dense
    else:
        chunks = list(store.iter_chunks())
        if not chunks:
            raise ValueError("the index is empty; add chunks with `lmforge rag index PATH`")
        bm25 = BM25Retriever(BM25Index(chunks))
        base = bm25 if config.mode == "bm25" else HybridRetriever([bm25, dense], config.candidates, config.rrf_k)
    if not config.rerank:
        return base
    if loaded is None:
        raise ValueError("reranking needs the local model: pass loaded=(model, tokenizer)")
    from lmforge.rag.rerank import LMReranker

    return RerankedRetriever(base, LMReranker(*loaded), config.candidates)


def build_messages(question: str, hits: list[Hit], guard: Guard) -> tuple[list[dict], list[str]]:
    """Chat messages: the rules, then numbered spotlighted sources, then the question; and injection flags."""
    blocks, flags = [], []
    for n, hit in enumerate(hits, 1):
        wrapped, scan = guard.wrap_untrusted(hit.chunk.text, f"source {n}")
        blocks.append(f"[{n}] {wrapped}")
        if scan.injection_score >= guard.config.injection_threshold:
            flags.append(f"source [{n}] ({hit.id}) looks like a prompt injection (score {scan.injection_score:.2f})")
    user = "Sources:\n\n" + "\n\n".join(blocks) + f"\n\nQuestion: {question}\nAnswer, citing sources like [1]:"
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}], flags

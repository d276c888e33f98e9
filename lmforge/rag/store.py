"""Vector stores behind one `Store` protocol: Chroma embedded (default) and Chroma's server.

Why Chroma for both: its embedded `PersistentClient` and its server (`chroma run --path DIR`)
are one engine with one on-disk format, so outgrowing one process means starting the server on
the index folder and switching `--store chroma-server`: no export, no re-embedding. Writes go
through SQLite's write-ahead log first, so a killed write leaves the last committed state;
ids upsert and delete; metadata filters are Chroma `where` clauses. Search is HNSW (cosine);
Chroma keeps recent writes in a brute-force buffer and we raise `ef_search`, so small sets get
exact neighbours (tests compare with brute force). LanceDB or FAISS + SQLite would give the
embedded half, but neither has a server that reads the same files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Protocol

import numpy as np

from lmforge.rag.chunks import Chunk

Where = dict[str, "str | int | float | bool | list"]


@dataclass
class Hit:
    """A retrieved chunk and its score (higher is better; cosine similarity for dense search)."""

    chunk: Chunk
    score: float
    rank: int = 0

    @property
    def id(self) -> str:
        return self.chunk.id


class Store(Protocol):
    """Persistent vectors + texts + metadata, addressed by chunk id."""

    def upsert(self, chunks: list[Chunk], vectors: np.ndarray) -> None: ...

    def delete(self, ids: list[str]) -> None: ...

    def query(self, vector: np.ndarray, k: int, where: Where | None = None) -> list[Hit]: ...

    def get(self, ids: list[str]) -> list[Chunk]: ...

    def count(self) -> int: ...

    def iter_chunks(self, batch: int = 5000) -> Iterator[Chunk]: ...


@dataclass
class StoreConfig:
    """Which store and where.

    Args:
        kind: "chroma" (embedded, in `path`) or "chroma-server" (a `chroma run` server at host:port).
        path: folder of the embedded store.
        host: server address (the tests use 127.0.0.1).
        port: server port.
        collection: collection name inside the store.
        ef_search: HNSW candidate list size at query time (higher: closer to exact, slower).
    """

    kind: Literal["chroma", "chroma-server"] = "chroma"
    path: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    collection: str = "lmforge"
    ef_search: int = 200

    def __post_init__(self) -> None:
        if self.kind not in ("chroma", "chroma-server"):
            raise ValueError(f"unknown store kind {self.kind!r}; choose 'chroma' (embedded) or 'chroma-server'")
        if self.kind == "chroma" and not self.path:
            raise ValueError("the embedded store needs a folder: StoreConfig(kind='chroma', path=...)")


def to_chroma_where(where: Where | None) -> dict | None:
    """{"source": "a", "page": [1, 2]} -> Chroma's where clause (equality, lists as $in, $and of keys)."""
    if not where:
        return None
    clauses = []
    for key, value in where.items():
        if isinstance(value, (list, tuple)):
            clauses.append({key: {"$in": list(value)}})
        elif isinstance(value, (str, int, float, bool)):
            clauses.append({key: value})
        else:
            raise ValueError(f"filter {key}={value!r}: values must be str, int, float, bool or a list of them")
    return clauses[0] if len(clauses) == 1 else {"$and": clauses}


def _check_vectors(chunks: list[Chunk], vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or len(vectors) != len(chunks):
        raise ValueError(f"need one vector per chunk: {len(chunks)} chunks, vectors of shape {vectors.shape}")
    if not np.isfinite(vectors).all():
        raise ValueError("vectors contain NaN or inf; check the embedder")
    return vectors


class ChromaStore:
    """A Chroma collection (embedded or server) behind the Store protocol; cosine space."""

    def __init__(self, client, config: StoreConfig, create: bool):
        self.client, self.config = client, config
        self.collection = self._collection(create)
        self.batch = max(1, min(int(client.get_max_batch_size()), 4096))

    def _collection(self, create: bool):
        if create:
            return self.client.get_or_create_collection(
                self.config.collection, embedding_function=None,
                configuration={"hnsw": {"space": "cosine", "ef_search": self.config.ef_search, "ef_construction": 200}})
        try:
            return self.client.get_collection(self.config.collection, embedding_function=None)
        except Exception as err:  # chromadb raises NotFoundError (a ValueError subclass in some versions)
            raise ValueError(f"no collection {self.config.collection!r} in {self.where_}; build the index first "
                             f"with `lmforge rag index PATH` ({type(err).__name__})") from None

    @property
    def where_(self) -> str:
        cfg = self.config
        return f"http://{cfg.host}:{cfg.port}" if cfg.kind == "chroma-server" else str(cfg.path)

    def upsert(self, chunks: list[Chunk], vectors: np.ndarray) -> None:
        """Insert or replace chunks by id, in batches (each batch one transaction)."""
        vectors = _check_vectors(chunks, vectors)
        for start in range(0, len(chunks), self.batch):
            part = chunks[start:start + self.batch]
            self._call(self.collection.upsert, ids=[c.id for c in part], embeddings=vectors[start:start + len(part)],
                       documents=[c.text for c in part], metadatas=[c.flat_metadata() for c in part])

    def delete(self, ids: list[str]) -> None:
        """Remove chunks by id (unknown ids are ignored)."""
        for start in range(0, len(ids), self.batch):
            self._call(self.collection.delete, ids=list(ids[start:start + self.batch]))

    def query(self, vector: np.ndarray, k: int, where: Where | None = None) -> list[Hit]:
        """The k nearest chunks by cosine similarity, optionally only those matching `where`."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        k = min(k, self.count())
        if k == 0:
            return []
        vector = np.asarray(vector, dtype=np.float32).reshape(1, -1)
        res = self._call(self.collection.query, query_embeddings=vector, n_results=k, where=to_chroma_where(where),
                         include=["documents", "metadatas", "distances"])
        rows = zip(res["ids"][0], res["documents"][0], res["metadatas"][0], res["distances"][0])
        return [Hit(_chunk(i, d, m), 1.0 - float(dist), rank) for rank, (i, d, m, dist) in enumerate(rows)]

    def get(self, ids: list[str]) -> list[Chunk]:
        """Chunks by id, in the order asked (missing ids are left out)."""
        res = self._call(self.collection.get, ids=list(ids), include=["documents", "metadatas"])
        found = {i: _chunk(i, d, m) for i, d, m in zip(res["ids"], res["documents"], res["metadatas"])}
        return [found[i] for i in ids if i in found]

    def count(self) -> int:
        return int(self._call(self.collection.count))

    def iter_chunks(self, batch: int = 5000) -> Iterator[Chunk]:
        """Every chunk, page by page (for BM25 and export)."""
        total = self.count()
        for offset in range(0, total, batch):
            res = self._call(self.collection.get, limit=batch, offset=offset, include=["documents", "metadatas"])
            for i, d, m in zip(res["ids"], res["documents"], res["metadatas"]):
                yield _chunk(i, d, m)

    def vectors(self, ids: list[str]) -> np.ndarray:
        """Stored vectors of `ids` (tests use them for brute-force references)."""
        res = self._call(self.collection.get, ids=list(ids), include=["embeddings"])
        order = {i: n for n, i in enumerate(res["ids"])}
        return np.asarray([res["embeddings"][order[i]] for i in ids], dtype=np.float32)

    def _call(self, fn, *args, **kwargs):
        """Run a Chroma call; a refused connection becomes a ConnectionError naming the fix."""
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            if _is_connection_error(err):
                raise ConnectionError(_down_message(self.config, err)) from None
            raise


def _chunk(id_: str, text: str | None, meta: dict | None) -> Chunk:
    meta = dict(meta or {})
    source, section = str(meta.pop("source", "")), str(meta.pop("section", ""))
    return Chunk(id_, text or "", source, section, meta)


def _is_connection_error(err: BaseException) -> bool:
    names = {type(e).__name__ for e in (err, err.__cause__, err.__context__) if e is not None}
    text = str(err).lower()
    return bool(names & {"ConnectError", "ConnectionError", "ConnectTimeout", "ReadTimeout", "RemoteProtocolError"}) \
        or "could not connect" in text or "connection refused" in text


def _down_message(config: StoreConfig, err: BaseException) -> str:
    return (f"the Chroma server at http://{config.host}:{config.port} does not answer ({type(err).__name__}); "
            f"start it with `chroma run --path DIR --host {config.host} --port {config.port}` or use the "
            f"embedded store (--store chroma)")


def open_store(config: StoreConfig, create: bool = False) -> ChromaStore:
    """Open (or with `create`, create) the store a config names; clear errors when it is missing or down."""
    import chromadb
    from chromadb.config import Settings

    settings = Settings(anonymized_telemetry=False, allow_reset=False)
    if config.kind == "chroma":
        path = Path(config.path)
        if not create and not (path / "chroma.sqlite3").is_file():
            raise ValueError(f"no index at {path}; build one with `lmforge rag index PATH --index {path}`")
        path.mkdir(parents=True, exist_ok=True)
        return ChromaStore(chromadb.PersistentClient(path=str(path), settings=settings), config, create)
    try:
        client = chromadb.HttpClient(host=config.host, port=config.port, settings=settings)
        client.heartbeat()
    except Exception as err:
        raise ConnectionError(_down_message(config, err)) from None
    return ChromaStore(client, config, create)


def brute_force(vectors: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by cosine similarity: (indices, similarities); the reference for every store."""
    v = vectors / np.linalg.norm(vectors, axis=1, keepdims=True).clip(1e-12)
    q = query / max(float(np.linalg.norm(query)), 1e-12)
    sims = v @ q
    k = min(k, len(sims))
    top = np.argpartition(-sims, k - 1)[:k] if k else np.array([], dtype=int)
    top = top[np.argsort(-sims[top], kind="stable")]
    return top, sims[top]


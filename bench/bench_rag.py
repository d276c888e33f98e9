"""RAG benchmark: retrieval quality on the Python FAQ, store speed at 10k/100k chunks, agent and safety rates.

    python bench/bench_rag.py --json bench/results/rag.json
    python bench/bench_rag.py --sizes 10000 --rerank-queries 30 --no-agent   # quicker

1. Quality: the 179 questions of Debian's python3.11-doc FAQ against its chunked answers (see
   lmforge/rag/evaluate.py): BM25, dense, hybrid (RRF), hybrid + LM rerank; recall@k, MRR, NDCG, latency.
2. Stores: Chroma embedded and Chroma server (`chroma run` on 127.0.0.1): upsert chunks/s and query
   p50/p95 at each size. The vectors are synthetic: real MiniLM vectors of the FAQ chunks and
   questions, perturbed (Gaussian noise, renormalized) to reach the size; texts are the real chunks'.
   End-to-end indexing speed = embedding (measured on the real chunks) then upsert.
3. Agent: the ReAct task set with SmolLM2-135M. 4. Safety: injection rates, PII labeled set.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmforge.rag.chunks import Chunk  # noqa: E402
from lmforge.rag.store import StoreConfig, open_store  # noqa: E402


def table(rows: list[dict], keys: list[str]) -> str:
    lines = ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    for row in rows:
        lines.append("| " + " | ".join(f"{row[k]:.3f}" if isinstance(row[k], float) else str(row[k]) for k in keys)
                     + " |")
    return "\n".join(lines)


def quality(workdir: Path, rerank_queries: int, loaded) -> tuple[list[dict], dict]:
    """Every retriever on the FAQ; rerank on an evenly spaced subset (the others reported on it too)."""
    from lmforge.rag.embed import MiniLMEmbedder
    from lmforge.rag.evaluate import faq_eval_set, run_eval
    from lmforge.rag.pipeline import build_retriever
    from lmforge.rag.retrieve import RetrieveConfig

    chunks, queries = faq_eval_set()
    embedder = MiniLMEmbedder()
    embedder.embed(["warm up"])
    start = time.perf_counter()
    vectors = embedder.embed([c.text for c in chunks])
    embed_s = time.perf_counter() - start
    store = open_store(StoreConfig(kind="chroma", path=str(workdir / "faq")), create=True)
    store.upsert(chunks, vectors)
    step = max(1, len(queries) // rerank_queries) if rerank_queries else 0
    subset = queries[::step][:rerank_queries] if step else []
    rows = []
    for name, config in [("bm25", RetrieveConfig(mode="bm25")), ("dense", RetrieveConfig(mode="dense")),
                         ("hybrid", RetrieveConfig(mode="hybrid")),
                         ("hybrid+rerank", RetrieveConfig(mode="hybrid", candidates=10, rerank=True))]:
        retriever = build_retriever(config, store, embedder, loaded if config.rerank else None)
        if not config.rerank:
            rows.append({"method": name, "queries": "all", **run_eval(retriever, queries)})
        if subset:
            rows.append({"method": name, "queries": f"subset {len(subset)}", **run_eval(retriever, subset)})
        print(f"  {name} done", file=sys.stderr)
    info = {"chunks": len(chunks), "queries": len(queries), "embed_chunks_per_s": len(chunks) / embed_s,
            "vectors": vectors, "query_vectors": embedder.embed([q.text for q in queries]), "chunk_list": chunks}
    return rows, info


def synthetic(base: np.ndarray, texts: list[str], n: int, seed: int = 0, sigma: float = 0.03):
    """n chunks: base vectors + N(0, sigma^2) noise per dimension, renormalized; texts reused."""
    rng = np.random.default_rng(seed)
    idx = np.arange(n) % len(base)
    vectors = base[idx] + rng.normal(scale=sigma, size=(n, base.shape[1])).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    chunks = [Chunk(f"s{i}", texts[j], f"synthetic/{j % 50}", "", {"base": int(j)}) for i, j in enumerate(idx)]
    return chunks, vectors.astype(np.float32)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(path: Path) -> tuple[subprocess.Popen, StoreConfig]:
    binary = shutil.which("chroma", path=str(Path(sys.executable).parent)) or "chroma"
    port = free_port()
    proc = subprocess.Popen([binary, "run", "--host", "127.0.0.1", "--port", str(port), "--path", str(path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    config = StoreConfig(kind="chroma-server", port=port)
    for _ in range(300):
        try:
            open_store(config, create=True)
            return proc, config
        except ConnectionError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("chroma run did not start")


def store_speed(workdir: Path, info: dict, sizes: list[int], n_queries: int = 200) -> list[dict]:
    """Upsert rate and query latency for both stores at each size."""
    base = np.vstack([info["vectors"], info["query_vectors"]])
    texts = [c.text for c in info["chunk_list"]] + [c.text for c in info["chunk_list"][:len(info["query_vectors"])]]
    rng = np.random.default_rng(1)
    queries = info["query_vectors"] + rng.normal(scale=0.02, size=info["query_vectors"].shape).astype(np.float32)
    rows = []
    for size in sizes:
        chunks, vectors = synthetic(base, texts, size)
        for kind in ("chroma", "chroma-server"):
            proc = None
            if kind == "chroma":
                config = StoreConfig(kind="chroma", path=str(workdir / f"emb{size}"))
            else:
                proc, config = start_server(workdir / f"srv{size}")
            try:
                store = open_store(config, create=True)
                start = time.perf_counter()
                store.upsert(chunks, vectors)
                upsert_s = time.perf_counter() - start
                lat = []
                for q in np.resize(queries, (n_queries, queries.shape[1])):
                    t = time.perf_counter()
                    store.query(q, 10)
                    lat.append((time.perf_counter() - t) * 1000)
                upsert_rate = size / upsert_s
                end_to_end = 1 / (1 / upsert_rate + 1 / info["embed_chunks_per_s"])
                rows.append({"store": kind, "chunks": size, "upsert_chunks_per_s": upsert_rate,
                             "index_chunks_per_s_with_embedding": end_to_end,
                             "query_p50_ms": float(np.percentile(lat, 50)), "query_p95_ms": float(np.percentile(lat, 95))})
                print(f"  {kind} {size} done", file=sys.stderr)
            finally:
                if proc is not None:
                    proc.terminate()
                    proc.wait(timeout=30)
    return rows


def safety(info: dict) -> dict:
    """Injection detection/false-positive rates (held-out split, and real FAQ chunks as benign)."""
    from lmforge.safety import injection_data
    from lmforge.safety.injection import detect_injection

    out = {}
    for split in ("train", "test"):
        docs = injection_data.documents(split)
        flags = [(detect_injection(t).flagged, y) for t, y in docs]
        out[f"{split}_detection_rate"] = sum(f for f, y in flags if y) / sum(y for _, y in flags)
        out[f"{split}_false_positive_rate"] = sum(f for f, y in flags if not y) / sum(1 - y for _, y in flags)
        out[f"{split}_documents"] = len(docs)
    real = [detect_injection(c.text).flagged for c in info["chunk_list"]]
    out["faq_chunks_false_positive_rate"] = sum(real) / len(real)
    out["faq_chunks"] = len(real)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--rerank-queries", type=int, default=60, help="FAQ questions for hybrid+rerank (0: skip)")
    parser.add_argument("--agent", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--json", default=None, help="write the results here as JSON")
    args = parser.parse_args()
    from lmforge import hub
    from lmforge.checkpoint.load import load

    loaded = load(hub.resolve("smollm2-135m-instruct", pull_missing=True))
    result: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        rows, info = quality(Path(tmp), args.rerank_queries, loaded)
        result["quality"] = rows
        result["embed_chunks_per_s"] = info["embed_chunks_per_s"]
        print(table(rows, ["method", "queries", "recall@1", "recall@5", "recall@10", "mrr", "ndcg@10", "p50_ms",
                           "p95_ms"]))
        result["stores"] = store_speed(Path(tmp), info, args.sizes)
        print(table(result["stores"], list(result["stores"][0])))
        result["safety"] = safety(info)
        print(json.dumps(result["safety"], indent=1))
    if args.agent:
        from lmforge.agents.react import AgentConfig, LMPolicy
        from lmforge.agents.tasks import run_tasks

        records = run_tasks(LMPolicy(*loaded, max_tokens=64), AgentConfig(max_steps=4, max_seconds=120))
        result["agent"] = {"success_rate": sum(r["success"] for r in records) / len(records), "tasks": records}
        print(table(records, ["kind", "success", "steps", "stopped", "parse_errors", "seconds", "question"]))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Stores: exact neighbours against brute force, upsert/delete/filters, restart and killed writes, the server."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from lmforge.rag.chunks import Chunk
from lmforge.rag.store import StoreConfig, brute_force, open_store

pytest.importorskip("chromadb")
DIM = 32


def corpus(n: int, seed: int = 0) -> tuple[list[Chunk], np.ndarray]:
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n, DIM)).astype(np.float32)
    chunks = [Chunk(f"c{i}", f"text {i}", f"src{i % 3}", f"sec{i % 2}", {"n": i}) for i in range(n)]
    return chunks, vectors


def check_exact(store, chunks, vectors, queries=10, k=5, seed=1):
    rng = np.random.default_rng(seed)
    for q in rng.normal(size=(queries, DIM)).astype(np.float32):
        idx, sims = brute_force(vectors, q, k)
        hits = store.query(q, k)
        assert [h.id for h in hits] == [chunks[i].id for i in idx]
        np.testing.assert_allclose([h.score for h in hits], sims, atol=1e-4)


@pytest.fixture
def embedded(tmp_path):
    return open_store(StoreConfig(kind="chroma", path=str(tmp_path / "db")), create=True)


def test_exact_neighbours_on_small_sets(embedded):
    chunks, vectors = corpus(300)
    embedded.upsert(chunks, vectors)
    assert embedded.count() == 300
    check_exact(embedded, chunks, vectors)


def test_upsert_delete_and_filters(embedded):
    chunks, vectors = corpus(60)
    embedded.upsert(chunks, vectors)
    embedded.upsert([Chunk("c0", "replaced", "src9")], -vectors[:1])  # same id: replaced, not added
    assert embedded.count() == 60 and embedded.get(["c0"])[0].text == "replaced"
    assert embedded.query(-vectors[0], 1)[0].id == "c0"
    embedded.delete(["c1", "c2", "missing"])
    assert embedded.count() == 58 and embedded.get(["c1", "c3"])[0].id == "c3"
    hits = embedded.query(vectors[5], 10, where={"source": "src1", "section": "sec0"})
    assert hits and all(h.chunk.source == "src1" and h.chunk.section == "sec0" for h in hits)
    assert {h.chunk.source for h in embedded.query(vectors[5], 50, where={"source": ["src0", "src2"]})} <= {"src0", "src2"}
    assert embedded.get(["c7"])[0].metadata["n"] == 7


def test_bad_inputs(embedded, tmp_path):
    chunks, vectors = corpus(3)
    with pytest.raises(ValueError, match="one vector per chunk"):
        embedded.upsert(chunks, vectors[:2])
    with pytest.raises(ValueError, match="NaN"):
        embedded.upsert(chunks, vectors * np.nan)
    assert embedded.query(vectors[0], 3) == []  # empty store: no hits, no crash
    with pytest.raises(ValueError, match="no index at"):
        open_store(StoreConfig(kind="chroma", path=str(tmp_path / "missing")))
    assert not (tmp_path / "missing").exists()
    with pytest.raises(ValueError, match="needs a folder"):
        StoreConfig(kind="chroma")


WRITER = textwrap.dedent("""
    import sys, numpy as np
    from lmforge.rag.chunks import Chunk
    from lmforge.rag.store import StoreConfig, open_store
    store = open_store(StoreConfig(kind="chroma", path=sys.argv[1]), create=True)
    rng = np.random.default_rng(0)
    for b in range(int(sys.argv[2])):
        chunks = [Chunk(f"b{b}-{i}", f"batch {b} item {i}") for i in range(200)]
        store.upsert(chunks, rng.normal(size=(200, 32)).astype(np.float32))
        print(b, flush=True)
""")


def run_writer(path: Path, batches: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(batches)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})


def test_survives_process_restart(tmp_path):
    proc = run_writer(tmp_path / "db", 2)
    assert proc.wait(timeout=120) == 0
    store = open_store(StoreConfig(kind="chroma", path=str(tmp_path / "db")))
    assert store.count() == 400
    vector = store.vectors(["b1-7"])[0]
    assert store.query(vector, 1)[0].id == "b1-7"


def test_survives_a_killed_write(tmp_path):
    proc = run_writer(tmp_path / "db", 1000)
    for _ in range(3):  # let it commit a few batches, then kill it mid-stream
        proc.stdout.readline()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    store = open_store(StoreConfig(kind="chroma", path=str(tmp_path / "db")))
    count = store.count()
    assert count >= 600 and count % 200 == 0  # whole batches only: each upsert is one transaction
    ids = [c.id for c in store.iter_chunks()]
    assert len(ids) == count == len(set(ids))
    chunks, vectors = corpus(50, seed=3)
    store.upsert(chunks, vectors)  # still writable
    assert store.count() == count + 50 and store.query(vectors[4], 1)[0].id == "c4"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def chroma_server(tmp_path):
    """`chroma run` on 127.0.0.1 at a free port, stopped after the test."""
    binary = shutil.which("chroma", path=str(Path(sys.executable).parent)) or shutil.which("chroma")
    if binary is None:
        pytest.skip("the chroma CLI is not installed")
    port = free_port()
    proc = subprocess.Popen([binary, "run", "--host", "127.0.0.1", "--port", str(port), "--path", str(tmp_path / "srv")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    config = StoreConfig(kind="chroma-server", port=port)
    deadline = time.monotonic() + 30
    while True:
        try:
            open_store(config, create=True)
            break
        except ConnectionError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("chroma run did not start")
            time.sleep(0.1)
    yield config, proc, tmp_path / "srv"
    proc.terminate()
    proc.wait(timeout=20)


def test_server_store_same_protocol(chroma_server):
    config, proc, _ = chroma_server
    store = open_store(config, create=True)
    chunks, vectors = corpus(200)
    store.upsert(chunks, vectors)
    check_exact(store, chunks, vectors)
    store.delete(["c0"])
    assert store.count() == 199
    assert all(h.chunk.source == "src2" for h in store.query(vectors[3], 5, where={"source": "src2"}))


def test_server_down_is_a_clear_error(chroma_server):
    config, proc, path = chroma_server
    store = open_store(config, create=True)
    chunks, vectors = corpus(20)
    store.upsert(chunks, vectors)
    proc.terminate()
    proc.wait(timeout=20)
    with pytest.raises(ConnectionError, match="does not answer.*chroma run"):
        store.query(vectors[0], 3)
    with pytest.raises(ConnectionError, match="does not answer"):
        open_store(config)
    # nothing corrupted: the embedded client reads what the server wrote (same engine, same files)
    embedded = open_store(StoreConfig(kind="chroma", path=str(path), collection=config.collection))
    assert embedded.count() == 20 and embedded.query(vectors[7], 1)[0].id == "c7"

"""MiniLMEmbedder: equals sentence-transformers on the same folder; unit rows; disk cache by content hash."""

from __future__ import annotations

import numpy as np
import pytest

from lmforge.rag.embed import DIM, EmbedConfig, Embedder, MiniLMEmbedder, default_model_dir

TEXTS = ["How do I sort a list in Python?", "", "héllo wörld ☃", "Python is a programming language. " * 80]


@pytest.fixture(scope="module")
def embedder():
    return MiniLMEmbedder(EmbedConfig(batch_size=2))


def test_shape_dtype_unit_norm(embedder):
    out = embedder.embed(TEXTS)
    assert isinstance(embedder, Embedder)
    assert out.shape == (len(TEXTS), DIM) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert embedder.embed([]).shape == (0, DIM)


def test_equals_sentence_transformers(embedder):
    st = pytest.importorskip("sentence_transformers")
    ref = st.SentenceTransformer(str(default_model_dir()), device="cpu").encode(TEXTS, batch_size=3)
    np.testing.assert_allclose(embedder.embed(TEXTS), ref, atol=1e-5)


def test_batching_and_order_do_not_change_vectors(embedder):
    whole = embedder.embed(TEXTS)
    one_by_one = np.vstack([embedder.embed([t]) for t in TEXTS])
    np.testing.assert_allclose(whole, one_by_one, atol=1e-5)
    assert float(whole[0] @ embedder.embed(["Sorting a Python list"])[0]) > 0.6


def test_disk_cache_hits_and_survives_torn_files(tmp_path, embedder):
    cached = MiniLMEmbedder(EmbedConfig(cache_dir=str(tmp_path)))
    cached._model, cached._tokenizer = embedder._model, embedder._tokenizer  # share the loaded weights
    first = cached.embed(TEXTS[:2])
    files = sorted(tmp_path.rglob("*.f32"))
    assert len(files) == 2 and not list(tmp_path.rglob(".tmp-*"))
    cached._model = None  # a cache hit must not need the model
    cached._load = lambda: pytest.fail("cache miss")
    np.testing.assert_array_equal(cached.embed(TEXTS[:2]), first)
    files[0].write_bytes(b"torn")  # a half-written file is ignored and recomputed
    cached._model, cached._load = embedder._model, embedder._load
    np.testing.assert_allclose(cached.embed(TEXTS[:2]), first, atol=1e-6)


def test_bad_input(embedder):
    with pytest.raises(TypeError, match="list of str"):
        embedder.embed("not a list")
    with pytest.raises(TypeError):
        embedder.embed([b"bytes"])
    with pytest.raises(ValueError, match="batch_size"):
        EmbedConfig(batch_size=0)

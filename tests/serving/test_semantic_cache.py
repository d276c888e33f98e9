"""Semantic cache: near-identical prompts hit, different prompts or settings miss."""

from __future__ import annotations

import httpx
import pytest

from lmforge.serving.semantic_cache import CachedCompletion, SemanticCache


@pytest.fixture(scope="module")
def embedder():
    embed = pytest.importorskip("lmforge.rag.embed")
    try:
        return embed.MiniLMEmbedder()
    except Exception as err:  # the model package is not installed
        pytest.skip(f"all-MiniLM-L6-v2 unavailable: {err}")


def test_hits_paraphrase_misses_other_topics_and_settings(embedder):
    cache = SemanticCache(embedder, threshold=0.95)
    answer = CachedCompletion("Paris.", "stop", 2)
    cache.store("What is the capital of France?", "greedy-16", answer)
    assert cache.lookup("What's the capital city of France?", "greedy-16") == answer
    assert cache.lookup("How do I bake bread?", "greedy-16") is None
    assert cache.lookup("What is the capital of France?", "greedy-64") is None  # other settings


def test_lru_bound(embedder):
    cache = SemanticCache(embedder, threshold=0.99, max_entries=2)
    for i, text in enumerate(["alpha beta", "gamma delta", "epsilon zeta"]):
        cache.store(text, "s", CachedCompletion(str(i), "stop", 1))
    assert len(cache.entries) == 2 and cache.lookup("alpha beta", "s") is None


def test_bad_threshold_is_refused(embedder):
    with pytest.raises(ValueError, match="threshold"):
        SemanticCache(embedder, threshold=1.5)


@pytest.mark.real_model
def test_server_answers_repeat_from_cache_and_counts_it(smollm2_gguf, embedder, serve_process):
    proc, base = serve_process(smollm2_gguf, "--semantic-cache")
    try:
        ask = {"model": "smol", "max_tokens": 12, "temperature": 0}
        first = httpx.post(f"{base}/v1/chat/completions", timeout=60, json={
            **ask, "messages": [{"role": "user", "content": "What is the capital of France?"}]}).json()
        again = httpx.post(f"{base}/v1/chat/completions", timeout=60, json={
            **ask, "messages": [{"role": "user", "content": "What's the capital city of France?"}]}).json()
        other = httpx.post(f"{base}/v1/chat/completions", timeout=60, json={
            **ask, "messages": [{"role": "user", "content": "Give me a bread recipe."}]}).json()
        assert again["choices"][0]["message"] == first["choices"][0]["message"]
        assert again.get("system_fingerprint") == "lmforge-semantic-cache"
        assert other.get("system_fingerprint") is None
        metrics = httpx.get(f"{base}/metrics").text
        assert "lmforge_semantic_cache_hits_total 1.0" in metrics
        assert "lmforge_semantic_cache_misses_total 2.0" in metrics
    finally:
        proc.terminate()
        proc.wait(timeout=30)

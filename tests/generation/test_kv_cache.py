"""The static KV cache keeps only what a window layer can still see: pure sliding-window sparse kinds get a
ring of their reach (+ SPARE_SLOTS), and generation, left padding, beam search, speculative decoding and a
model draft give the same tokens as with a slot per token for every layer."""

from __future__ import annotations

import pytest
import torch

from lmforge.config import Config
from lmforge.generation import kv_cache
from lmforge.generation.beam import beam_generate
from lmforge.generation.drafts import ModelDraft
from lmforge.generation.generate import generate_ids
from lmforge.generation.kv_cache import SPARE_SLOTS, KVCache
from lmforge.generation.sampling import SamplingParams
from lmforge.generation.speculative import speculative_ids
from lmforge.model.transformer import build_model, init_weights

GREEDY = SamplingParams(max_new_tokens=40, temperature=0)


def window_model(seed: int = 0):
    """4 layers: a window of 16, a dilated window (reach 16), full attention, window + global tokens."""
    torch.manual_seed(seed)
    config = Config.from_name(
        "tiny-llama", n_layer=4, block_size=512, layer_types=["local", "dilated", "global", "mixed"],
        sparse_patterns={"local": {"window": 16}, "dilated": {"window": 6, "dilation": 3},
                         "mixed": {"window": 16, "global_tokens": 4}})
    model = build_model(config)
    init_weights(model, std=0.2)  # larger weights than GPT-2's, so greedy tokens vary
    return model.eval()


def test_only_pure_window_layers_get_rings():
    cache = KVCache(window_model().config, 2, 300)
    assert cache.rings == [15 + SPARE_SLOTS, 15 + SPARE_SLOTS, None, None]
    assert [k.shape[2] for k in cache.k] == [15 + SPARE_SLOTS, 15 + SPARE_SLOTS, 300, 300]
    assert KVCache(window_model().config, 1, 60).rings == [None] * 4  # a ring as long as the cache saves nothing


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (150,), generator=g).tolist(), torch.randint(0, 256, (97,), generator=g).tolist()]


def _reference(fn, monkeypatch):
    """fn() with a slot per token in every layer (no rings): the reference."""
    monkeypatch.setattr(kv_cache, "ring_size", lambda config, layer, max_len: None)
    try:
        return fn()
    finally:
        monkeypatch.undo()


def test_generation_with_rings_equals_a_slot_per_token(monkeypatch):
    """Left-padded batch, prompts longer than the ring, 40 decode steps that wrap it again."""
    model, prompts = window_model(), _prompts()
    got = generate_ids(model, prompts, GREEDY)
    assert got == _reference(lambda: generate_ids(model, prompts, GREEDY), monkeypatch)
    assert len(set(got[0])) > 3, "the model repeats itself; the comparison would be weak"


def test_beam_search_with_rings_equals_a_slot_per_token(monkeypatch):
    model, prompt = window_model(), _prompts()[0]
    params = SamplingParams(max_new_tokens=20, temperature=0, num_beams=3)
    assert beam_generate(model, prompt, params) == _reference(lambda: beam_generate(model, prompt, params), monkeypatch)


def test_speculative_decoding_rolls_rings_back():
    """A draft model near the target (its weights + noise) has drafts accepted and rejected: both caches
    truncate their rings within the spare slots, and the tokens stay the target's greedy ones."""
    model, draft = window_model(), window_model()
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn_like(p) * 0.005)
    prompt = _prompts()[0]
    ids, stats = speculative_ids(model, [prompt], GREEDY, ModelDraft(draft, k=8))
    assert ids == generate_ids(model, [prompt], GREEDY)
    assert stats["drafted"] > stats["accepted"] > 0, "drafts were all accepted or all rejected"


def test_model_draft_restarts_its_cache_when_the_ring_cannot_roll_back():
    draft = ModelDraft(window_model(1))
    params = SamplingParams(max_new_tokens=4, temperature=0)
    first, second = _prompts()
    draft.propose(first, 4, params)
    assert not draft.cache.can_truncate(3)  # 150 tokens fed: a ring no longer holds slot 3's neighbours
    assert draft.propose(second, 4, params).tokens == ModelDraft(window_model(1)).propose(second, 4, params).tokens


def test_truncating_past_the_spare_slots_is_refused():
    model = window_model()
    cache = KVCache(model.config, 1, 300)
    with torch.no_grad():
        model(torch.randint(0, 256, (1, 120)), cache=cache)
    cache.truncate(120 - SPARE_SLOTS)  # as far as the rings allow
    assert not cache.can_truncate(120 - SPARE_SLOTS - 1)  # counted from the 120 slots filled, not from 56
    with pytest.raises(ValueError, match="roll back at most"):
        cache.truncate(10)

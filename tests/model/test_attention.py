"""Attention: SDPA equals plain math for MHA, GQA and MQA; masks follow positions; padding is inert."""

from __future__ import annotations

import pytest
import torch

from lmforge.config import Config
from lmforge.generation.kv_cache import KVCache
from lmforge.model.attention import math_attention, sdpa_attention
from lmforge.model.masks import attention_mask, positions_from_padding
from lmforge.model.transformer import build_model


@pytest.mark.parametrize("n_head,n_kv_head", [(4, 4), (4, 2), (4, 1)])  # MHA, GQA, MQA
@pytest.mark.parametrize("masked", [False, True])
def test_sdpa_equals_math(n_head, n_kv_head, masked):
    q = torch.randn(2, n_head, 7, 16)
    k, v = torch.randn(2, n_kv_head, 7, 16), torch.randn(2, n_kv_head, 7, 16)
    mask = None
    if masked:
        valid = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7], dtype=torch.bool)
        pos = positions_from_padding(valid)
        mask = attention_mask(pos, pos, valid, window=3)
    causal = not masked
    torch.testing.assert_close(sdpa_attention(q, k, v, mask, causal, 0.25), math_attention(q, k, v, mask, causal, 0.25))


def test_mask_matches_definition():
    valid = torch.tensor([[False, True, True, True, True]])
    pos = positions_from_padding(valid)
    mask = attention_mask(pos, pos, valid, window=2)[0, 0]
    for i in range(5):
        for j in range(5):
            expected = bool(valid[0, j]) and 0 <= int(pos[0, i] - pos[0, j]) < 2
            if valid[0, i]:
                assert bool(mask[i, j]) == expected


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2", "tiny-gemma3"])
def test_both_attention_implementations_give_equal_logits(preset):
    torch.manual_seed(0)
    sdpa = build_model(Config.from_name(preset)).eval()
    math = build_model(Config.from_name(preset, attn_impl="math")).eval()
    math.load_state_dict(sdpa.state_dict())
    ids = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(sdpa(ids), math(ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2", "tiny-gemma3"])
def test_left_padding_does_not_change_real_tokens(preset):
    model = build_model(Config.from_name(preset)).eval()
    ids = torch.randint(1, 256, (1, 12))
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), ids], dim=1)
    valid = torch.cat([torch.zeros(1, 5, dtype=torch.bool), torch.ones(1, 12, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        plain = model(ids)
        got = model(padded, positions=positions_from_padding(valid), valid=valid)[:, 5:]
    torch.testing.assert_close(got, plain, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gemma3"])
def test_chunked_prefill_through_cache_equals_one_pass(preset):
    model = build_model(Config.from_name(preset)).eval()  # gemma3 preset: window 8, so chunks cross it
    ids = torch.randint(0, 256, (1, 30))
    cache = KVCache(model.config, 1, 30)
    with torch.no_grad():
        full = model(ids)
        parts = [model(ids[:, a:b], cache=cache) for a, b in [(0, 7), (7, 19), (19, 20), (20, 30)]]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_cache_overflow_is_a_clear_error():
    model = build_model(Config.from_name("tiny-llama")).eval()
    cache = KVCache(model.config, 1, 8)
    with pytest.raises(ValueError, match="KV cache holds 8 tokens"):
        model(torch.zeros(1, 9, dtype=torch.long), cache=cache)


def test_position_past_context_is_a_clear_error():
    model = build_model(Config.from_name("tiny-gpt2")).eval()
    with pytest.raises(ValueError, match="past the context length 256"):
        model(torch.zeros(1, 300, dtype=torch.long))


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gemma3"])
def test_bf16_model_runs_with_cache(preset):
    from lmforge.generation.generate import generate_ids
    from lmforge.generation.sampling import SamplingParams

    model = build_model(Config.from_name(preset)).to(torch.bfloat16).eval()
    with torch.no_grad():
        assert model(torch.randint(0, 256, (1, 12))).dtype == torch.bfloat16
    assert len(generate_ids(model, [[1, 2, 3]], SamplingParams(max_new_tokens=6, temperature=0))[0]) == 6

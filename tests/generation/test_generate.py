"""Generation with the KV cache: greedy equals transformers, batching and the cache change nothing."""

from __future__ import annotations

import pytest
import torch

from lmforge.checkpoint.load import load_model
from lmforge.config import Config
from lmforge.generation.generate import generate_ids
from lmforge.generation.sampling import SamplingParams
from lmforge.model.transformer import build_model

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """A tiny random transformers Gemma 3 and LLaMA model, each with our copy loaded from its files."""
    pairs = {}
    torch.manual_seed(0)
    configs = {
        "llama": transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, intermediate_size=128, vocab_size=256,
                                          max_position_embeddings=256),
        "gemma3": transformers.Gemma3TextConfig(hidden_size=64, num_hidden_layers=6, num_attention_heads=4,
                                                num_key_value_heads=1, head_dim=32, intermediate_size=128,
                                                vocab_size=256, sliding_window=8, max_position_embeddings=256,
                                                query_pre_attn_scalar=32),
    }
    for name, cfg in configs.items():
        ref = (transformers.LlamaForCausalLM if name == "llama" else transformers.Gemma3ForCausalLM)(cfg).eval()
        path = tmp_path_factory.mktemp(name)
        ref.save_pretrained(path)
        pairs[name] = (ref, load_model(path))
    return pairs


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_greedy_64_tokens_equals_transformers(hf_pair, name):
    ref, ours = hf_pair[name]
    prompt = torch.randint(0, 256, (1, 12))
    expected = ref.generate(prompt, max_new_tokens=64, do_sample=False, eos_token_id=None, pad_token_id=0)
    got = generate_ids(ours, [prompt[0].tolist()], SamplingParams(max_new_tokens=64, temperature=0))
    assert got[0] == expected[0, 12:].tolist()


def test_cached_decoding_equals_full_recompute():
    model = build_model(Config.from_name("tiny-gemma3")).eval()
    prompt = [5, 17, 3, 99, 42]
    got = generate_ids(model, [prompt], SamplingParams(max_new_tokens=20, temperature=0))[0]
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(20):  # no cache: rerun the whole sequence each step
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert got == ids[len(prompt):]


def test_batched_left_padded_prompts_equal_one_at_a_time():
    model = build_model(Config.from_name("tiny-gemma3")).eval()  # sliding window 8 < prompt lengths
    prompts = [[1, 2, 3], list(range(10, 24)), [7] * 9]
    params = SamplingParams(max_new_tokens=16, temperature=0)
    batched = generate_ids(model, prompts, params)
    alone = [generate_ids(model, [p], params)[0] for p in prompts]
    assert batched == alone


def test_eos_ends_a_row_and_is_not_returned():
    model = build_model(Config.from_name("tiny-llama")).eval()
    free = generate_ids(model, [[1, 2, 3]], SamplingParams(max_new_tokens=10, temperature=0))[0]
    eos = free[4]
    stopped = generate_ids(model, [[1, 2, 3]], SamplingParams(max_new_tokens=10, temperature=0), {eos})[0]
    assert stopped == free[:free.index(eos)]


def test_seeded_sampling_is_reproducible():
    model = build_model(Config.from_name("tiny-llama")).eval()
    params = SamplingParams(max_new_tokens=12, temperature=1.0, top_k=50, seed=7)
    assert generate_ids(model, [[1, 2]], params) == generate_ids(model, [[1, 2]], params)


def test_prompt_longer_than_context_is_a_clear_error():
    model = build_model(Config.from_name("tiny-llama")).eval()
    with pytest.raises(ValueError, match="context is 256; shorten the prompt"):
        generate_ids(model, [[1] * 300], SamplingParams(max_new_tokens=4))
    with pytest.raises(ValueError, match="at least one token"):
        generate_ids(model, [[]], SamplingParams(max_new_tokens=4))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 256\)"):
        generate_ids(model, [[1000]], SamplingParams(max_new_tokens=4))

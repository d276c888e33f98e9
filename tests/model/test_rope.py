"""RoPE scaling kinds give transformers' logits on tiny random LLaMA models, in a full forward and
token by token over the KV cache; NTK-aware equals transformers' dynamic NTK at the length where
the two bases coincide."""

from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmforge.config import Config  # noqa: E402
from lmforge.checkpoint.load import load_model  # noqa: E402
from lmforge.generation.kv_cache import KVCache  # noqa: E402
from lmforge.model.rope import inv_frequencies  # noqa: E402
from lmforge.model.transformer import build_model  # noqa: E402

ORIGINAL = 32  # the reference models' max_position_embeddings: every test runs past it


def _llama(rope_parameters: dict, path, **kw):
    cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=128, vocab_size=256, max_position_embeddings=ORIGINAL,
                                   rope_parameters={"rope_theta": 10000.0, **rope_parameters}, **kw)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path)
    return model


KINDS = {
    "dynamic": {"rope_type": "dynamic", "factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0},
    "yarn-betas-attention-factor": {"rope_type": "yarn", "factor": 8.0, "beta_fast": 16.0, "beta_slow": 2.0,
                                    "attention_factor": 1.3},
    "yarn-original-length": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 16},
    "yarn-mscale": {"rope_type": "yarn", "factor": 4.0, "mscale": 0.707, "mscale_all_dim": 1.0},
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_logits_equal_transformers_past_the_original_context(kind, tmp_path):
    reference = _llama(KINDS[kind], tmp_path)
    ours = load_model(tmp_path)
    assert ours.config.rope_scaling == KINDS[kind]["rope_type"]
    ids = torch.randint(0, 256, (2, min(3 * ORIGINAL, ours.config.block_size)))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), reference(ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["dynamic", "yarn"])
def test_cached_decoding_equals_transformers_step_by_step(kind, tmp_path):
    """Dynamic NTK re-derives its base as the sequence grows; keys already cached keep their rotation."""
    reference = _llama(KINDS[kind], tmp_path)
    ours = load_model(tmp_path)
    ids = torch.randint(0, 256, (1, ORIGINAL - 4))
    cache = KVCache(ours.config, 1, 128)
    past = transformers.DynamicCache(config=reference.config)
    with torch.no_grad():
        got, want = ours(ids, cache=cache)[:, -1], reference(ids, cache=past, use_cache=True).logits[:, -1]
        for _ in range(12):  # crosses the original length
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
            nxt = want.argmax(-1, keepdim=True)
            got = ours(nxt, cache=cache)[:, -1]
            want = reference(nxt, cache=past, use_cache=True).logits[:, -1]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_greedy_generation_equals_transformers_with_dynamic_ntk(tmp_path):
    from lmforge.generation.generate import generate_ids
    from lmforge.generation.sampling import SamplingParams

    reference = _llama(KINDS["dynamic"], tmp_path)
    ours = load_model(tmp_path)
    prompt = torch.randint(0, 256, (1, ORIGINAL - 8))
    with torch.no_grad():
        want = reference.generate(prompt, max_new_tokens=20, do_sample=False)[0, prompt.shape[1]:].tolist()
    got = generate_ids(ours, [prompt[0].tolist()], SamplingParams(max_new_tokens=20, temperature=0.0))
    assert got == [want]


def test_ntk_aware_equals_dynamic_at_the_matching_length(tmp_path):
    """Static NTK-aware with factor s has the base theta * s^(d/(d-2)); transformers' dynamic NTK reaches the
    same base at length L with s*L/M - (s - 1) = s, i.e. L = M (2s - 1) / s (48 for M = 32, s = 2)."""
    reference = _llama({"rope_type": "dynamic", "factor": 2.0}, tmp_path)
    ours = load_model(tmp_path)
    ntk = Config.from_dict({**ours.config.to_dict(), "rope_scaling": "ntk", "rope_factor": 2.0})
    model = build_model(ntk)
    model.load_state_dict(ours.state_dict())
    ids = torch.randint(0, 256, (1, 48))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(ids).logits, atol=1e-4, rtol=1e-4)


def test_ntk_base_follows_the_formula():
    config = Config.from_name("tiny-llama-ntk")
    d, s, theta = config.head_dim, config.rope_factor, config.rope_theta
    want = 1.0 / (theta * s ** (d / (d - 2))) ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    torch.testing.assert_close(inv_frequencies(config, theta), want.float())


def test_yarn_keeps_high_frequencies_and_interpolates_low_ones():
    config = Config.from_name("tiny-llama-yarn")
    plain = inv_frequencies(Config.from_name("tiny-llama"), config.rope_theta)
    scaled = inv_frequencies(config, config.rope_theta)
    assert scaled[0] == plain[0]  # turns many times in the original context: kept
    torch.testing.assert_close(scaled[-1], plain[-1] / config.rope_factor)  # turns < once: interpolated
    assert bool((scaled <= plain).all())


@pytest.mark.parametrize("name", ["tiny-llama-ntk", "tiny-llama-dynamic", "tiny-llama-yarn"])
def test_presets_run_past_their_original_context(name):
    model = build_model(Config.from_name(name)).eval()
    ids = torch.randint(0, 256, (1, 400))  # the presets were "trained" on 128 positions
    with torch.no_grad():
        assert torch.isfinite(model(ids)).all()


def test_save_hf_round_trips_yarn_through_transformers(tmp_path):
    from lmforge.checkpoint.hf import save_hf

    reference = _llama(KINDS["yarn-betas-attention-factor"], tmp_path / "src")
    save_hf(load_model(tmp_path / "src"), tmp_path / "out")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, 256, (1, 80))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, reference(ids).logits, atol=1e-4, rtol=1e-4)


def test_unknown_rope_kind_is_a_config_error():
    with pytest.raises(ValueError, match="rope_scaling='longrope' is not one of"):
        Config.from_name("tiny-llama", rope_scaling="longrope")
    with pytest.raises(ValueError, match="rope_factor"):
        Config.from_name("tiny-llama", rope_scaling="yarn", rope_factor=0.0)


def test_yarn_attention_factor_default_is_the_papers_temperature():
    from lmforge.model.rope import attention_factor

    config = Config.from_name("tiny-llama-yarn")
    assert attention_factor(config) == pytest.approx(0.1 * math.log(4.0) + 1)

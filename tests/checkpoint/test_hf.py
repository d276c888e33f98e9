"""Logits of models loaded by our Hugging Face reader equal transformers' on the same weights."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmforge.checkpoint.errors import CheckpointError  # noqa: E402
from lmforge.checkpoint.hf import save_hf  # noqa: E402
from lmforge.checkpoint.load import load_model  # noqa: E402


def _llama(**kw):
    args = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=128, vocab_size=256, max_position_embeddings=128)
    cfg = transformers.LlamaConfig(**{**args, **kw})
    return transformers.LlamaForCausalLM(cfg)


def _gemma3(**kw):
    cfg = transformers.Gemma3TextConfig(hidden_size=64, num_hidden_layers=6, num_attention_heads=4,
                                        num_key_value_heads=1, head_dim=32, intermediate_size=128, vocab_size=256,
                                        sliding_window=8, max_position_embeddings=128, query_pre_attn_scalar=32, **kw)
    model = transformers.Gemma3ForCausalLM(cfg)
    with torch.no_grad():  # random norm weights, so the (1 + w) convention is exercised
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.5)
    return model


def _gpt2():
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=128)
    return transformers.GPT2LMHeadModel(cfg)


BUILDERS = {
    "llama": _llama,
    "llama-mqa-untied": lambda: _llama(tie_word_embeddings=False, num_key_value_heads=1),
    "llama-mha-linear-rope": lambda: _llama(num_key_value_heads=4,
                                            rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                             "rope_theta": 500.0}),
    "llama3-rope": lambda: _llama(rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    "gemma3": _gemma3,
    "gpt2": _gpt2,
}


@pytest.fixture(params=sorted(BUILDERS))
def hf_dir(request, tmp_path):
    torch.manual_seed(0)
    model = BUILDERS[request.param]().eval()
    model.save_pretrained(tmp_path)
    return model, tmp_path


@pytest.mark.parametrize("attn_impl", ["sdpa", "math"])
def test_logits_match_transformers(hf_dir, attn_impl):
    reference, path = hf_dir
    ours = load_model(path, attn_impl=attn_impl)
    ids = torch.randint(0, 256, (2, 24))  # longer than the Gemma sliding window (8)
    with torch.no_grad():
        expected = reference(ids).logits
        got = ours(ids)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_save_hf_round_trips_through_transformers(tmp_path):
    reference = _gemma3().eval()
    reference.save_pretrained(tmp_path / "src")
    ours = load_model(tmp_path / "src")
    save_hf(ours, tmp_path / "out")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, reference(ids).logits, atol=1e-4, rtol=1e-4)


def test_missing_directory_parts_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "gpt_neox"}')
    with pytest.raises(CheckpointError, match="model_type 'gpt_neox' is not supported"):
        load_model(tmp_path)
    _llama().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="unreadable safetensors"):
        load_model(tmp_path)

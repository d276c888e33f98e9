"""Mamba checkpoints: tiny random MambaForCausalLM models saved by transformers load through lmforge's
loader with equal logits, greedy and beam ids; lmforge writes what transformers reads; checkpoints
of another family, and SSM types whose mixer is not Mamba-1's, fail with messages that say so."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.checkpoint.errors import CheckpointError
from lmforge.checkpoint.hf import config_from_hf, read_hf_state, save_hf
from lmforge.checkpoint.load import assign_state, load_model
from lmforge.config import Config
from lmforge.generation.beam import beam_generate
from lmforge.generation.generate import generate_ids
from lmforge.generation.sampling import SamplingParams
from lmforge.model.mamba import MambaLM, build_mamba
from lmforge.model.transformer import build_model

transformers = pytest.importorskip("transformers")

CONFIGS = {
    "defaults": dict(),  # tied embeddings, conv bias, no in/out bias, rank "auto"
    "biases-untied": dict(use_bias=True, use_conv_bias=False, tie_word_embeddings=False, time_step_rank=5,
                          conv_kernel=3, state_size=4),
}


def hf_mamba(tmp_path, **overrides):
    """A tiny random MambaForCausalLM saved with save_pretrained; (reference model, its folder)."""
    torch.manual_seed(0)
    cfg = transformers.MambaConfig(**{**dict(vocab_size=96, hidden_size=32, state_size=8, num_hidden_layers=3,
                                             expand=2, conv_kernel=4, pad_token_id=0, eos_token_id=0), **overrides})
    ref = transformers.MambaForCausalLM(cfg).eval()
    ref.save_pretrained(tmp_path)
    return ref, tmp_path


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    ref, path = hf_mamba(tmp_path_factory.mktemp(request.param), **CONFIGS[request.param])
    return ref, load_model(path)


def test_logits_equal_transformers(pair):
    ref, ours = pair
    assert isinstance(ours, MambaLM)
    ids = torch.randint(0, 96, (2, 75))  # crosses chunks of the parallel scan
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, rtol=1e-4, atol=1e-4)


def test_greedy_ids_equal_transformers_generate(pair):
    ref, ours = pair
    for seed in range(3):
        torch.manual_seed(seed)
        prompt = torch.randint(1, 96, (1, 7))
        expected = ref.generate(prompt, max_new_tokens=20, do_sample=False, min_new_tokens=20)[0, 7:].tolist()
        params = SamplingParams(max_new_tokens=20, temperature=0)
        assert generate_ids(ours, [prompt[0].tolist()], params) == [expected]


def test_beam_ids_equal_transformers(pair):
    ref, ours = pair
    torch.manual_seed(3)
    prompt = torch.randint(1, 96, (1, 5))
    expected = ref.generate(prompt, num_beams=3, max_new_tokens=10, min_new_tokens=10, do_sample=False,
                            early_stopping=False)[0, 5:].tolist()
    params = SamplingParams(max_new_tokens=10, temperature=0, num_beams=3)
    assert beam_generate(ours, prompt[0].tolist(), params) == expected


def test_config_fields_from_config_json(tmp_path):
    _, path = hf_mamba(tmp_path, **CONFIGS["biases-untied"])
    config = config_from_hf(path)
    assert (config.arch, config.n_layer, config.n_embd, config.d_state, config.d_conv, config.dt_rank) == \
        ("mamba", 3, 32, 4, 3, 5)
    assert config.bias and not config.conv_bias and not config.tie_embeddings
    assert config.mixers == ["mamba"] * 3


def test_written_mamba_loads_in_transformers(tmp_path):
    model = build_mamba(Config.from_name("tiny-mamba", n_layer=3)).eval()
    save_hf(model, tmp_path)
    ref = transformers.MambaForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 256, (1, 40))
    with torch.no_grad():
        torch.testing.assert_close(ref(ids).logits, model(ids), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(load_model(tmp_path)(ids).detach(), model(ids).detach())


def test_hybrid_is_not_written_as_mamba(tmp_path):
    with pytest.raises(ValueError, match="only pure Mamba models are written"):
        save_hf(build_mamba(Config.from_name("tiny-hybrid")), tmp_path)


def test_mamba_checkpoint_given_to_a_transformer_config(tmp_path):
    _, path = hf_mamba(tmp_path)
    state = read_hf_state(path, config_from_hf(path))
    with pytest.raises(CheckpointError, match="is a Mamba checkpoint .* builds a transformer"):
        assign_state(Config.from_name("tiny-llama"), state, str(path))


def test_transformer_checkpoint_given_to_a_mamba_preset(tmp_path):
    llama = build_model(Config.from_name("tiny-llama"))
    save_hf(llama, tmp_path)
    state = read_hf_state(tmp_path, config_from_hf(tmp_path))
    with pytest.raises(CheckpointError, match="is a transformer checkpoint .* builds a Mamba model"):
        assign_state(Config.from_name("tiny-mamba"), state, str(tmp_path))


def test_mamba_checkpoint_of_another_shape_names_the_tensor(tmp_path):
    _, path = hf_mamba(tmp_path)
    state = read_hf_state(path, config_from_hf(path))
    config = Config.from_name("tiny-mamba", vocab_size=96, n_layer=3, n_embd=32, d_state=16)
    with pytest.raises(CheckpointError, match=r"A_log has shape \(64, 8\), the config expects \(64, 16\)"):
        assign_state(config, state, str(path))


def test_mamba2_checkpoint_is_refused_with_the_reason(tmp_path):
    cfg = transformers.Mamba2Config(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_heads=4, head_dim=16,
                                    state_size=8, n_groups=1)
    transformers.Mamba2ForCausalLM(cfg).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="Mamba-2's SSD mixer"):
        load_model(tmp_path)


def test_config_json_with_another_activation_is_refused(tmp_path):
    _, path = hf_mamba(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "hidden_act": "gelu"}))
    with pytest.raises(CheckpointError, match="gates with silu"):
        config_from_hf(path)

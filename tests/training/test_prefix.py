"""Prefix tuning: PEFT loads our prefix with our logits and we load PEFT's with theirs; generation with
the prefix equals transformers + PEFT greedy generate; only the prefix trains; bad adapters are refused."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from lmforge.checkpoint.load import load_model  # noqa: E402
from lmforge.generation.generate import generate_ids  # noqa: E402
from lmforge.generation.sampling import SamplingParams  # noqa: E402
from lmforge.training.adapters import load_adapter, save_adapter  # noqa: E402
from lmforge.training.objectives.forward import hidden_states  # noqa: E402
from lmforge.training.prefix import PrefixConfig, apply_prefix  # noqa: E402

VOCAB = 256


def _hf_dir(tmp_path, name="base", layers=2, kv_heads=2):
    cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                                   num_key_value_heads=kv_heads, intermediate_size=128, vocab_size=VOCAB,
                                   max_position_embeddings=128)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / name)
    return tmp_path / name


@pytest.fixture
def hf_dir(tmp_path):
    return _hf_dir(tmp_path)


def _training_logits(model, ids):
    T = ids.shape[1]
    batch = {"input_ids": ids, "positions": torch.arange(T).expand_as(ids)}
    return model.logits(hidden_states(model, batch))


def _peft(hf_dir, adapter):
    base = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    return peft.PeftModel.from_pretrained(base, adapter).eval()


@pytest.mark.parametrize("projection", [False, True], ids=["plain", "projection"])
def test_peft_loads_our_prefix_with_our_logits(hf_dir, tmp_path, projection):
    ours = apply_prefix(load_model(hf_dir), PrefixConfig(num_virtual_tokens=5, prefix_projection=projection,
                                                         init="random", encoder_hidden_size=32))
    if projection:  # the last projection layer moved off PEFT's init
        torch.nn.init.normal_(ours.prefix_encoder.transform[-1].weight, std=0.3)
    save_adapter(ours.eval(), tmp_path / "adapter", base_model=str(hf_dir))
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "PREFIX_TUNING" and cfg["token_dim"] == 2 * 16 and cfg["num_attention_heads"] == 2
    reference = _peft(hf_dir, tmp_path / "adapter")
    ids = torch.randint(0, VOCAB, (2, 11))
    with torch.no_grad():
        expected = reference(ids).logits
        torch.testing.assert_close(_training_logits(ours, ids), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours(ids), expected, atol=1e-5, rtol=1e-5)  # plain forward, no cache


@pytest.mark.parametrize("projection", [False, True], ids=["plain", "projection"])
def test_peft_prefix_loads_into_lmforge_with_their_logits(hf_dir, tmp_path, projection):
    base = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=projection)
    reference = peft.get_peft_model(base, config).eval()
    reference.save_pretrained(tmp_path / "theirs")
    ours = load_adapter(load_model(hf_dir), tmp_path / "theirs").eval()
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        expected = reference(ids).logits
        torch.testing.assert_close(_training_logits(ours, ids), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours(ids), expected, atol=1e-5, rtol=1e-5)


def test_generation_with_prefix_equals_peft_generate(hf_dir, tmp_path):
    ours = apply_prefix(load_model(hf_dir), PrefixConfig(num_virtual_tokens=6, init="random")).eval()
    save_adapter(ours, tmp_path / "adapter")
    reference = _peft(hf_dir, tmp_path / "adapter")
    prompt = torch.randint(0, VOCAB, (1, 7))
    with torch.no_grad():
        theirs = reference.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6,
                                    do_sample=False, eos_token_id=None, pad_token_id=0)
    mine = generate_ids(ours, [prompt[0].tolist()], SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True))
    assert mine[0] == theirs[0, 7:].tolist()


def test_left_padded_batch_generates_as_each_prompt_alone(hf_dir):
    model = apply_prefix(load_model(hf_dir), PrefixConfig(num_virtual_tokens=4, init="random")).eval()
    prompts = [torch.randint(0, VOCAB, (n,)).tolist() for n in (3, 8)]
    params = SamplingParams(max_new_tokens=5, temperature=0, ignore_eos=True)
    together = generate_ids(model, prompts, params)
    assert together == [generate_ids(model, [p], params)[0] for p in prompts]


def test_vocab_init_starts_on_real_activations_and_only_the_prefix_trains(hf_dir):
    model = apply_prefix(load_model(hf_dir), PrefixConfig(num_virtual_tokens=3))  # init="vocab"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"prefix_encoder.embedding.weight"}
    ids = torch.randint(0, VOCAB, (2, 8))
    loss = _training_logits(model, ids).logsumexp(-1).mean()
    loss.backward()
    assert model.prefix_encoder.embedding.weight.grad.abs().sum() > 0
    k0 = model.prefix_encoder.key_values()[0][0]
    assert 0.05 < float(k0.detach().std()) < 20  # keys on the scale the model itself computes, not N(0, 1) noise


def test_prefix_for_another_shape_is_refused(tmp_path):
    small = _hf_dir(tmp_path, "small", layers=2)
    other = _hf_dir(tmp_path, "other", layers=3)
    save_adapter(apply_prefix(load_model(small), PrefixConfig(num_virtual_tokens=2)), tmp_path / "adapter")
    with pytest.raises(ValueError, match=r"num_layers=2.*num_layers=3"):
        load_adapter(load_model(other), tmp_path / "adapter")


def test_unknown_peft_type_is_named(hf_dir, tmp_path):
    (tmp_path / "ia3").mkdir()
    (tmp_path / "ia3" / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(ValueError, match="'IA3' is not supported"):
        load_adapter(load_model(hf_dir), tmp_path / "ia3")


def test_speculative_decoding_refuses_a_prefix(hf_dir):
    from lmforge.generation.drafts import NgramDraft
    from lmforge.generation.speculative import SpeculativeStream

    model = apply_prefix(load_model(hf_dir), PrefixConfig(num_virtual_tokens=2, init="random")).eval()
    with pytest.raises(ValueError, match="prefix-tuning"):
        SpeculativeStream(model, [[1, 2, 3]], SamplingParams(temperature=0), set(), draft=NgramDraft())

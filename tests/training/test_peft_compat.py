"""Our adapters load in PEFT with our logits; the merged export loads in transformers."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from lmforge.checkpoint.hf import save_hf  # noqa: E402
from lmforge.checkpoint.load import load_model  # noqa: E402
from lmforge.training.adapters import load_adapter, save_adapter  # noqa: E402
from lmforge.training.lora import LoRAConfig, adapter_state, apply_lora, merge_and_unload  # noqa: E402


@pytest.fixture
def hf_dir(tmp_path):
    cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=128, vocab_size=256, max_position_embeddings=128)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def _trained(path, dora: bool):
    """Our model with a non-trivial adapter (B and the magnitude moved away from their init)."""
    model = load_model(path)
    apply_lora(model, LoRAConfig(rank=4, alpha=8, dora=dora))
    with torch.no_grad():
        for name, p in adapter_state(model).items():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_peft_loads_our_adapter_with_our_logits(hf_dir, tmp_path, dora):
    ours = _trained(hf_dir, dora)
    save_adapter(ours, tmp_path / "adapter", base_model=str(hf_dir))
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["use_dora"] is dora and cfg["r"] == 4
    reference = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    reference = peft.PeftModel.from_pretrained(reference, tmp_path / "adapter").eval()
    ids = torch.randint(0, 256, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(ids), reference(ids).logits, atol=1e-4, rtol=1e-4)

    again = load_adapter(load_model(hf_dir), tmp_path / "adapter").eval()  # and back into lmforge
    with torch.no_grad():
        torch.testing.assert_close(again(ids), ours(ids))


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_merged_export_loads_in_transformers(hf_dir, tmp_path, dora):
    ours = _trained(hf_dir, dora).eval()
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        expected = ours(ids)
    save_hf(merge_and_unload(ours), tmp_path / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, expected, atol=1e-4, rtol=1e-4)


def test_peft_trained_adapter_loads_into_lmforge(hf_dir, tmp_path):
    reference = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    reference = peft.get_peft_model(reference, config).eval()
    reference.save_pretrained(tmp_path / "theirs")
    ours = load_adapter(load_model(hf_dir), tmp_path / "theirs").eval()
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), reference(ids).logits, atol=1e-4, rtol=1e-4)

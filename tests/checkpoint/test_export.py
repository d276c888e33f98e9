"""`lmforge export`: the Hugging Face directory loads in transformers (and in lmforge) unchanged."""

from __future__ import annotations

import pytest
import torch

from lmforge.checkpoint.load import load
from lmforge.cli import main

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def exported(smollm2_gguf, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "smol-hf"
    assert main(["export", str(smollm2_gguf), "--out", str(out)]) == 0
    return smollm2_gguf, out


def test_transformers_loads_export_with_equal_logits_and_tokens(exported):
    source, out = exported
    ours, tok = load(source)
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    messages = [{"role": "user", "content": "Hello there, how are you?"}]
    text = tok.apply_chat_template(messages)
    assert hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == text
    ids = tok.encode(text, add_special_tokens=False)
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids
    with torch.inference_mode():
        torch.testing.assert_close(model(torch.tensor([ids])).logits, ours(torch.tensor([ids])), atol=1e-4, rtol=1e-4)


def test_lmforge_reloads_its_export(exported):
    source, out = exported
    a, tok_a = load(source)
    b, tok_b = load(out)
    ids = tok_a.encode("Exported models round-trip.")
    assert tok_b.encode("Exported models round-trip.") == ids
    with torch.inference_mode():
        torch.testing.assert_close(b(torch.tensor([ids])), a(torch.tensor([ids])))

"""The real GGUF files: our logits and greedy ids equal transformers' on the same files (fp32)."""

from __future__ import annotations

import pytest
import torch

from lmforge.checkpoint.load import load
from lmforge.generation.generate import generate_ids
from lmforge.generation.sampling import SamplingParams

transformers = pytest.importorskip("transformers")
pytestmark = [pytest.mark.real_model, pytest.mark.slow]

PROMPT = [{"role": "user", "content": "Name three rivers in Europe and say one fact about each."}]


def _pair(path):
    ours, tokenizer = load(path)
    reference = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                  dtype=torch.float32).eval()
    return ours, tokenizer, reference


@pytest.fixture(scope="module", params=["smollm2_gguf", "gemma3_gguf"])
def real(request):
    return _pair(request.getfixturevalue(request.param))


def test_logits_equal_transformers(real):
    ours, tokenizer, reference = real
    ids = torch.tensor([tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 6)])
    with torch.inference_mode():
        got, expected = ours(ids), reference(ids).logits
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=1e-3)
    assert (got[0, -1].argmax() == expected[0, -1].argmax()).item()


def test_greedy_64_tokens_equal_transformers(real):
    ours, tokenizer, reference = real
    ids = tokenizer.encode(tokenizer.apply_chat_template(PROMPT), add_special_tokens=False)
    with torch.inference_mode():
        expected = reference.generate(torch.tensor([ids]), max_new_tokens=64, min_new_tokens=64, do_sample=False,
                                      eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    got = generate_ids(ours, [ids], SamplingParams(max_new_tokens=64, temperature=0, ignore_eos=True))[0]
    assert got == expected

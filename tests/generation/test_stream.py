"""Text-level generation on the real model: streamed deltas, stop strings, batched prompts."""

from __future__ import annotations

import pytest

from lmforge.checkpoint.load import load
from lmforge.generation.generate import generate, generate_ids, stream
from lmforge.generation.sampling import SamplingParams

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def smol(smollm2_gguf):
    return load(smollm2_gguf)


def chat_ids(tok, text: str) -> list[int]:
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]), add_special_tokens=False)


def test_streamed_deltas_join_to_the_completion(smol):
    model, tok = smol
    ids = chat_ids(tok, "Write a sentence with an emoji and the word café.")
    params = SamplingParams(max_new_tokens=40, temperature=0)
    deltas = list(stream(model, tok, ids, params))
    token_ids = generate_ids(model, [ids], params, tok.stop_ids)[0]
    assert len(deltas) > 5
    assert "".join(deltas) == tok.decode(token_ids, skip_special_tokens=True)
    # a character split across tokens is held back until complete; only a final cut at
    # max_new_tokens may leave a partial one (decode shows it as U+FFFD too)
    assert all("\ufffd" not in d for d in deltas[:-1])


def test_stop_string_cuts_text_and_reason(smol):
    model, tok = smol
    ids = chat_ids(tok, "List the days of the week, comma separated.")
    free = "".join(stream(model, tok, ids, SamplingParams(max_new_tokens=40, temperature=0)))
    stop = free.split()[2]
    out = generate(model, tok, [tok.decode(ids)], SamplingParams(max_new_tokens=40, temperature=0, stop=[stop]))[0]
    streamed = "".join(stream(model, tok, ids, SamplingParams(max_new_tokens=40, temperature=0, stop=[stop])))
    assert streamed == free[:free.index(stop)]
    assert out.finish_reason == "stop" and stop not in out.text


def test_eos_finishes_with_stop_reason(smol):
    model, tok = smol
    out = generate(model, tok, [tok.decode(chat_ids(tok, "Say hi."))], SamplingParams(max_new_tokens=200,
                                                                                       temperature=0))[0]
    assert out.finish_reason == "stop" and len(out.token_ids) < 200
    assert tok.eos_id not in out.token_ids


def test_batch_of_prompts_equals_each_alone(smol):
    model, tok = smol
    prompts = ["The capital of Italy is", "Water boils at", "In 1969, humans first"]
    params = SamplingParams(max_new_tokens=12, temperature=0)
    together = [c.text for c in generate(model, tok, prompts, params)]
    alone = [generate(model, tok, [p], params)[0].text for p in prompts]
    assert together == alone

"""Constrained decoding in the serving engine: each sequence keeps its own grammar matcher in a mixed batch,
greedy rows equal `generate`'s, and a bad constraint fails the request when it is added."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from lmforge.config import Config  # noqa: E402
from lmforge.generation.constrained import Constraint  # noqa: E402
from lmforge.generation.drafts import NgramDraft  # noqa: E402
from lmforge.generation.generate import generate  # noqa: E402
from lmforge.generation.sampling import SamplingParams  # noqa: E402
from lmforge.model.transformer import build_model  # noqa: E402
from lmforge.serving.engine import Engine, EngineConfig  # noqa: E402

sys.path.insert(0, str(Path(__file__).parents[1] / "generation"))
from test_constrained import CHOICES, REGEX, SCHEMA, byte_tokenizer  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    return build_model(Config.from_name("tiny-llama", vocab_size=260)).eval(), byte_tokenizer()


def _check(kind: str, text: str) -> None:
    if kind == "json_schema":
        jsonschema.validate(json.loads(text), SCHEMA)
    elif kind == "regex":
        assert re.fullmatch(REGEX, text), text
    else:
        assert text in CHOICES, text


@pytest.mark.parametrize("draft", [None, lambda: NgramDraft(k=3)])
def test_mixed_constrained_batch(setup, draft):
    model, tok = setup
    engine = Engine(model, tok, EngineConfig(block_size=8, num_blocks=512), draft=draft)
    values = {"json_schema": SCHEMA, "regex": REGEX, "choice": CHOICES}
    requests = [(kind, SamplingParams(max_new_tokens=200, temperature=t, seed=seed, constraint=Constraint(kind, value)))
                for seed, (kind, value) in enumerate(values.items()) for t in (0.0, 1.0)]
    requests.append((None, SamplingParams(max_new_tokens=20, temperature=1.0, seed=9)))  # unconstrained beside
    prompts = ["hi", "a longer prompt here"] * 4
    completions = engine.generate(prompts[:len(requests)], [p for _, p in requests])
    for (kind, params), prompt, c in zip(requests, prompts, completions):
        if kind is None:
            assert len(c.token_ids) == 20
            continue
        assert c.finish_reason == "stop"
        _check(kind, c.text)
        if params.greedy:
            assert c.text == generate(model, tok, prompt, params)[0].text


def test_bad_constraint_fails_the_request(setup):
    model, tok = setup
    engine = Engine(model, tok, EngineConfig(block_size=8, num_blocks=64))
    with pytest.raises(ValueError, match="Unimplemented keys"):
        engine.add_request("hi", SamplingParams(constraint=Constraint("json_schema", {"type": "object", "not": {}})))
    assert not engine.has_unfinished()

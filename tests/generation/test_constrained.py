"""Constrained decoding: every output of a random tiny model matches its JSON Schema, regex, choice list or
grammar -- greedy, sampled, beam search and speculative -- checked by jsonschema and re.fullmatch; bad
schemas and grammars are ValueErrors that name the problem."""

from __future__ import annotations

import json
import re

import pytest
import torch

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")
from tokenizers import Tokenizer as Backend  # noqa: E402
from tokenizers import decoders, models, pre_tokenizers  # noqa: E402

from lmforge.chat_template import ChatTemplate  # noqa: E402
from lmforge.config import Config  # noqa: E402
from lmforge.generation.beam import beam_generate  # noqa: E402
from lmforge.generation.constrained import ConstrainedBatch, Constraint, GrammarState  # noqa: E402
from lmforge.generation.drafts import ModelDraft, NgramDraft  # noqa: E402
from lmforge.generation.generate import generate, generate_ids  # noqa: E402
from lmforge.generation.sampling import SamplingParams  # noqa: E402
from lmforge.generation.speculative import speculative_ids  # noqa: E402
from lmforge.model.transformer import build_model  # noqa: E402
from lmforge.tokenizer import Tokenizer  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 4},
        "kind": {"enum": ["cat", "dog", 3, None]},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1, "maxItems": 3},
        "home": {"type": "object", "properties": {"city": {"type": "string", "pattern": "^[a-z]{1,6}$"},
                                                  "ok": {"type": "boolean"}},
                 "required": ["city", "ok"], "additionalProperties": False},
    },
    "required": ["name", "kind", "age", "tags", "home"],
    "additionalProperties": False,
}
REGEX = r"[a-z]{2,5}-[0-9]{1,3}"
CHOICES = ["red", "green", "blue", "reddish"]
GBNF = 'root ::= "(" item ("," item)? ("," item)? ")"\nitem ::= [a-c] | "xy"'
GBNF_AS_REGEX = r"\((?:[a-c]|xy)(?:,(?:[a-c]|xy)){0,2}\)"
LARK = 'start: "<" NUM (";" NUM)? ">"\nNUM: /[0-9]{1,2}/'
LARK_AS_REGEX = r"<\d{1,2}(;\d{1,2})?>"


def byte_tokenizer() -> Tokenizer:
    """Every byte is a token (ids 0..255); <|im_start|>=256, <|im_end|>=257 (EOS), <pad>=258."""
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Backend(models.BPE(vocab, [], fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<|im_start|>", "<|im_end|>", "<pad>"])
    return Tokenizer(backend, ChatTemplate("{{ messages }}"), bos_id=None, eos_id=257, pad_id=258)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(Config.from_name("tiny-llama", vocab_size=260)).eval()


def _texts(model, tok, constraint, seeds, temperature=1.0, prompts=("hi", "a longer prompt")):
    """Completions of every prompt for every seed, each checked to have stopped at the grammar's end."""
    out = []
    for seed in seeds:
        params = SamplingParams(max_new_tokens=200, temperature=temperature, seed=seed, constraint=constraint)
        for c in generate(model, tok, list(prompts), params):
            assert c.finish_reason == "stop", c
            out.append(c.text)
    return out


def test_json_schema_outputs_parse_and_validate_across_seeds(model, tok):
    texts = _texts(model, tok, Constraint("json_schema", SCHEMA), range(10))  # 20 sampled outputs, batched
    assert len(texts) == 20
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMA)
    assert len(set(texts)) > 10  # sampling really varied them


def test_json_schema_as_text_and_json_object(model, tok):
    greedy = _texts(model, tok, Constraint("json_schema", json.dumps(SCHEMA)), [0], temperature=0)
    jsonschema.validate(json.loads(greedy[0]), SCHEMA)
    for text in _texts(model, tok, Constraint("json_object"), range(3), prompts=("x",)):
        assert isinstance(json.loads(text), dict)


def test_regex_and_choice_always_match(model, tok):
    for text in _texts(model, tok, Constraint("regex", REGEX), range(5)) + _texts(
            model, tok, Constraint("regex", REGEX), [0], temperature=0):
        assert re.fullmatch(REGEX, text), text
    picks = _texts(model, tok, Constraint("choice", CHOICES), range(8))
    assert set(picks) <= set(CHOICES) and len(set(picks)) > 1


@pytest.mark.parametrize("text,pattern", [(GBNF, GBNF_AS_REGEX), (LARK, LARK_AS_REGEX)])
def test_gbnf_and_lark_grammars(model, tok, text, pattern):
    for out in _texts(model, tok, Constraint("grammar", text), range(4)):
        assert re.fullmatch(pattern, out), out


def test_generate_ids_needs_the_tokenizer_and_equals_generate(model, tok):
    params = SamplingParams(max_new_tokens=60, temperature=0.9, seed=3, constraint=Constraint("regex", REGEX))
    with pytest.raises(ValueError, match="tokenizer"):
        generate_ids(model, [tok.encode("hi")], params, tok.stop_ids)
    ids = generate_ids(model, [tok.encode("hi")], params, tok.stop_ids, tokenizer=tok)[0]
    assert tok.decode(ids) == generate(model, tok, "hi", params)[0].text


def test_beam_search_keeps_a_matcher_per_beam(model, tok):
    for constraint, check in [(Constraint("json_schema", SCHEMA), lambda t: jsonschema.validate(json.loads(t), SCHEMA)),
                              (Constraint("regex", REGEX), lambda t: re.fullmatch(REGEX, t) or 1 / 0),
                              (Constraint("choice", CHOICES), lambda t: t in CHOICES or 1 / 0)]:
        params = SamplingParams(max_new_tokens=200, temperature=0, num_beams=3, constraint=constraint)
        ids = beam_generate(model, tok.encode("hi"), params, tok.stop_ids, tokenizer=tok)
        check(tok.decode(ids))


def test_speculative_decoding_is_constrained_and_exact(model, tok):
    constraint = Constraint("json_schema", SCHEMA)
    prompt = tok.encode('{"name": "ab", "kind": "cat", "age": 1, "tags": ["a"], "home": {"city": "x", "ok": true}}')
    greedy = SamplingParams(max_new_tokens=200, temperature=0, constraint=constraint)
    plain = generate_ids(model, [prompt], greedy, tok.stop_ids, tokenizer=tok)[0]
    torch.manual_seed(1)
    draft_model = build_model(Config.from_name("tiny-llama", vocab_size=260, n_layer=1)).eval()
    for draft in (NgramDraft(k=4), ModelDraft(draft_model, tok, k=3)):
        ids, stats = speculative_ids(model, [prompt], greedy, draft, tok.stop_ids, tokenizer=tok)
        assert ids[0] == plain  # greedy under the mask: the same ids as plain constrained greedy
        assert stats["drafted"] > 0
        for seed in range(4):
            sampled = SamplingParams(max_new_tokens=200, temperature=1.0, seed=seed, constraint=constraint)
            out, _ = speculative_ids(model, [prompt], sampled, draft, tok.stop_ids, tokenizer=tok)
            jsonschema.validate(json.loads(tok.decode(out[0])), SCHEMA)


def test_state_mask_fork_and_rollback(tok):
    state = GrammarState.start(Constraint("choice", ["ab", "abc"]), tok)
    assert state.allowed_mask(260).nonzero().flatten().tolist() == tok.encode("a")
    for t in tok.encode("ab"):
        assert state.advance(t)
    assert state.is_finished and state.allowed_mask(260)[tok.eos_id]  # "ab" may end here ...
    assert state.allowed_mask(260)[tok.encode("c")[0]]  # ... or go on to "abc"
    branch = state.fork()
    assert branch.advance(tok.encode("c")[0]) and branch.allowed_mask(260).nonzero().flatten().tolist() == [257]
    assert not state.advance(tok.encode("x")[0]) and state.dead  # refused: the fork is untouched
    assert branch.is_finished
    branch.rollback(2)
    assert not branch.is_finished and branch.allowed_mask(260).nonzero().flatten().tolist() == tok.encode("b")


def test_prefetched_masks_equal_masks_filled_now(tok):
    states = [GrammarState.start(Constraint("regex", REGEX), tok) for _ in range(3)]
    batch, same = ConstrainedBatch(states, 260), ConstrainedBatch([s.fork() for s in states], 260)
    for token in tok.encode("ab-1"):
        batch.prefetch()
        assert torch.equal(batch.masks(), same.masks())
        batch.advance([token, None, token])
        same.advance([token, None, token])
    assert states[0].is_finished and not states[1].is_finished


def test_bad_schemas_and_grammars_are_named(tok):
    with pytest.raises(ValueError, match="invalid JSON Schema at type.*strng"):
        Constraint("json_schema", {"type": "strng"})
    with pytest.raises(ValueError, match="not valid JSON"):
        Constraint("json_schema", "{nope")
    with pytest.raises(ValueError, match=r"cannot compile.*Unimplemented keys.*\"if\""):
        GrammarState.start(Constraint("json_schema", {"type": "object", "if": {"required": ["a"]}}), tok)
    with pytest.raises(ValueError, match="unclosed group"):
        GrammarState.start(Constraint("regex", "a(b"), tok)
    with pytest.raises(ValueError, match="Rule 'foo' not found"):
        GrammarState.start(Constraint("grammar", "root ::= foo"), tok)
    with pytest.raises(ValueError, match="non-empty list"):
        Constraint("choice", [])
    with pytest.raises(ValueError, match="unknown constraint kind"):
        Constraint("xml", "<a/>")
    with pytest.raises(ValueError, match="constraint must be a Constraint"):
        SamplingParams(constraint={"type": "object"})


def test_cli_flags_build_one_constraint(tmp_path):
    from lmforge.generation.constrained import constraint_from_flags

    schema_file = tmp_path / "s.json"
    schema_file.write_text(json.dumps(SCHEMA))
    assert constraint_from_flags(json_schema=str(schema_file)) == Constraint("json_schema", SCHEMA)
    assert constraint_from_flags(choice="yes,no").value == ("yes", "no")
    assert constraint_from_flags() is None
    with pytest.raises(ValueError, match="at most one"):
        constraint_from_flags(regex="a", choice="a,b")
    with pytest.raises(ValueError, match="cannot read the --grammar file"):
        constraint_from_flags(grammar=str(tmp_path / "missing.gbnf"))

"""Chat templates: the checkpoint's template against transformers, the fallbacks, the sandbox, validation."""

from __future__ import annotations

import pytest

from lmforge.chat_template import CHATML_TEMPLATE, ChatTemplate, fallback_template
from lmforge.tokenizer import Tokenizer, read_gguf_metadata

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a prime. 日本?"},
    {"role": "assistant", "content": "Seven."},
    {"role": "user", "content": "Another"},
]


@pytest.fixture(scope="module")
def smollm2_pair(smollm2_gguf):
    """(ours, transformers') SmolLM2 tokenizers; transformers' is slow to build, so once per module."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    return Tokenizer.from_gguf(smollm2_gguf), hf


@pytest.mark.real_model
@pytest.mark.parametrize("messages", [CONVERSATION, CONVERSATION[1:3], CONVERSATION[1:2]])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_smollm2_template_matches_transformers(smollm2_pair, messages, add_generation_prompt):
    ours, hf = smollm2_pair
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected
    assert not ours.chat_template.is_fallback
    ids = ours.encode(expected, add_special_tokens=False)
    assert ids == hf.encode(expected, add_special_tokens=False)
    assert ids.count(ours.token_to_id("<|im_start|>")) == expected.count("<|im_start|>")


@pytest.mark.real_model
def test_gemma3_uses_the_gemma_fallback(gemma3_gguf):
    tok = Tokenizer.from_gguf(gemma3_gguf)
    assert tok.chat_template.is_fallback  # the file has no tokenizer.chat_template
    expected = (
        "<bos><start_of_turn>user\nYou are terse.\n\nName a prime. 日本?<end_of_turn>\n"
        "<start_of_turn>model\nSeven.<end_of_turn>\n"
        "<start_of_turn>user\nAnother<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    assert tok.apply_chat_template(CONVERSATION) == expected
    ids = tok.encode(expected, add_special_tokens=False)
    assert ids[0] == tok.bos_id and ids.count(tok.token_to_id("<start_of_turn>")) == 4
    plain = [{"role": "user", "content": "  hi  "}]
    assert tok.apply_chat_template(plain, False) == "<bos><start_of_turn>user\nhi<end_of_turn>\n"
    with pytest.raises(ValueError, match="alternate"):
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


@pytest.mark.real_model
def test_chatml_fallback_without_a_template(smollm2_gguf):
    meta = read_gguf_metadata(smollm2_gguf)
    del meta["tokenizer.chat_template"]
    tok = Tokenizer.from_gguf_metadata(meta)
    assert tok.chat_template.is_fallback and tok.chat_template.source == CHATML_TEMPLATE
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_fallback_is_chosen_by_the_vocabulary():
    assert "<start_of_turn>" in fallback_template({"<start_of_turn>": 5}.get)
    assert fallback_template({"<|im_start|>": 1}.get) == CHATML_TEMPLATE


ESCAPES = [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os }}",
    "{{ raise_exception.__globals__ }}",
    "{{ messages.__class__.__base__ }}",
    "{{ self._TemplateReference__context }}",
    "{% set x = messages.append({'role': 'user', 'content': 'pwned'}) %}",
    "{{ messages[0].update({'role': 'x'}) }}",
    "{{ messages[0].clear() }}",
    "{{ ''.format.__globals__ }}",
]


@pytest.mark.parametrize("source", ESCAPES)
def test_sandbox_escapes_raise_value_error(source):
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(ValueError, match="chat template .*unsafe"):
        ChatTemplate(source).render(messages)
    assert messages == [{"role": "user", "content": "hi"}]  # nothing was changed


EXHAUSTION = ["{{ 'x' * 10**9 }}", "{{ [1] * 10**8 }}", "{{ 2 ** 100000000 }}", "{% for i in range(10**9) %}{% endfor %}"]


@pytest.mark.parametrize("source", EXHAUSTION)
def test_resource_exhaustion_is_refused(source):
    with pytest.raises(ValueError, match="chat template"):
        ChatTemplate(source).render([{"role": "user", "content": "hi"}])


def test_template_helpers():
    source = (
        "{{ messages | tojson }}|{{ strftime_now('%Y') | length }}|{{ bos_token }}"
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.role }}{% endfor %}"
    )
    messages = [{"role": "user", "content": "<é>"}, {"role": "assistant", "content": "x"}]
    rendered = ChatTemplate(source).render(messages, bos_token="<s>")
    assert rendered == '[{"role": "user", "content": "<é>"}, {"role": "assistant", "content": "x"}]|4|<s>user'


def test_raise_exception_and_syntax_errors():
    with pytest.raises(ValueError, match="only user turns"):
        ChatTemplate("{{ raise_exception('only user turns') }}").render([{"role": "user", "content": "a"}])
    with pytest.raises(ValueError, match="does not parse"):
        ChatTemplate("{% for m in messages %}")
    with pytest.raises(ValueError, match="non-empty"):
        ChatTemplate("")


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ("hello", "non-empty list"),
        ([], "non-empty list"),
        ([{"role": "user", "content": "a"}, "b"], r"messages\[1\] must be a dict"),
        ([{"role": "user", "content": "a"}, {"role": "user"}], r"messages\[1\]\['content'\] must be a string"),
        ([{"role": 3, "content": "a"}], r"messages\[0\]\['role'\]"),
        ([{"role": "user", "content": None}], r"messages\[0\]\['content'\].*NoneType"),
    ],
)
def test_messages_are_validated(messages, match):
    with pytest.raises(ValueError, match=match):
        ChatTemplate(CHATML_TEMPLATE).render(messages)

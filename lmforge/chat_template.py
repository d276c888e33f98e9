"""Chat templates: render a conversation into the prompt text a chat model was trained on.

The template is Jinja source read from the checkpoint, so it is untrusted: it runs in jinja2's
`ImmutableSandboxedEnvironment`, where touching an unsafe attribute (``''.__class__``), calling a
mutating method or building a huge value raises `ValueError` instead of running.
The variables match what Hugging Face transformers passes (`messages`, `add_generation_prompt`,
`bos_token`, `eos_token`, `raise_exception`, `strftime_now`, a non-ASCII-escaping `tojson`), so
a model's own template renders here exactly as it does there.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

from jinja2.exceptions import SecurityError, TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

# ChatML (https://github.com/openai/openai-python/blob/v0.28.1/chatml.md), the common default.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Gemma's turn format, written to render as Google's official Gemma 3 template does for text
# messages: BOS first, the system message folded into the first user turn, "assistant" named
# "model", contents trimmed, user/model turns alternating.
GEMMA_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = '' -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif -%}
    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}
    {{- message['content'] | trim }}
    {{- '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{ '<start_of_turn>model\n' }}
{%- endif -%}
"""

_MAX_BUILT_LENGTH = 1_000_000  # longest string/list a template may build with `*`
_MAX_EXPONENT = 1_000  # largest exponent a template may use with `**`


def fallback_template(token_to_id: Callable[[str], int | None]) -> str:
    """The template for a checkpoint that ships none (the Gemma 3 GGUF has none).

    Gemma's turn format when the vocabulary has ``<start_of_turn>``, ChatML otherwise. This is a
    guess from the vocabulary, not the model's own template.
    """
    return GEMMA_TEMPLATE if token_to_id("<start_of_turn>") is not None else CHATML_TEMPLATE


class _Sandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, made strict: unsafe access raises at once and `*`/`**` are bounded."""

    intercepted_binops = frozenset(["*", "**"])

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        """Raise, where jinja would return an Undefined that prints as "" for a bare `{{ x.__class__ }}`."""
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        """Refuse `*` and `**` whose result would exhaust memory or time."""
        if operator == "**" and isinstance(right, int) and abs(right) > _MAX_EXPONENT:
            raise SecurityError(f"exponent {right} is over the limit of {_MAX_EXPONENT}")
        if operator == "*":
            sized, count = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(sized, (str, list, tuple)) and isinstance(count, int):
                if len(sized) * count > _MAX_BUILT_LENGTH:
                    raise SecurityError(f"building a sequence of {len(sized) * count} items is over the limit")
        return super().call_binop(context, operator, left, right)


def _raise_exception(message: str) -> None:
    """`raise_exception(msg)`, which templates call to reject a conversation."""
    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    """`strftime_now(fmt)`, which templates use to put today's date in a system prompt."""
    return datetime.now().strftime(fmt)


def _tojson(value: Any, indent: int | None = None, separators: Any = None, sort_keys: bool = False) -> str:
    """`tojson` as transformers defines it: non-ASCII kept, no HTML escaping (jinja's escapes `<`)."""
    return json.dumps(value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)


def _environment() -> _Sandbox:
    """A sandbox with transformers' settings: blocks trimmed, loop controls, its globals and `tojson`."""
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    return env


def template_from_config(config: Mapping[str, Any]) -> str | None:
    """`chat_template` of a tokenizer_config.json: a string, or named templates (the "default" one)."""
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        return named.get("default", next(iter(named.values()), None))
    return template


def validate_messages(messages: Any) -> None:
    """Check that `messages` is a non-empty list of dicts with string `role` and `content`."""
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)) or not messages:
        raise ValueError(f"messages must be a non-empty list of dicts, got {type(messages).__name__}")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            kind = type(message).__name__
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {kind}")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise ValueError(
                    f"messages[{i}][{key!r}] must be a string, got {type(message.get(key)).__name__}; "
                    "pass e.g. {'role': 'user', 'content': 'Hello'}"
                )


class ChatTemplate:
    """A compiled chat template that renders conversations in the sandbox."""

    def __init__(self, source: str, is_fallback: bool = False):
        if not isinstance(source, str) or not source.strip():
            raise ValueError("chat template must be non-empty Jinja source text")
        self.source = source
        self.is_fallback = is_fallback
        try:
            self._template = _environment().from_string(source)
        except TemplateError as e:
            raise ValueError(f"chat template does not parse: {e}") from None

    @classmethod
    def or_fallback(cls, source: str | None, token_to_id: Callable[[str], int | None]) -> ChatTemplate:
        """The checkpoint's template, or when it has none the fallback its vocabulary suggests."""
        if source:
            return cls(source)
        return cls(fallback_template(token_to_id), is_fallback=True)

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **variables: Any) -> str:
        """The prompt text for `messages`; `variables` (bos_token, tools, ...) reach the template as is."""
        validate_messages(messages)
        try:
            return self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **variables
            )
        except SecurityError as e:
            raise ValueError(f"chat template is unsafe and was stopped: {e}") from None
        except (TemplateError, OverflowError) as e:
            raise ValueError(f"chat template failed to render: {e}") from None

"""Tool calling in OpenAI's shapes: the official client gets tool_calls (streamed and not) that validate
against the declared parameters; required always calls, none never does; response_format is enforced;
tool results go back through the chat template; bad tools and schemas are 400s naming the field."""

from __future__ import annotations

import json

import httpx
import pytest

from lmforge.serving import protocol as P
from lmforge.serving.tool_calls import ToolRequestError, ToolStream, parse_tool_calls, render_messages, \
    request_constraint

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"], "additionalProperties": False}}}
TOOLS = [WEATHER, ADD]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def _request(**fields) -> P.ChatRequest:
    return P.ChatRequest(model="smol", messages=[{"role": "user", "content": "hi"}], **fields)


def test_constraints_per_tool_choice_and_response_format() -> None:
    assert request_constraint(_request(tools=TOOLS)) is None  # auto: free text, parsed afterwards
    assert request_constraint(_request(tools=TOOLS, tool_choice="none")) is None
    required = request_constraint(_request(tools=TOOLS, tool_choice="required"))
    assert required.kind == "json_schema" and len(required.value["properties"]["tool_calls"]["items"]["anyOf"]) == 2
    named = request_constraint(_request(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "add"}}))
    assert [c["properties"]["name"]["const"] for c in named.value["properties"]["tool_calls"]["items"]["anyOf"]] == ["add"]
    assert request_constraint(_request(response_format={"type": "json_object"})).kind == "json_object"


@pytest.mark.parametrize("fields,param,words", [
    ({"tool_choice": "required"}, "tool_choice", "non-empty tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "'nope'"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]}, "tools[0]",
     "parameters"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"minLength": "x"}}}},
     "response_format", "schema"),
])
def test_bad_tools_and_schemas_name_the_field(fields, param, words) -> None:
    with pytest.raises(ToolRequestError) as err:
        request_constraint(_request(**fields))
    assert err.value.param == param and words in str(err.value)


def test_tool_messages_go_back_through_the_template_turns() -> None:
    body = P.ChatRequest(model="smol", tools=TOOLS, messages=[
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Oslo", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "4 C, rain"}])
    turns = render_messages(body.messages, body.tools, body.tool_choice)
    assert turns[0]["role"] == "system" and "get_weather" in turns[0]["content"]
    assert json.loads(turns[2]["content"]) == {"tool_calls": [{"name": "get_weather",
                                                               "arguments": {"city": "Oslo", "unit": "celsius"}}]}
    assert turns[3] == {"role": "user", "content": "Result of get_weather (call call_1): 4 C, rain"}
    with pytest.raises(ValueError, match="tool_call_id"):
        P.ChatMessage(role="tool", content="x")


def test_parse_and_stream_tool_calls() -> None:
    tools = _request(tools=TOOLS).tools
    text = '{"tool_calls": [{"name": "add", "arguments": {"a": 2, "b": 3}}]}'
    calls = parse_tool_calls(text, tools)
    assert calls[0]["function"] == {"name": "add", "arguments": '{"a": 2, "b": 3}'} and calls[0]["id"].startswith("call_")
    assert parse_tool_calls('{"tool_calls": [{"name": "rm", "arguments": {}}]}', tools) is None
    assert parse_tool_calls("Sure, 5.", tools) is None
    stream = ToolStream(tools)
    deltas = []
    for i, piece in enumerate([text[:10], text[10:30], text[30:]]):
        out, reason = stream.feed(0, piece, i == 2)
        deltas += out
    assert reason == "tool_calls" and deltas[0]["tool_calls"][0]["function"]["name"] == "add"
    assert json.loads(deltas[1]["tool_calls"][0]["function"]["arguments"]) == {"a": 2, "b": 3}
    plain = ToolStream(tools)
    assert plain.feed(1, "Hello", False) == ([{"content": "Hello"}], None)  # not JSON: streams at once


KEY = "tools-key"


@pytest.fixture(scope="module")
def client(smollm2_gguf, serve_process):
    proc, base = serve_process(smollm2_gguf, "--api-key", KEY, "--max-tokens", "256")
    yield openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0)
    proc.terminate()
    proc.wait(timeout=30)


def _validate_calls(calls) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.real_model
@pytest.mark.parametrize("temperature,parallel", [(0.0, True), (1.0, False)])
def test_required_always_calls_with_valid_arguments(client, temperature, parallel) -> None:
    for seed in range(3):
        out = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Add 2 and 3."}],
                                             tools=TOOLS, tool_choice="required", temperature=temperature, seed=seed,
                                             max_tokens=200, parallel_tool_calls=parallel)
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        _validate_calls(choice.message.tool_calls)
        assert parallel or len(choice.message.tool_calls) == 1


@pytest.mark.real_model
def test_named_function_streamed_as_deltas(client) -> None:
    stream = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Weather in Oslo?"}],
                                            tools=TOOLS, stream=True, max_tokens=200,
                                            tool_choice={"type": "function", "function": {"name": "get_weather"}})
    names, arguments, reason = {}, {}, None
    for chunk in stream:
        delta = chunk.choices[0].delta
        for call in delta.tool_calls or []:  # OpenAI's deltas: pieces of call `index`
            names[call.index] = call.function.name or names.get(call.index)
            arguments[call.index] = arguments.get(call.index, "") + (call.function.arguments or "")
        reason = chunk.choices[0].finish_reason or reason
    assert reason == "tool_calls" and names and set(names.values()) == {"get_weather"}
    for index in names:
        jsonschema.validate(json.loads(arguments[index]), SCHEMAS["get_weather"])


@pytest.mark.real_model
def test_none_never_calls_and_tool_results_are_accepted(client) -> None:
    out = client.chat.completions.create(model="smol", tools=TOOLS, tool_choice="none", max_tokens=40,
                                         temperature=0, messages=[
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Oslo", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "4 degrees and rain"}])
    assert out.choices[0].message.tool_calls is None and out.choices[0].message.content


@pytest.mark.real_model
def test_response_format_json_schema(client) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}, "sure": {"type": "boolean"}},
              "required": ["answer", "sure"], "additionalProperties": False}
    out = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "2+3? Reply in JSON."}],
                                         max_tokens=60, temperature=1.0, seed=1,
                                         response_format={"type": "json_schema",
                                                          "json_schema": {"name": "sum", "schema": schema}})
    jsonschema.validate(json.loads(out.choices[0].message.content), schema)


@pytest.mark.real_model
def test_bad_schema_is_a_400(client) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "x"}], max_tokens=5,
                                       tools=[{"type": "function", "function": {"name": "f",
                                                                                "parameters": {"type": "objekt"}}}])
    assert "tools[0].function.parameters" in str(err.value)

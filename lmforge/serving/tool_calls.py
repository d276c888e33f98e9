"""Tool calling and structured output for the chat endpoint, in OpenAI's shapes.

The model is shown the tools in a system message and answers a call as one JSON object,
{"tool_calls": [{"name": ..., "arguments": {...}}]}. With tool_choice "required" or a named
function that object is enforced by a grammar built from the tools' parameter schemas (so every
call parses and validates); with "auto" the model writes freely and a reply that parses as such
an object becomes tool_calls, anything else stays content; "none" never calls. `response_format`
(json_object, json_schema) is a grammar on the content. `tool` messages and earlier assistant
calls go back through the model's chat template as the turns below.
"""

from __future__ import annotations

import json
import uuid

from lmforge.generation.constrained import Constraint

TOOLS_PROMPT = """You can call these functions:
{listing}
To call functions, reply with only this JSON: {{"tool_calls": [{{"name": "FUNCTION", "arguments": {{...}}}}]}}
Otherwise answer normally."""


class ToolRequestError(ValueError):
    """A request whose tools, tool_choice or response_format cannot be served; the message names the field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def _parameters(tool) -> dict:
    return tool.function.parameters or {"type": "object", "properties": {}}


def render_messages(messages: list, tools: list | None, tool_choice) -> list[dict]:
    """Chat-template messages: the tools as a system note, assistant calls as their JSON, tool
    results as user turns naming the call they answer."""
    names = {}
    out: list[dict] = []
    for m in messages:
        if m.role == "assistant" and m.tool_calls:
            calls = []
            for call in m.tool_calls:
                names[call.id] = call.function.name
                try:
                    arguments = json.loads(call.function.arguments)
                except json.JSONDecodeError:
                    raise ToolRequestError(f"tool call {call.id}: arguments are not JSON", "messages") from None
                calls.append({"name": call.function.name, "arguments": arguments})
            out.append({"role": "assistant", "content": json.dumps({"tool_calls": calls})})
        elif m.role == "tool":
            name = names.get(m.tool_call_id, "a tool")
            out.append({"role": "user", "content": f"Result of {name} (call {m.tool_call_id}): {m.content}"})
        else:
            out.append({"role": m.role, "content": m.content or ""})
    if tools and tool_choice != "none":
        listing = "\n".join(f"- {t.function.name}: {t.function.description or ''} Parameters: "
                            f"{json.dumps(_parameters(t))}" for t in tools)
        note = TOOLS_PROMPT.format(listing=listing)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{note}"}
        else:
            out.insert(0, {"role": "system", "content": note})
    return out


def forced_tools(body) -> list | None:
    """The tools a call must come from (tool_choice required: all; named: that one); None when free."""
    choice, tools = body.tool_choice, body.tools or []
    if choice is None or choice in ("auto", "none"):
        return None
    if not tools:
        raise ToolRequestError("tool_choice needs a non-empty tools list", "tool_choice")
    if choice == "required":
        return tools
    picked = [t for t in tools if t.function.name == choice.function.name]
    if not picked:
        raise ToolRequestError(f"tool_choice names {choice.function.name!r}, which is not in tools "
                               f"{[t.function.name for t in tools]}", "tool_choice")
    return picked


def call_schema(tools: list, parallel: bool) -> dict:
    """{"tool_calls": [one call of any of `tools`, ...]} (exactly one unless parallel)."""
    one = {"anyOf": [{"type": "object", "properties": {"name": {"const": t.function.name},
                                                       "arguments": _parameters(t)},
                      "required": ["name", "arguments"], "additionalProperties": False} for t in tools]}
    calls = {"type": "array", "items": one, "minItems": 1, "maxItems": 4 if parallel else 1}
    return {"type": "object", "properties": {"tool_calls": calls}, "required": ["tool_calls"],
            "additionalProperties": False}


def request_constraint(body) -> Constraint | None:
    """The grammar a chat request's output must follow, or None; ToolRequestError names a bad field."""
    for i, tool in enumerate(body.tools or []):
        try:
            Constraint("json_schema", _parameters(tool)).grammar()
        except (ValueError, TypeError) as err:
            raise ToolRequestError(f"tools[{i}].function.parameters: {err}", f"tools[{i}]") from None
    forced = forced_tools(body)
    if forced is not None:
        return _compiled("json_schema", call_schema(forced, body.parallel_tool_calls), "tools")
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return Constraint("json_object")
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise ToolRequestError("response_format json_schema needs json_schema.schema", "response_format")
    try:
        return _compiled("json_schema", fmt.json_schema.schema_, "response_format")
    except ToolRequestError as err:
        raise ToolRequestError(f"response_format.json_schema.schema: {err}", "response_format") from None


def _compiled(kind: str, value, param: str) -> Constraint:
    """The constraint, checked and compiled now, so a bad one is this request's 400, not the engine's error."""
    try:
        constraint = Constraint(kind, value)
        constraint.grammar()
    except (ValueError, TypeError) as err:
        raise ToolRequestError(str(err), param) from None
    return constraint


def parse_tool_calls(text: str, tools: list | None) -> list[dict] | None:
    """OpenAI `tool_calls` from a reply that is the calls object naming known tools; None otherwise."""
    if not tools:
        return None
    try:
        value, end = json.JSONDecoder().raw_decode(text.strip())
    except json.JSONDecodeError:
        return None
    calls = value.get("tool_calls") if isinstance(value, dict) else None
    known = {t.function.name for t in tools}
    if not isinstance(calls, list) or not calls or text.strip()[end:].strip():
        return None
    if not all(isinstance(c, dict) and c.get("name") in known and isinstance(c.get("arguments"), dict)
               for c in calls):
        return None
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c["arguments"])}} for c in calls]


def tool_call_deltas(calls: list[dict]) -> list[dict]:
    """Streaming deltas for finished calls: each call's id and name, then its arguments (as OpenAI sends)."""
    deltas = []
    for index, call in enumerate(calls):
        deltas.append({"tool_calls": [{"index": index, "id": call["id"], "type": "function",
                                       "function": {"name": call["function"]["name"], "arguments": ""}}]})
        deltas.append({"tool_calls": [{"index": index, "function": {"arguments": call["function"]["arguments"]}}]})
    return deltas


class ToolStream:
    """Streaming with tools: a choice whose reply starts with '{' is held until it ends, then sent as
    tool_calls deltas if it parses as calls (else as content); any other reply streams as content."""

    def __init__(self, tools: list) -> None:
        self.tools, self.held, self.mode = tools, {}, {}

    def feed(self, index: int, text: str, final: bool) -> tuple[list[dict], str | None]:
        """(deltas to send, the finish reason override) for this piece of choice `index`."""
        mode = self.mode.get(index)
        if mode is None:
            self.held[index] = self.held.get(index, "") + text
            start = self.held[index].lstrip()
            if not start and not final:
                return [], None
            mode = self.mode[index] = "held" if start.startswith("{") else "content"
            if mode == "content":
                text = self.held.pop(index)
        elif mode == "held":
            self.held[index] += text
        if mode == "content":
            return ([{"content": text}] if text else []), None
        if not final:
            return [], None
        held = self.held.pop(index, "")
        calls = parse_tool_calls(held, self.tools)
        if calls:
            return tool_call_deltas(calls), "tool_calls"
        return [{"content": held}], None

"""Agent tools: a calculator that walks an expression tree (never eval), retrieval search, a clock.

A `Tool` carries an OpenAI-style JSON-schema `parameters`, so `from_openai` turns the `tools`
list of a chat-completions request into tools (given their implementations) and `to_openai`
goes back; the server's chat endpoint can hand its tools to the ReAct loop unchanged.
"""

from __future__ import annotations

import ast
import datetime as dt
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable

MAX_EXPRESSION = 500
MAX_POWER = 10_000
BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
          ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
FUNCTIONS: dict[str, Callable[..., float]] = {
    "sqrt": math.sqrt, "log": math.log, "log10": math.log10, "exp": math.exp, "sin": math.sin, "cos": math.cos,
    "tan": math.tan, "abs": abs, "round": round, "min": min, "max": max, "floor": math.floor, "ceil": math.ceil,
}
CONSTANTS = {"pi": math.pi, "e": math.e, "tau": math.tau}
JSON_TYPES = {"string": str, "number": (int, float), "integer": int, "boolean": bool, "object": dict, "array": list}


class ToolError(ValueError):
    """A tool call that cannot run: bad arguments, unknown tool, a calculation error."""


@dataclass
class Tool:
    """A named function with a JSON-schema for its arguments; `run` checks them first."""

    name: str
    description: str
    fn: Callable[..., Any]
    parameters: dict = field(default_factory=lambda: {"type": "object", "properties": {}, "required": []})

    def run(self, arguments: dict) -> str:
        """Check arguments against the schema, call the function, return its result as text."""
        check_arguments(self, arguments)
        return str(self.fn(**arguments))

    def to_openai(self) -> dict:
        """The tool as an OpenAI chat-completions `tools` entry."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


def check_arguments(tool: Tool, arguments: Any) -> None:
    """Required keys present, no unknown keys, JSON types right; else a ToolError that says which."""
    if not isinstance(arguments, dict):
        raise ToolError(f"{tool.name} takes a JSON object of arguments, got {type(arguments).__name__}")
    props = tool.parameters.get("properties", {})
    missing = [k for k in tool.parameters.get("required", []) if k not in arguments]
    unknown = [k for k in arguments if k not in props]
    if missing or unknown:
        raise ToolError(f"{tool.name}: missing arguments {missing}, unknown arguments {unknown}; "
                        f"expected {sorted(props)}")
    for key, value in arguments.items():
        kind = JSON_TYPES.get(props.get(key, {}).get("type", ""))
        if kind and (not isinstance(value, kind) or (kind == (int, float) and isinstance(value, bool))):
            raise ToolError(f"{tool.name}: argument {key!r} must be a {props[key]['type']}, got {value!r}")


def _evaluate(node: ast.AST) -> float:
    """Value of an arithmetic expression tree; only numbers, + - * / // % **, and FUNCTIONS."""
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.Name) and node.id in CONSTANTS:
        return CONSTANTS[node.id]
    if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY:
        return UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_POWER:
            raise ToolError(f"exponent {right} is too large (limit {MAX_POWER})")
        return BINARY[type(node.op)](left, right)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FUNCTIONS \
            and not node.keywords:
        return FUNCTIONS[node.func.id](*(_evaluate(a) for a in node.args))
    raise ToolError(f"unsupported expression element {ast.dump(node)[:60]}; use numbers, + - * / // % ** ( ) "
                    f"and {sorted(FUNCTIONS)}")


def calculate(expression: str) -> str:
    """The value of an arithmetic expression, parsed with `ast` and walked node by node."""
    expression = expression.strip().replace("^", "**").replace("×", "*").replace("÷", "/").rstrip("=").strip()
    if not expression or len(expression) > MAX_EXPRESSION:
        raise ToolError(f"the expression must be 1..{MAX_EXPRESSION} characters")
    try:
        value = _evaluate(ast.parse(expression, mode="eval"))
    except ToolError:
        raise
    except SyntaxError as err:
        raise ToolError(f"cannot parse {expression!r}: {err.msg}") from None
    except (ZeroDivisionError, OverflowError, ValueError, TypeError) as err:
        raise ToolError(f"cannot compute {expression!r}: {err}") from None
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        value = int(value)
    return str(value)


def calculator() -> Tool:
    return Tool("calculator", "Evaluate an arithmetic expression, e.g. (17 * 23) + sqrt(16).", calculate,
                {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]})


def clock(now: Callable[[], dt.datetime] | None = None) -> Tool:
    """The current date and time in UTC (an injectable `now` keeps tests deterministic)."""
    def current_time() -> str:
        moment = (now or (lambda: dt.datetime.now(dt.timezone.utc)))()
        return moment.strftime("%Y-%m-%d %H:%M:%S UTC (%A)")
    return Tool("clock", "Get the current date and time (UTC).", current_time)


def search(retrieve: Callable[[str, int], list], k: int = 3, max_chars: int = 400) -> Tool:
    """Retrieval as a tool: `retrieve(query, k)` returns Hits (e.g. `RAG.search`)."""
    def run(query: str) -> str:
        hits = retrieve(query, k)
        if not hits:
            return "no results"
        return "\n".join(f"[{n}] {h.chunk.text[:max_chars]}" for n, h in enumerate(hits, 1))
    return Tool("search", "Search the document index; returns the most relevant passages.", run,
                {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]})


def from_openai(tools: list[dict], implementations: dict[str, Callable[..., Any]]) -> list[Tool]:
    """Tools from an OpenAI `tools` list ({"type": "function", "function": {...}}) and their functions."""
    out = []
    for entry in tools:
        spec = entry.get("function") if isinstance(entry, dict) else None
        if entry.get("type") != "function" or not isinstance(spec, dict) or not spec.get("name"):
            raise ValueError(f"not an OpenAI function tool: {entry!r}; expected "
                             "{'type': 'function', 'function': {'name': ..., 'parameters': {...}}}")
        if spec["name"] not in implementations:
            raise ValueError(f"no implementation for tool {spec['name']!r}; pass it in implementations")
        params = spec.get("parameters") or {"type": "object", "properties": {}}
        out.append(Tool(spec["name"], spec.get("description", ""), implementations[spec["name"]], params))
    return out

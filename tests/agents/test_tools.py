"""Tools: the calculator walks the tree and refuses everything else; schemas; OpenAI tool specs."""

from __future__ import annotations

import datetime as dt

import pytest

from lmforge.agents.tools import ToolError, calculate, calculator, clock, from_openai


@pytest.mark.parametrize("expr,value", [("17 * 23", "391"), ("(12 + 8) / 4", "5"), ("2^10", "1024"),
                                        ("-3 ** 2", "-9"), ("sqrt(16) + abs(-2)", "6"), ("7 // 2 + 7 % 2", "4"),
                                        ("1/3", str(1 / 3)), ("max(2, 9, 4)", "9"), ("2 * pi", str(2 * 3.141592653589793))])
def test_calculator_values(expr, value):
    assert calculate(expr) == value


@pytest.mark.parametrize("expr", ["__import__('os').system('ls')", "().__class__", "open('x')", "a + 1", "2 ** 99999",
                                  "1 / 0", "lambda: 1", "[1, 2]", "sqrt(x=4)", "", "1 +", "9" * 600, "True + 1"])
def test_calculator_refuses(expr):
    with pytest.raises(ToolError):
        calculate(expr)


def test_schema_checks_and_clock():
    tool = calculator()
    assert tool.run({"expression": "1+1"}) == "2"
    for bad in ({}, {"expression": 3}, {"expression": "1", "x": 1}, "1+1"):
        with pytest.raises(ToolError):
            tool.run(bad)
    fixed = clock(lambda: dt.datetime(2024, 2, 29, 12, 0, tzinfo=dt.timezone.utc))
    assert fixed.run({}) == "2024-02-29 12:00:00 UTC (Thursday)"


def test_openai_round_trip():
    spec = calculator().to_openai()
    assert spec["type"] == "function" and spec["function"]["parameters"]["required"] == ["expression"]
    (tool,) = from_openai([spec], {"calculator": calculate})
    assert tool.run({"expression": "6*7"}) == "42"
    weather = {"type": "function", "function": {"name": "weather", "description": "Weather in a city",
                                                "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                               "required": ["city"]}}}
    (w,) = from_openai([weather], {"weather": lambda city: f"sunny in {city}"})
    assert w.run({"city": "Oslo"}) == "sunny in Oslo"
    with pytest.raises(ValueError, match="no implementation"):
        from_openai([weather], {})
    with pytest.raises(ValueError, match="not an OpenAI function tool"):
        from_openai([{"type": "retrieval"}], {})

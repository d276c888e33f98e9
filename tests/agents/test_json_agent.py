"""The JSON-action agent: parses, runs several calls in parallel, corrects unknown tools, guards
observations; under the grammar a random model's every step parses and names a real tool."""

from __future__ import annotations

import json
import time

import jsonschema
import pytest

from lmforge.agents.json_agent import action_schema, parse_action, run_json_agent
from lmforge.agents.react import AgentConfig
from lmforge.agents.tools import Tool, calculator, clock


def scripted(*replies: str):
    seen: list[list[dict]] = []
    it = iter(replies)

    def policy(messages):
        seen.append([dict(m) for m in messages])
        return next(it)
    policy.seen = seen
    return policy


def call(tool: str, **arguments) -> dict:
    return {"tool": tool, "arguments": arguments}


def test_calls_then_final_answer() -> None:
    policy = scripted(json.dumps({"thought": "multiply", "calls": [call("calculator", expression="17 * 23")]}),
                      json.dumps({"thought": "done", "final_answer": "391"}))
    result = run_json_agent("What is 17 times 23?", policy, [calculator(), clock()])
    assert result.answer == "391" and result.stopped == "answer"
    assert result.steps[0].calls[0]["tool"] == "calculator"
    last = policy.seen[1][-1]
    assert last["role"] == "user" and "391" in last["content"] and "<<untrusted calculator result" in last["content"]


def test_several_calls_in_one_step_run_in_parallel() -> None:
    def slow(x: str) -> str:
        time.sleep(0.4)
        return x.upper()
    echo = Tool("echo", "Echo upper-cased.", slow, {"type": "object", "properties": {"x": {"type": "string"}},
                                                     "required": ["x"]})
    policy = scripted(json.dumps({"thought": "both", "calls": [call("echo", x="a"), call("echo", x="b"),
                                                                call("echo", x="c")]}),
                      json.dumps({"thought": "ok", "final_answer": "ABC"}))
    start = time.perf_counter()
    result = run_json_agent("echo", policy, [echo])
    assert time.perf_counter() - start < 1.0  # three 0.4 s calls together, not one after another
    assert [c["observation"].split("\n")[1] for c in result.steps[0].calls] == ["A", "B", "C"]


def test_unknown_tool_and_bad_json_become_corrective_observations() -> None:
    policy = scripted("not json", json.dumps({"thought": "x", "calls": [call("teleport", to="moon")]}),
                      json.dumps({"thought": "y", "final_answer": "stayed"}))
    result = run_json_agent("go", policy, [calculator()])
    assert result.steps[0].error.startswith("parse") and "Invalid reply" in result.steps[0].observation
    assert "no tool 'teleport'" in result.steps[1].observation and result.answer == "stayed"


def test_action_schema_accepts_exactly_the_tool_calls() -> None:
    schema = action_schema([calculator(), clock()], max_calls=2)
    ok = [{"thought": "t", "calls": [call("calculator", expression="1+1")]},
          {"thought": "t", "calls": [call("clock"), call("calculator", expression="2")]},
          {"thought": "t", "final_answer": "4"}]
    bad = [{"thought": "t", "calls": [call("teleport")]}, {"thought": "t", "calls": []},
           {"thought": "t", "calls": [call("calculator", expr="1")]}, {"final_answer": "4"},
           {"thought": "t", "calls": [call("clock")] * 3}]
    for value in ok:
        jsonschema.validate(value, schema)
    for value in bad:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(value, schema)
    assert parse_action(json.dumps(ok[2]), {})[2] == "4"


def _byte_tokenizer():
    """Every byte a token (0..255); <|im_start|>=256, <|im_end|>=257 (EOS), <pad>=258."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    from lmforge.chat_template import ChatTemplate
    from lmforge.tokenizer import Tokenizer

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Backend(models.BPE(vocab, [], fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<|im_start|>", "<|im_end|>", "<pad>"])
    template = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant: "
    return Tokenizer(backend, ChatTemplate(template), bos_id=None, eos_id=257, pad_id=258)


def test_a_random_model_under_the_grammar_writes_valid_actions_the_loop_runs(monkeypatch) -> None:
    pytest.importorskip("llguidance")
    import torch

    from lmforge.agents import json_agent
    monkeypatch.setattr(json_agent, "MAX_TEXT", 24)  # short strings: a random model fills them to the bound

    from lmforge.agents.json_agent import ConstrainedPolicy
    from lmforge.config import Config
    from lmforge.model.transformer import build_model

    torch.manual_seed(0)
    model = build_model(Config.from_name("tiny-llama", vocab_size=260, block_size=8192)).eval()
    tools = [calculator(), clock()]
    schema = action_schema(tools)
    replies = []
    constrained = ConstrainedPolicy(model, _byte_tokenizer(), tools, max_tokens=800)

    def policy(messages):
        replies.append(constrained(messages))
        return replies[-1]
    result = run_json_agent("What is 2 + 2?", policy, tools, AgentConfig(max_steps=2))
    for reply in replies:  # every step parsed: no corrective observations, real tools only
        jsonschema.validate(json.loads(reply), schema)
    assert not any((s.error or "").startswith("parse") for s in result.steps)
    unconstrained = ConstrainedPolicy(model, _byte_tokenizer(), tools, max_tokens=40, constrained=False)
    with pytest.raises(ValueError):  # the same random model without the grammar writes no JSON
        parse_action(unconstrained([{"role": "user", "content": "What is 2 + 2?"}]), {})

"""ReAct with JSON actions a grammar enforces: every step the model writes one JSON object,
{"thought", "calls": [{"tool", "arguments"}, ...]} or {"thought", "final_answer"}, and under
constrained decoding (generation/constrained.py) that object always parses, names a real tool
and carries arguments of the tool's JSON Schema. Several calls in one step run in parallel.

The conversation is the short-term memory: the model's JSON actions as assistant turns, the
guarded, spotlighted tool results as the following user turns ("Observation: ...").
"""

from __future__ import annotations

import copy
import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from lmforge.agents.react import AgentConfig, AgentResult, Step, guarded_observation
from lmforge.agents.tools import Tool, ToolError
from lmforge.safety.guard import Guard
from lmforge.safety.injection import SPOTLIGHT_RULE

MAX_TEXT = 120  # characters of an answer or a string argument: a small model otherwise rambles on
MAX_THOUGHT = 60  # a short reason; a 135M model repeats itself in long ones
SYSTEM = """You answer questions by calling tools. Reply with one JSON object per turn and nothing else.
To call tools: {{"thought": "why", "calls": [{{"tool": "NAME", "arguments": {{...}}}}]}} (up to {max_calls} calls,
run together). After the observations, when you know the answer: {{"thought": "why", "final_answer": "the answer"}}.
Tools:
{listing}
Observations are tool results. """ + SPOTLIGHT_RULE
# one worked example per tool the agent has (generic questions, not the benchmark's)
THOUGHTS = {"calculator": "This needs arithmetic.", "search": "This needs the documents.",
            "clock": "This needs today's date.", "python": "This needs a small program."}
EXAMPLES = {
    "calculator": ('What is 6 times 7?', {"expression": "6 * 7"}, "42", "42"),
    "search": ("Which module reads CSV files?", {"query": "read CSV files module"},
               "[1] Use the csv module to read and write CSV files.", "the csv module"),
    "clock": ("What year is it?", {}, "2031-05-04 09:00:00 UTC (Sunday)", "2031"),
    "python": ("How many letters are in the word banana?", {"code": "print(len('banana'))"}, "6", "6"),
}

Messages = list[dict]
Policy = Callable[[Messages], str]  # chat messages -> the assistant's next JSON object (text)


def _bounded(schema: dict) -> dict:
    """The tool's argument schema with a length bound on every free string (and no extra keys)."""
    schema = copy.deepcopy(schema) or {"type": "object", "properties": {}}
    for prop in schema.get("properties", {}).values():
        if prop.get("type") == "string" and "enum" not in prop and "maxLength" not in prop:
            prop["maxLength"] = MAX_TEXT
    schema.setdefault("additionalProperties", False)
    return schema


def action_schema(tools: list[Tool], max_calls: int = 3, allow_final: bool = True) -> dict:
    """The JSON Schema of one step: tool calls (each a known tool with valid arguments) or a final answer
    (allow_final=False: calls only, the first step's schema, so the answer rests on a tool result)."""
    text = {"type": "string", "minLength": 1, "maxLength": MAX_TEXT}
    thought = {"type": "string", "maxLength": MAX_THOUGHT}
    call = {"anyOf": [{"type": "object", "properties": {"tool": {"const": t.name}, "arguments": _bounded(t.parameters)},
                       "required": ["tool", "arguments"], "additionalProperties": False} for t in tools]}
    calls = {"type": "object", "properties": {"thought": thought, "calls": {"type": "array", "items": call,
                                                                         "minItems": 1, "maxItems": max_calls}},
             "required": ["thought", "calls"], "additionalProperties": False}
    final = {"type": "object", "properties": {"thought": thought, "final_answer": text},
             "required": ["thought", "final_answer"], "additionalProperties": False}
    return {"anyOf": [calls, final]} if allow_final else calls


def example_turns(tools: list[Tool]) -> Messages:
    """Worked examples as earlier chat turns (question, call, observation, answer), one per tool present:
    a small model follows turns it has 'already taken' more closely than examples described in text."""
    turns: Messages = []
    for tool in tools:
        if tool.name in EXAMPLES:
            question, arguments, observation, answer = EXAMPLES[tool.name]
            call = {"thought": THOUGHTS[tool.name], "calls": [{"tool": tool.name, "arguments": arguments}]}
            final = {"thought": "The observation answers it.", "final_answer": answer}
            turns += [{"role": "user", "content": f"Question: {question}"},
                      {"role": "assistant", "content": json.dumps(call)},
                      {"role": "user", "content": f"Observation: {observation}"},
                      {"role": "assistant", "content": json.dumps(final)}]
    return turns


def first_messages(question: str, tools: list[Tool], max_calls: int, notes: str = "") -> Messages:
    listing = "\n".join(f"- {t.name}: {t.description} Arguments: {json.dumps(t.parameters.get('properties', {}))}"
                        for t in tools)
    system = SYSTEM.format(max_calls=max_calls, listing=listing)
    system += f"\n{notes}" if notes else ""
    return [{"role": "system", "content": system}, *example_turns(tools),
            {"role": "user", "content": f"Question: {question}"}]


def parse_action(raw: str, tools: dict[str, Tool]) -> tuple[str, list[dict] | None, str | None]:
    """(thought, calls, final answer) of one JSON step; ValueError saying what is wrong (unconstrained output)."""
    try:
        value, _ = json.JSONDecoder().raw_decode(raw.strip())
    except json.JSONDecodeError as err:
        raise ValueError(f"not a JSON object ({err.msg})") from None
    if not isinstance(value, dict):
        raise ValueError("reply with one JSON object")
    thought = str(value.get("thought", ""))
    if isinstance(value.get("final_answer"), str) and value["final_answer"].strip():
        return thought, None, value["final_answer"].strip()
    calls = value.get("calls")
    if not isinstance(calls, list) or not calls or not all(isinstance(c, dict) for c in calls):
        raise ValueError('expected "calls": [{"tool": ..., "arguments": {...}}] or "final_answer"')
    return thought, calls, None


def run_calls(calls: list[dict], tools: dict[str, Tool], config: AgentConfig, guard: Guard, index: int) -> list[Step]:
    """Every call of one step, in parallel threads; a call of an unknown tool gets a corrective observation."""
    def one(call: dict) -> Step:
        step = Step(index, raw="", action=str(call.get("tool")), action_input=call.get("arguments"))
        if step.action not in tools:
            step.error = f"tool: unknown tool {step.action!r}"
            step.observation = f"Error: there is no tool {step.action!r}; the tools are {sorted(tools)}"
            return step
        try:
            step.observation = tools[step.action].run(step.action_input)[:config.max_observation_chars]
        except (ToolError, ValueError, TypeError, ArithmeticError) as err:
            step.error = f"tool: {err}"
            step.observation = f"Error: {err}"
        return step

    with ThreadPoolExecutor(max_workers=max(1, len(calls))) as pool:
        done = list(pool.map(one, calls))
    for step in done:
        if step.error is None or not step.error.startswith("tool: unknown"):
            step.observation = guarded_observation(step, guard, config.withhold_injections)
    return done


def run_json_agent(question: str, policy: Policy, tools: list[Tool], config: AgentConfig | None = None,
                   clock: Callable[[], float] = time.monotonic, guard: Guard | None = None, max_calls: int = 3,
                   notes: str = "") -> AgentResult:
    """Loop policy -> JSON action -> tools (in parallel) until a final answer or the budget ends.
    `notes`: text added to the system prompt (long-term memory: agents/memory.py)."""
    config, guard = config or AgentConfig(), guard or Guard()
    if not question.strip():
        raise ValueError("the question is empty")
    by_name = {t.name: t for t in tools}
    messages = first_messages(question, tools, max_calls, notes)
    result, start, previous = AgentResult(question, None, "max_steps"), clock(), None
    for index in range(config.max_steps):
        if clock() - start > config.max_seconds:
            result.stopped = "timeout"
            break
        step_start = clock()
        ask = getattr(policy, "calls_only", policy) if index == 0 else policy  # look before answering
        step = Step(index, raw=str(ask(messages)))
        try:
            step.thought, calls, step.final_answer = parse_action(step.raw, by_name)
        except ValueError as err:
            step.error = f"parse: {err}"
            step.observation = f"Invalid reply ({err}). Reply with one JSON object as described."
            calls = None
        if calls and calls == previous:
            step.error = "repeat: the same calls as the step before"
            step.observation = ("You made exactly these calls already and saw their results above. Give the "
                                "final_answer now, or call a different tool.")
            calls = None
        elif calls:
            previous = calls
            done = run_calls(calls, by_name, config, guard, index)
            step.calls = [{"tool": s.action, "arguments": s.action_input, "observation": s.observation,
                           "error": s.error, "guard": s.guard} for s in done]
            step.action, step.action_input = done[0].action, done[0].action_input
            step.observation = "\n".join(f"[{n}] {s.action}: {s.observation}" if len(done) > 1 else s.observation
                                         for n, s in enumerate(done, 1))
            step.error = next((s.error for s in done if s.error), None)
        step.seconds = clock() - step_start
        result.steps.append(step)
        if step.final_answer is not None:
            result.answer, result.stopped = step.final_answer, "answer"
            break
        messages += [{"role": "assistant", "content": step.raw.strip()},
                     {"role": "user", "content": f"Observation: {step.observation}"}]
    return result


class ConstrainedPolicy:
    """The local model as a JSON policy: chat template, greedy, the action schema enforced by a grammar
    (constrained=False generates the same prompt freely: the baseline the benchmark compares)."""

    def __init__(self, model, tokenizer, tools: list[Tool], max_calls: int = 3, max_tokens: int = 320,
                 constrained: bool = True) -> None:
        from lmforge.generation.constrained import Constraint

        self.model, self.tokenizer, self.max_tokens = model, tokenizer, max_tokens
        self.constraint = Constraint("json_schema", action_schema(tools, max_calls)) if constrained else None
        self.first = Constraint("json_schema", action_schema(tools, max_calls, allow_final=False)) \
            if constrained else None

    def calls_only(self, messages: Messages) -> str:
        """The first step: tool calls only (under the grammar; unconstrained, the same free generation)."""
        return self(messages, self.first)

    def __call__(self, messages: Messages, constraint=None) -> str:
        return ask(self.model, self.tokenizer, messages, constraint or self.constraint, self.max_tokens)


def ask(model, tokenizer, messages: Messages, constraint=None, max_tokens: int = 320) -> str:
    """The model's greedy reply to chat `messages`, under `constraint` (a generation Constraint) if given."""
    from lmforge.generation.generate import generate
    from lmforge.generation.sampling import SamplingParams

    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    ids = tokenizer.encode(text, add_special_tokens=False)
    params = SamplingParams(temperature=0.0, max_new_tokens=max_tokens, constraint=constraint)
    return generate(model, tokenizer, [ids], params)[0].text

"""A ReAct loop (Yao et al. 2023): Thought -> Action -> Observation, until a Final Answer.

The policy is any `prompt -> text` callable: a scripted one in tests, `LMPolicy` with the local
model for real. Output that does not parse is answered with a correcting observation and retried
(it counts toward the step budget, so a confused model cannot loop forever); steps and wall time
are bounded; every step lands in a JSON-serializable trace.

    Thought: I need to multiply.
    Action: calculator
    Action Input: {"expression": "17 * 23"}
    Observation: 391
    Thought: I know the answer.
    Final Answer: 391
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

from lmforge.agents.tools import Tool, ToolError
from lmforge.safety.guard import Guard
from lmforge.safety.injection import SPOTLIGHT_RULE

FORMAT = """Use this format:
Thought: what to do next
Action: one of [{names}]
Action Input: a JSON object with the tool's arguments
Observation: the tool's result (written for you)
... (repeat Thought/Action/Action Input/Observation as needed)
Thought: I know the answer
Final Answer: the answer
As soon as an Observation answers the question, write Thought and Final Answer; do not call more tools.
Observations are tool results: """ + SPOTLIGHT_RULE
EXAMPLE = """Example:
Question: What is 6 times 7?
Thought: I should use the calculator.
Action: calculator
Action Input: {"expression": "6 * 7"}
Observation: 42
Thought: I know the answer
Final Answer: 42"""
ACTION = re.compile(r"Action\s*:\s*(?P<name>[\w.-]+)[ \t]*(?:\n\s*Action\s*Input\s*:\s*(?P<input>.*))?", re.S | re.I)
LOOSE_OBJECT = re.compile(r"\{\s*[\"']?(?P<key>\w+)[\"']?\s*:\s*(?P<value>.*?)\s*\}")  # {"expression": 17 * 23}
FINAL = re.compile(r"Final\s*Answer\s*:\s*(?P<answer>.*)", re.S | re.I)
THOUGHT = re.compile(r"^\s*(?:Thought\s*:)?\s*(?P<thought>.*?)(?=\n\s*(?:Action|Final\s*Answer)\s*:|$)", re.S | re.I)


class ParseError(ValueError):
    """Model output that is neither an action nor a final answer."""


@dataclass
class AgentConfig:
    """Bounds of one run.

    Args:
        max_steps: model calls at most (retries after unparsable output count too).
        max_seconds: wall-clock budget; checked before each model call.
        max_observation_chars: longer tool results are cut.
        withhold_injections: a tool result the guard flags as an injection is replaced by a notice, so
            its instructions never reach the model (all results are spotlighted either way).
    """

    max_steps: int = 8
    max_seconds: float = 120.0
    max_observation_chars: int = 1500
    withhold_injections: bool = True

    def __post_init__(self) -> None:
        if self.max_steps < 1 or self.max_seconds <= 0:
            raise ValueError(f"need max_steps >= 1 and max_seconds > 0, got {self.max_steps}, {self.max_seconds}")


@dataclass
class Step:
    """One model call and what came of it."""

    index: int
    raw: str
    thought: str = ""
    action: str | None = None
    action_input: dict | None = None
    observation: str | None = None
    final_answer: str | None = None
    error: str | None = None
    guard: dict | None = None  # what the guard found in the observation (injection score, PII, reasons)
    calls: list[dict] | None = None  # JSON agent: every tool call of the step (they run in parallel)
    seconds: float = 0.0


@dataclass
class AgentResult:
    """The answer (None if the budget ran out), why the loop stopped, and every step."""

    question: str
    answer: str | None
    stopped: str  # "answer" | "max_steps" | "timeout"
    steps: list[Step] = field(default_factory=list)

    def trace_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, indent=1)


def parse_output(text: str, tools: dict[str, Tool]) -> tuple[str, str | None, dict | None, str | None]:
    """(thought, action, action input, final answer) from model text, or ParseError saying what is wrong."""
    text = text.split("\nObservation", 1)[0]  # a model that writes its own observation is cut there
    thought_match = THOUGHT.match(text)
    thought = thought_match.group("thought").strip() if thought_match else ""
    action = ACTION.search(text)
    final = FINAL.search(text)
    if final and (not action or final.start() < action.start()):
        answer = final.group("answer").strip()
        if not answer:
            raise ParseError("the Final Answer is empty")
        return thought, None, None, answer
    if not action:
        raise ParseError("expected 'Action: <tool>' then 'Action Input: {...}', or 'Final Answer: ...'")
    name = action.group("name").strip()
    if name not in tools:
        raise ParseError(f"unknown tool {name!r}; the tools are {sorted(tools)}")
    return thought, name, parse_input(action.group("input") or "", tools[name]), None


def parse_input(raw: str, tool: Tool) -> dict:
    """The first JSON object in `raw`; a bare string goes to the tool's only required argument."""
    raw = raw.strip().split("\n")[0].strip().strip("`")
    start = raw.find("{")
    if start >= 0:
        try:
            value, _ = json.JSONDecoder().raw_decode(raw[start:])
            if isinstance(value, dict):
                return value
        except json.JSONDecodeError:
            pass
    required = tool.parameters.get("required", [])
    loose = LOOSE_OBJECT.match(raw)
    if len(required) == 1 and loose and loose.group("key") == required[0]:  # unquoted value, a small model's habit
        return {required[0]: loose.group("value").strip("\"'")}
    if len(required) == 1 and raw and not raw.startswith("{"):
        return {required[0]: raw.strip("\"'")}
    if not required and not raw.strip("{} "):
        return {}
    raise ParseError(f"Action Input for {tool.name} must be a JSON object like "
                     f"{json.dumps({k: '...' for k in required})}, got {raw[:80]!r}")


def build_prompt(question: str, tools: list[Tool], scratchpad: str) -> str:
    """The plain-text ReAct prompt: tools, format, an example, the question, the steps so far."""
    listing = "\n".join(f"- {t.name}: {t.description} Arguments: {json.dumps(t.parameters.get('properties', {}))}"
                        for t in tools)
    return (f"Answer the question using the tools.\nTools:\n{listing}\n\n{FORMAT.format(names=', '.join(t.name for t in tools))}"
            f"\n\n{EXAMPLE}\n\nQuestion: {question}\n{scratchpad}")


def run_agent(question: str, policy: Callable[[str], str], tools: list[Tool], config: AgentConfig | None = None,
              clock: Callable[[], float] = time.monotonic, guard: Guard | None = None) -> AgentResult:
    """Loop policy -> parse -> tool until a final answer or the step/time budget ends; every tool result
    passes `guard` (the shared lmforge.safety Guard; a default one when None) and is spotlighted."""
    config = config or AgentConfig()
    guard = guard or Guard()
    if not question.strip():
        raise ValueError("the question is empty")
    by_name = {t.name: t for t in tools}
    if len(by_name) != len(tools):
        raise ValueError(f"tool names must be unique, got {[t.name for t in tools]}")
    result, scratchpad, start = AgentResult(question, None, "max_steps"), "", clock()
    for index in range(config.max_steps):
        if clock() - start > config.max_seconds:
            result.stopped = "timeout"
            break
        step_start = clock()
        step = Step(index, raw=str(policy(build_prompt(question, tools, scratchpad))))
        scratchpad += take_step(step, by_name, config, guard)
        step.seconds = clock() - step_start
        result.steps.append(step)
        if step.final_answer is not None:
            result.answer, result.stopped = step.final_answer, "answer"
            break
    return result


def take_step(step: Step, tools: dict[str, Tool], config: AgentConfig, guard: Guard | None = None) -> str:
    """Parse the step's text and run its tool; fills the step; returns the scratchpad lines it adds."""
    try:
        step.thought, step.action, step.action_input, step.final_answer = parse_output(step.raw, tools)
    except ParseError as err:
        step.error = f"parse: {err}"
        step.observation = f"Invalid format ({err}). Reply with Thought, then Action and Action Input, " \
                           f"or Final Answer."
        said = re.sub(r"^\s*Thought\s*:\s*", "", step.raw.strip(), flags=re.I)[:200]
        return f"Thought: {said}\nObservation: {step.observation}\n"
    if step.final_answer is not None:
        return ""
    try:
        observation = tools[step.action].run(step.action_input)
    except (ToolError, ValueError, TypeError, ArithmeticError) as err:
        step.error = f"tool: {err}"
        observation = f"Error: {err}"
    step.observation = observation[:config.max_observation_chars]
    shown = guarded_observation(step, guard or Guard(), config.withhold_injections)
    return (f"Thought: {step.thought}\nAction: {step.action}\nAction Input: {json.dumps(step.action_input)}\n"
            f"Observation: {shown}\n")


def guarded_observation(step: Step, guard: Guard, withhold: bool) -> str:
    """The observation as the model sees it: scanned, spotlighted, withheld when flagged (and asked to)."""
    wrapped, scan = guard.wrap_untrusted(step.observation, f"{step.action} result")
    flagged = scan.injection_score >= guard.config.injection_threshold
    step.guard = {"injection_score": scan.injection_score, "flagged": flagged, "reasons": scan.reasons,
                  "pii": [p["kind"] for p in scan.pii], "withheld": flagged and withhold}
    if flagged and withhold:
        return (f"[the {step.action} result was withheld: it carried instructions (injection score "
                f"{scan.injection_score:.2f}); answer from other results]")
    return wrapped


class LMPolicy:
    """The local model as a policy: chat-templated prompt, greedy decoding, stops at 'Observation:'."""

    def __init__(self, model, tokenizer, max_tokens: int = 96):
        self.model, self.tokenizer, self.max_tokens = model, tokenizer, max_tokens

    def __call__(self, prompt: str) -> str:
        from lmforge.generation.generate import generate
        from lmforge.generation.sampling import SamplingParams

        question, _, scratchpad = prompt.rpartition("\nQuestion: ")[2].partition("\n")
        head = prompt[:prompt.rfind("\nQuestion: ")]
        text = self.tokenizer.apply_chat_template([{"role": "system", "content": head},
                                                   {"role": "user", "content": f"Question: {question}"}])
        ids = self.tokenizer.encode(text + scratchpad + "Thought:", add_special_tokens=False)
        params = SamplingParams(temperature=0.0, max_new_tokens=self.max_tokens, stop=["Observation:"])
        return "Thought:" + generate(self.model, self.tokenizer, [ids], params)[0].text

"""Hierarchical agents: a planner splits the question into sub-questions, worker agents answer each
with their tools, and the planner composes the final answer from the workers' answers. The planner's
plan and answer are JSON a grammar enforces (as the workers' actions are)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Callable

from lmforge.agents.react import AgentResult

MAX_SUB = 3
PLAN_SCHEMA = {"type": "object", "properties": {"sub_questions": {
    "type": "array", "items": {"type": "string", "minLength": 3, "maxLength": 120}, "minItems": 1, "maxItems": MAX_SUB}},
    "required": ["sub_questions"], "additionalProperties": False}
ANSWER_SCHEMA = {"type": "object", "properties": {"final_answer": {"type": "string", "minLength": 1, "maxLength": 160}},
                 "required": ["final_answer"], "additionalProperties": False}
PLAN_PROMPT = (f"Split the question into 1 to {MAX_SUB} simpler questions that can each be answered with one tool "
               '(calculator, search, clock, python). Reply as JSON: {"sub_questions": ["...", "..."]}. '
               "A simple question stays one sub-question.")
COMPOSE_PROMPT = 'Answer the question from the answers to its parts. Reply as JSON: {"final_answer": "..."}.'

Planner = Callable[[list[dict], dict], str]  # (chat messages, JSON Schema) -> JSON text
Worker = Callable[[str], AgentResult]  # a sub-question -> a worker agent's run


@dataclass
class HierarchicalResult:
    question: str
    answer: str | None
    plan: list[str] = field(default_factory=list)
    workers: list[AgentResult] = field(default_factory=list)
    error: str | None = None

    def trace_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, indent=1)


def plan(planner: Planner, question: str) -> list[str]:
    """The sub-questions (the question itself when the plan does not parse: the unconstrained case)."""
    raw = planner([{"role": "system", "content": PLAN_PROMPT}, {"role": "user", "content": question}], PLAN_SCHEMA)
    try:
        subs = json.loads(raw)["sub_questions"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return [question]
    subs = [s.strip() for s in subs if isinstance(s, str) and s.strip()][:MAX_SUB]
    return subs or [question]


def run_hierarchical(question: str, planner: Planner, worker: Worker, parallel: bool = False) -> HierarchicalResult:
    """Plan, hand each sub-question to a worker (in threads with `parallel`, e.g. scripted or remote
    workers; one local model is better run one at a time), then compose the answer."""
    if not question.strip():
        raise ValueError("the question is empty")
    result = HierarchicalResult(question, None, plan(planner, question))
    if parallel:
        with ThreadPoolExecutor(max_workers=len(result.plan)) as pool:
            result.workers = list(pool.map(worker, result.plan))
    else:
        result.workers = [worker(q) for q in result.plan]
    if len(result.workers) == 1:  # nothing to compose
        result.answer = result.workers[0].answer
        return result
    parts = "\n".join(f"- {q} -> {w.answer if w.answer is not None else '(no answer)'}"
                      for q, w in zip(result.plan, result.workers))
    raw = planner([{"role": "system", "content": COMPOSE_PROMPT},
                   {"role": "user", "content": f"Question: {question}\nParts:\n{parts}"}], ANSWER_SCHEMA)
    try:
        result.answer = json.loads(raw)["final_answer"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        result.error = f"compose: {err}"
    return result


def lm_planner(model, tokenizer, constrained: bool = True, max_tokens: int = 200) -> Planner:
    """The local model as planner: its reply under the given schema's grammar."""
    from lmforge.agents.json_agent import ask
    from lmforge.generation.constrained import Constraint

    def planner(messages: list[dict], schema: dict) -> str:
        constraint = Constraint("json_schema", schema) if constrained else None
        return ask(model, tokenizer, messages, constraint, max_tokens)
    return planner

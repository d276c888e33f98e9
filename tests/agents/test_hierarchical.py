"""Hierarchical mode: the planner's sub-questions go to workers (in parallel when asked), the planner
composes their answers; a plan that does not parse falls back to the question itself."""

from __future__ import annotations

import json
import threading
import time

from lmforge.agents.hierarchical import ANSWER_SCHEMA, PLAN_SCHEMA, run_hierarchical
from lmforge.agents.react import AgentResult


def planner_for(subs: list[str], compose=lambda parts: "done"):
    calls = []

    def planner(messages, schema):
        calls.append((messages, schema))
        if schema is PLAN_SCHEMA:
            return json.dumps({"sub_questions": subs})
        assert schema is ANSWER_SCHEMA
        return json.dumps({"final_answer": compose(messages[-1]["content"])})
    planner.calls = calls
    return planner


def worker(question: str) -> AgentResult:
    answers = {"What is 17 times 23?": "391", "What is 144 divided by 12?": "12"}
    time.sleep(0.3)
    return AgentResult(question, answers.get(question), "answer")


def test_plan_workers_compose() -> None:
    planner = planner_for(["What is 17 times 23?", "What is 144 divided by 12?"],
                          compose=lambda parts: str(391 + 12) if "-> 391" in parts and "-> 12" in parts else "?")
    result = run_hierarchical("What is 17 times 23 plus 144 divided by 12?", planner, worker)
    assert result.plan == ["What is 17 times 23?", "What is 144 divided by 12?"]
    assert [w.answer for w in result.workers] == ["391", "12"] and result.answer == "403"
    assert json.loads(result.trace_json())["workers"][0]["answer"] == "391"


def test_workers_run_in_parallel_when_asked() -> None:
    subs = ["What is 17 times 23?", "What is 144 divided by 12?", "What is 17 times 23?"]
    threads = set()

    def tracked(question):
        threads.add(threading.get_ident())
        return worker(question)
    start = time.perf_counter()
    run_hierarchical("three parts", planner_for(subs), tracked, parallel=True)
    assert time.perf_counter() - start < 0.8 and len(threads) == 3


def test_unparsable_plan_falls_back_to_the_question() -> None:
    def planner(messages, schema):
        return "I cannot plan"
    result = run_hierarchical("What is 17 times 23?", planner, worker)
    assert result.plan == ["What is 17 times 23?"] and result.answer == "391"

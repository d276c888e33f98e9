"""A small task set for the ReAct agent: arithmetic, lookup in a made-up corpus, and both.

The facts are invented so the model cannot answer from memory: a lookup succeeds only through the
search tool. A task succeeds when its expected string is in the final answer.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.rag.chunks import Chunk

FACTS = [Chunk("f1", "The capital of Zorbland is Quillton, founded in 1432."),
         Chunk("f2", "The river Narr flows through Quillton and is 312 km long."),
         Chunk("f3", "Zorbland's national dish is baked turnip with honey."),
         Chunk("f4", "The Zorbland parliament has 87 seats.")]


@dataclass(frozen=True)
class Task:
    question: str
    expected: str
    kind: str  # "arithmetic" | "lookup" | "both"


TASKS = [
    Task("What is 17 times 23?", "391", "arithmetic"),
    Task("What is 1234 plus 4321?", "5555", "arithmetic"),
    Task("What is 144 divided by 12?", "12", "arithmetic"),
    Task("What is the capital of Zorbland?", "Quillton", "lookup"),
    Task("What is the national dish of Zorbland?", "turnip", "lookup"),
    Task("How many seats does the Zorbland parliament have? Multiply that number by 2.", "174", "both"),
]


def search_tool():
    """The search tool over FACTS (BM25: no embedder needed)."""
    from lmforge.agents.tools import search
    from lmforge.rag.bm25 import BM25Index
    from lmforge.rag.retrieve import BM25Retriever

    return search(BM25Retriever(BM25Index(FACTS)).retrieve, k=1)


def run_tasks(policy, config=None, tasks: list[Task] | None = None) -> list[dict]:
    """Run the tasks (default: all); one record per task: success, steps, stop reason, parse errors, seconds."""
    from lmforge.agents.react import run_agent
    from lmforge.agents.tools import calculator, clock

    records = []
    for task in tasks or TASKS:
        result = run_agent(task.question, policy, [calculator(), clock(), search_tool()], config)
        seconds = sum(s.seconds for s in result.steps)
        ok = result.answer is not None and task.expected.lower() in result.answer.lower()
        records.append({"question": task.question, "kind": task.kind, "success": ok, "answer": result.answer,
                        "steps": len(result.steps), "stopped": result.stopped, "seconds": round(seconds, 2),
                        "parse_errors": sum(1 for s in result.steps if (s.error or "").startswith("parse"))})
    return records

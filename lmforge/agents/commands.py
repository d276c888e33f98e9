"""CLI: `lmforge agent "QUESTION"` — an agent with calculator, clock, a Python sandbox and (with an
index) search; JSON actions under a grammar by default, the free-text ReAct loop, or a planner with workers."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

from lmforge import hub


def agent_command(question: str, model: str = hub.DEFAULT_MODEL, index: str | None = None, max_steps: int = 8,
                  max_seconds: float = 120.0, trace: str | None = None,
                  mode: Literal["json", "text", "hierarchical"] = "json", memory: str | None = None,
                  files: str | None = None, sandbox: bool = True) -> int:
    """Answer with a tool-using agent; prints each step.

    Args:
        question: the task.
        model: a model name, a .gguf file or a Hugging Face directory.
        index: a RAG index folder; adds the `search` tool.
        max_steps: most model calls.
        max_seconds: wall-clock budget.
        trace: write the JSON trace of every step to this file.
        mode: json (actions under a grammar, parallel calls), text (free-text ReAct) or hierarchical (planner + workers).
        memory: a folder for long-term memory (past questions and answers, recalled by similarity).
        files: a folder the agent may read text files from (the read_file tool).
        sandbox: offer the Python sandbox tool (no network, processes or outside writes).
    """
    from lmforge.agents.react import AgentConfig, LMPolicy, run_agent
    from lmforge.agents.tools import calculator, clock, search
    from lmforge.atomic import atomic_write_text
    from lmforge.checkpoint.load import load

    loaded = load(hub.resolve(model, pull_missing=model in hub.REGISTRY))
    tools = [calculator(), clock()]
    if index:
        from lmforge.rag.pipeline import RAG

        tools.append(search(RAG(index, loaded=loaded).search))
    if files:
        from lmforge.agents.sandbox import file_reader

        tools.append(file_reader(files))
    if sandbox:
        from lmforge.agents.sandbox import python_sandbox

        tools.append(python_sandbox())
    config = AgentConfig(max_steps, max_seconds)
    store = None
    if memory:
        from lmforge.agents.memory import AgentMemory

        store = AgentMemory(memory)
    if mode == "text":
        result = run_agent(question, LMPolicy(*loaded), tools, config)
    else:
        from lmforge.agents.json_agent import ConstrainedPolicy, run_json_agent

        def solve(q: str):
            notes = store.notes(q) if store else ""
            return run_json_agent(q, ConstrainedPolicy(*loaded, tools), tools, config, notes=notes)
        if mode == "hierarchical":
            from lmforge.agents.hierarchical import lm_planner, run_hierarchical

            result = run_hierarchical(question, lm_planner(*loaded), solve)
            for sub, run in zip(result.plan, result.workers):
                print(f"=== sub-question: {sub}", file=sys.stderr)
                _print_steps(run)
        else:
            result = solve(question)
    if mode != "hierarchical":
        _print_steps(result)
    if store and result.answer is not None:
        store.remember(question, result.answer)
    if trace:
        atomic_write_text(Path(trace), result.trace_json())
    print(result.answer if result.answer is not None else "[no answer]")
    return 0 if result.answer is not None else 1


def _print_steps(result) -> None:
    for step in result.steps:
        print(f"--- step {step.index} ({step.seconds:.1f} s)\n{step.raw.strip()}", file=sys.stderr)
        if step.observation is not None:
            print(f"Observation: {step.observation}", file=sys.stderr)

"""CLI: `lmforge agent "QUESTION"` — the ReAct loop with calculator, clock and (with an index) search."""

from __future__ import annotations

import sys
from pathlib import Path

from lmforge import hub


def agent_command(question: str, model: str = hub.DEFAULT_MODEL, index: str | None = None, max_steps: int = 8,
                  max_seconds: float = 120.0, trace: str | None = None) -> int:
    """Answer with a ReAct agent (thought, action, observation) using tools; prints each step.

    Args:
        question: the task.
        model: a model name, a .gguf file or a Hugging Face directory.
        index: a RAG index folder; adds the `search` tool.
        max_steps: most model calls.
        max_seconds: wall-clock budget.
        trace: write the JSON trace of every step to this file.
    """
    from lmforge.agents.react import AgentConfig, LMPolicy, run_agent
    from lmforge.agents.tools import calculator, clock, search
    from lmforge.checkpoint.load import load
    from lmforge.atomic import atomic_write_text

    loaded = load(hub.resolve(model, pull_missing=model in hub.REGISTRY))
    tools = [calculator(), clock()]
    if index:
        from lmforge.rag.pipeline import RAG

        tools.append(search(RAG(index, loaded=loaded).search))
    result = run_agent(question, LMPolicy(*loaded), tools, AgentConfig(max_steps, max_seconds))
    for step in result.steps:
        print(f"--- step {step.index} ({step.seconds:.1f} s)\n{step.raw.strip()}", file=sys.stderr)
        if step.observation is not None:
            print(f"Observation: {step.observation}", file=sys.stderr)
    if trace:
        atomic_write_text(Path(trace), result.trace_json())
    print(result.answer if result.answer is not None else f"[no answer: stopped by {result.stopped}]")
    return 0 if result.answer is not None else 1

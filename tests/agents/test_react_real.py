"""The ReAct loop with the real SmolLM2-135M: it must run every task to a clean stop; the rate is reported."""

from __future__ import annotations

import json

import pytest

from lmforge.agents.react import AgentConfig, LMPolicy
from lmforge.agents.tasks import TASKS, run_tasks

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def policy(smollm2_gguf):
    from lmforge.checkpoint.load import load

    return LMPolicy(*load(smollm2_gguf), max_tokens=48)


def test_task_set_runs_and_reports(policy):
    records = run_tasks(policy, AgentConfig(max_steps=2, max_seconds=30), TASKS[::2])  # all six: bench/bench_rag.py
    assert len(records) == 3
    assert all(r["stopped"] in ("answer", "max_steps", "timeout") and r["steps"] >= 1 for r in records)
    rate = sum(r["success"] for r in records) / len(records)
    print(f"\nSmolLM2-135M ReAct success: {rate:.0%}\n" + json.dumps(records, indent=1))  # not asserted high

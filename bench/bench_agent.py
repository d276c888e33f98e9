"""Agent success with the real SmolLM2-135M-Instruct on the fixed 32-task set (bench/data/agent_tasks.json,
written before any tuning): constrained JSON actions vs the free-text ReAct loop, same tools, same model.

    python bench/bench_agent.py                      # both modes, all tasks
    python bench/bench_agent.py --modes json --limit 8

Tools: calculator, clock (fixed at the set's date), search (BM25 over the Python FAQ's answer chunks,
Debian python3.11-doc), python (the sandbox). Greedy decoding; at most 4 model calls per task.
A task succeeds when one of its expected strings is in the final answer as a whole word or number
(case-insensitive; "36" is not found in "3600").
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lmforge.agents.json_agent import ConstrainedPolicy, run_json_agent  # noqa: E402
from lmforge.agents.react import AgentConfig, LMPolicy, run_agent  # noqa: E402
from lmforge.agents.sandbox import python_sandbox  # noqa: E402
from lmforge.agents.tools import calculator, clock, search  # noqa: E402

TASKS = ROOT / "bench" / "data" / "agent_tasks.json"


def faq_search():
    from lmforge.rag.bm25 import BM25Index
    from lmforge.rag.evaluate import faq_eval_set
    from lmforge.rag.retrieve import BM25Retriever

    chunks, _ = faq_eval_set()
    return search(BM25Retriever(BM25Index(chunks)).retrieve, k=2, max_chars=300)


def tools_for(spec: dict) -> list:
    now = dt.datetime.fromisoformat(spec["clock"])
    return [calculator(), clock(lambda: now), faq_search(), python_sandbox()]


def succeeded(answer: str | None, expected: list[str]) -> bool:
    """An expected string in the answer as a whole word or number ("36" is not found in "3600")."""
    return answer is not None and any(re.search(rf"(?<![\w.]){re.escape(e.lower())}(?![\w])", answer.lower())
                                      for e in expected)


def run_mode(mode: str, loaded, tasks: list[dict], tools: list, max_steps: int) -> list[dict]:
    from tqdm import tqdm

    config = AgentConfig(max_steps=max_steps, max_seconds=300)
    model, tok = loaded
    records = []
    for task in tqdm(tasks, desc=mode, unit="task"):
        start = time.perf_counter()
        if mode == "json":
            result = run_json_agent(task["question"], ConstrainedPolicy(model, tok, tools), tools, config)
        elif mode == "json-unconstrained":
            policy = ConstrainedPolicy(model, tok, tools, constrained=False)
            result = run_json_agent(task["question"], policy, tools, config)
        else:  # the free-text ReAct loop
            result = run_agent(task["question"], LMPolicy(model, tok, max_tokens=96), tools, config)
        records.append({"kind": task["kind"], "question": task["question"], "answer": result.answer,
                        "success": succeeded(result.answer, task["expected"]), "steps": len(result.steps),
                        "parse_errors": sum(1 for s in result.steps if (s.error or "").startswith("parse")),
                        "seconds": round(time.perf_counter() - start, 1)})
    return records


def summary(records: list[dict]) -> dict:
    kinds = sorted({r["kind"] for r in records})
    out = {"success": sum(r["success"] for r in records), "tasks": len(records),
           "parse_errors": sum(r["parse_errors"] for r in records)}
    out.update({k: f"{sum(r['success'] for r in records if r['kind'] == k)}/"
                   f"{sum(1 for r in records if r['kind'] == k)}" for k in kinds})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", default=["json", "text"],
                        choices=["json", "json-unconstrained", "text"])
    parser.add_argument("--limit", type=int, default=0, help="first N tasks only")
    parser.add_argument("--max-steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "agent.json"))
    args = parser.parse_args()
    import torch

    from lmforge import hub
    from lmforge.checkpoint.load import load

    if args.threads:
        torch.set_num_threads(args.threads)
    spec = json.loads(TASKS.read_text())
    tasks = spec["tasks"][:args.limit or None]
    loaded = load(hub.resolve("smollm2-135m-instruct", pull_missing=True))
    tools = tools_for(spec)
    results = {mode: run_mode(mode, loaded, tasks, tools, args.max_steps) for mode in args.modes}
    table = {mode: summary(records) for mode, records in results.items()}
    for mode, row in table.items():
        print(f"{mode:>20}: {row}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"date": str(dt.date.today()), "summary": table, "records": results},
                                          indent=1))


if __name__ == "__main__":
    main()

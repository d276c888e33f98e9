"""Long-term memory: results stored in the Chroma store are recalled for a similar question (MiniLM
embeddings), not for an unrelated one, survive reopening, and reach the agent as spotlighted notes."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("chromadb")


@pytest.fixture(scope="module")
def embedder():
    from lmforge.rag.embed import MiniLMEmbedder, default_model_dir

    if not (default_model_dir() / "tokenizer.json").is_file():
        pytest.skip("the MiniLM embedding model is not installed")
    return MiniLMEmbedder()


def test_recall_similar_not_unrelated_and_persist(tmp_path, embedder) -> None:
    from lmforge.agents.memory import AgentMemory

    memory = AgentMemory(str(tmp_path / "mem"), embedder)
    memory.remember("Which module sends e-mail from Python?", "smtplib")
    memory.remember("What is 17 times 23?", "391")
    found = memory.recall("How do I send an email with Python?")
    assert found and found[0].answer == "smtplib" and found[0].score >= memory.min_score
    assert memory.recall("What colour is the sky on Mars?") == []
    reopened = AgentMemory(str(tmp_path / "mem"), embedder)  # persisted on disk
    assert reopened.recall("what is 17 * 23")[0].answer == "391"
    memory.remember("What is 17 times 23?", "three hundred ninety-one")  # same question: replaced
    assert reopened.store.count() == 2


def test_notes_reach_the_agent_spotlighted(tmp_path, embedder) -> None:
    from lmforge.agents.json_agent import run_json_agent
    from lmforge.agents.memory import AgentMemory
    from lmforge.agents.tools import calculator

    memory = AgentMemory(str(tmp_path / "mem"), embedder)
    memory.remember("Which module sends e-mail from Python?", "smtplib")
    seen = []

    def policy(messages):
        seen.append(messages[0]["content"])
        return json.dumps({"thought": "from memory", "final_answer": "smtplib"})
    question = "How do I send an email with Python?"
    result = run_json_agent(question, policy, [calculator()], notes=memory.notes(question))
    assert result.answer == "smtplib"
    assert "<<untrusted memory" in seen[0] and "A: smtplib" in seen[0]

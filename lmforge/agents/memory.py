"""Long-term memory of an agent: past questions and their answers in the RAG store (Chroma, cosine),
recalled by embedding similarity at the start of a new run and shown to the model as spotlighted
notes (they are data from earlier runs, not instructions). Short-term memory is the run's own trace.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from lmforge.rag.chunks import Chunk
from lmforge.rag.store import StoreConfig, open_store
from lmforge.safety.injection import spotlight


@dataclass
class Recollection:
    question: str
    answer: str
    score: float


class AgentMemory:
    """remember(question, answer) after a run; recall(question) before the next one."""

    def __init__(self, path: str, embedder=None, min_score: float = 0.6, collection: str = "agent_memory") -> None:
        if embedder is None:
            from lmforge.rag.embed import MiniLMEmbedder

            embedder = MiniLMEmbedder()
        self.embedder, self.min_score = embedder, min_score
        self.store = open_store(StoreConfig(kind="chroma", path=path, collection=collection), create=True)

    def remember(self, question: str, answer: str, trace_id: str = "") -> str:
        """Store one result (the same question again replaces it); returns its id."""
        if not question.strip() or not answer.strip():
            raise ValueError("remember() needs a question and an answer")
        key = hashlib.sha256(question.strip().lower().encode()).hexdigest()[:16]
        chunk = Chunk(key, f"Q: {question.strip()}\nA: {answer.strip()}", source="agent",
                      metadata={"question": question.strip(), "answer": answer.strip(), "trace": trace_id})
        self.store.upsert([chunk], self.embedder.embed([question.strip()]))
        return key

    def recall(self, question: str, k: int = 3) -> list[Recollection]:
        """Past results whose question is at least `min_score` similar (cosine), best first."""
        if self.store.count() == 0:
            return []
        hits = self.store.query(self.embedder.embed([question.strip()])[0], k)
        return [Recollection(h.chunk.metadata.get("question", ""), h.chunk.metadata.get("answer", ""), h.score)
                for h in hits if h.score >= self.min_score]

    def notes(self, question: str, k: int = 3) -> str:
        """The recalled results as a spotlighted block for the system prompt ("" when none)."""
        found = self.recall(question, k)
        if not found:
            return ""
        text = "\n".join(f"Q: {r.question}\nA: {r.answer}" for r in found)
        return "Results of earlier runs (they may help):\n" + spotlight(text, "memory")

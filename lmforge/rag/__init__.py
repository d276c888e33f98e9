"""Retrieval-augmented generation: embed, store, bm25, retrieve, rerank, metrics, pipeline."""

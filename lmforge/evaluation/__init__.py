"""Evaluation: perplexity and, later, task metrics."""

"""Agents: a ReAct loop and its tools."""

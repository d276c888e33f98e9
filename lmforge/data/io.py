"""Reading the JSON and JSON-lines files the data stages write (atomically, with lmforge.atomic)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_jsonl(path: str | Path) -> list[dict]:
    """All records of a JSON-lines file ([] when it does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_json(path: str | Path, default: Any = None) -> Any:
    """A JSON file's content, or `default` when it does not exist."""
    path = Path(path)
    if not path.exists():
        return default
    with open(path, encoding="utf-8") as f:
        return json.load(f)

"""Reading the JSON and JSON-lines files the data stages write (atomically, with lmforge.atomic)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator


def read_jsonl(path: str | Path) -> list[dict]:
    """All records of a JSON-lines file ([] when it does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def jsonl_records(path: str | Path) -> Iterator[tuple[str, Any]]:
    """("file:line", parsed value) for each non-blank line of a user's JSON-lines file; a line that is not
    JSON is a ValueError naming file:line."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err.msg})") from None


def read_json(path: str | Path, default: Any = None) -> Any:
    """A JSON file's content, or `default` when it does not exist."""
    path = Path(path)
    if not path.exists():
        return default
    with open(path, encoding="utf-8") as f:
        return json.load(f)

"""CLI: `lmforge guard TEXT` — injection score, PII found and the redacted text."""

from __future__ import annotations

import json
import sys
from typing import Literal


def guard_command(text: str = "-", kind: Literal["input", "output", "untrusted"] = "input", file: str | None = None,
                  block_injection: bool = False, as_json: bool = False) -> int:
    """Check a text with the guard: prompt-injection score and patterns, PII found, the redacted text.

    Exit status 0 when clean, 1 when something was found (3 when blocked), so scripts can branch on it.

    Args:
        text: the text to check; "-" reads standard input.
        kind: input (user text), output (model text) or untrusted (a document or tool result).
        file: read the text from this UTF-8 file instead.
        block_injection: treat an injection in input as blocking.
        as_json: print the full result as JSON.
    """
    from lmforge.safety.guard import Guard, GuardConfig

    if file:
        try:
            text = open(file, "rb").read().decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{file} is not UTF-8 ({err.reason} at byte {err.start}); convert it first") from None
    elif text == "-":
        text = sys.stdin.read()
    guard = Guard(GuardConfig(redact_input_pii=True, redact_untrusted_pii=True, block_injection=block_injection))
    check = {"input": guard.check_input, "output": guard.check_output, "untrusted": guard.check_untrusted}[kind]
    result = check(text)
    if as_json:
        print(json.dumps(result.to_dict(), ensure_ascii=False, indent=1))
    else:
        print(f"injection score: {result.injection_score:.2f} {result.injection_patterns or ''}".rstrip())
        print(f"pii: {', '.join(p['kind'] for p in result.pii) or 'none'}")
        print(f"verdict: {'BLOCKED' if result.blocked else ('; '.join(result.reasons) or 'clean')}")
        print(result.text)
    return 3 if result.blocked else int(bool(result.reasons))

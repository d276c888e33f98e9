"""The shared `Guard` (lmforge.safety) on the server's path: user text is scanned before it is
tokenized, model text is redacted before it leaves, findings are counted in /metrics.

Streaming keeps the last `HOLDBACK` characters of each choice until more text (or the end)
arrives, so a PII item up to that length is redacted before any of it is sent; longer items may
leak in part when streamed (non-streamed responses are redacted whole).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lmforge.safety.guard import Guard, GuardResult

HOLDBACK = 64  # characters: longer than an IBAN (34), a card number with spaces (23), most e-mail addresses
OPT_OUT_HEADER = "x-lmforge-guard"  # "off" from a trusted key skips the guard for that request


@dataclass
class ServerGuard:
    """The guard and who may switch it off per request."""

    guard: Guard
    trusted_keys: set[str] = field(default_factory=set)

    def active_for(self, headers) -> bool:
        """False only when a trusted key asks for `X-Lmforge-Guard: off`."""
        if headers.get(OPT_OUT_HEADER, "").lower() != "off":
            return True
        key = headers.get("authorization", "").removeprefix("Bearer ")
        return key not in self.trusted_keys


def record(metrics, stage: str, result: GuardResult) -> None:
    """Count what a check found (injection flags, PII items by kind) under its stage."""
    if any(r.startswith("injection") for r in result.reasons):
        metrics.guard_findings.labels(stage=stage, kind="injection").inc()
    for item in result.pii:
        metrics.guard_findings.labels(stage=stage, kind=f"pii_{item['kind'].lower()}").inc()


def check_user_texts(guard: Guard, metrics, texts: list[str]) -> tuple[list[str], list[str]]:
    """(texts to use, reasons to block) for the user's messages or prompts."""
    out, blocked = [], []
    for text in texts:
        result = guard.check_input(text)
        record(metrics, "input", result)
        out.append(result.text)
        if result.blocked:
            blocked += result.reasons
    return out, blocked


def redact_output(guard: Guard, metrics, text: str) -> str:
    result = guard.check_output(text)
    record(metrics, "output", result)
    return result.text


class StreamRedactor:
    """Per choice: the redacted text accumulated so far, released up to HOLDBACK characters behind."""

    def __init__(self, guard: Guard, metrics) -> None:
        self.guard, self.metrics = guard, metrics
        self.raw: dict[int, str] = {}
        self.sent: dict[int, int] = {}

    def feed(self, index: int, text: str, final: bool) -> str:
        """The next piece of choice `index` that is safe to send."""
        raw = self.raw[index] = self.raw.get(index, "") + text
        if final:
            redacted = redact_output(self.guard, self.metrics, raw)
            release = len(redacted)
        else:
            redacted = self.guard.check_output(raw).text
            release = max(self.sent.get(index, 0), len(redacted) - HOLDBACK)
        start = self.sent.get(index, 0)
        self.sent[index] = release
        return redacted[start:release]

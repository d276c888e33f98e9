"""The input/output guard that RAG, the agent and the server share.

    guard = Guard()
    checked = guard.check_input(user_text)         # injection flags, PII redacted if configured
    context = guard.wrap_untrusted(chunk_text, "source 1")   # scanned and spotlighted
    reply = guard.check_output(model_text)         # PII redacted before it leaves

Each check returns a `GuardResult`: the text to use, what was found, and whether the policy blocks
it. Blocking is opt-in (`block_injection`); by default findings are reported and PII is redacted.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from lmforge.safety.injection import THRESHOLD, detect_injection, spotlight
from lmforge.safety.pii import redact


@dataclass
class GuardConfig:
    """Guard policy.

    Args:
        redact_input_pii: replace PII in user input with placeholders before the model sees it.
        redact_output_pii: replace PII in model output before it is returned.
        redact_untrusted_pii: replace PII inside retrieved documents and tool results.
        block_injection: refuse user input that looks like an injection (default: flag only).
        injection_threshold: score at which a text is flagged as an injection.
        spotlight_mode: "delimit" or "datamark" for untrusted text.
        pii_region: default region for phone numbers without a country code.
        max_chars: longer texts are refused (ValueError) rather than scanned.
    """

    redact_input_pii: bool = False
    redact_output_pii: bool = True
    redact_untrusted_pii: bool = False
    block_injection: bool = False
    injection_threshold: float = THRESHOLD
    spotlight_mode: str = "delimit"
    pii_region: str = "US"
    max_chars: int = 1_000_000

    def __post_init__(self) -> None:
        if not 0 < self.injection_threshold <= 1:
            raise ValueError(f"injection_threshold must be in (0, 1], got {self.injection_threshold}")


@dataclass
class GuardResult:
    """What a check found and the text to use in place of the original."""

    text: str
    blocked: bool = False
    injection_score: float = 0.0
    injection_patterns: list[str] = field(default_factory=list)
    pii: list[dict] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class Guard:
    """Input and output filters with one policy."""

    def __init__(self, config: GuardConfig | None = None):
        self.config = config or GuardConfig()

    def _scan(self, text: str, redact_pii: bool, injection: bool) -> GuardResult:
        if not isinstance(text, str):
            raise TypeError(f"the guard checks str, got {type(text).__name__}")
        if len(text) > self.config.max_chars:
            raise ValueError(f"text of {len(text):,} characters is over the guard's limit of "
                             f"{self.config.max_chars:,}; split it first")
        redacted, matches = redact(text, region=self.config.pii_region)
        result = GuardResult(redacted if redact_pii else text,
                             pii=[{"kind": m.kind, "start": m.start, "end": m.end} for m in matches])
        if matches:
            result.reasons.append(f"pii: {', '.join(sorted({m.kind for m in matches}))}")
        if injection:
            report = detect_injection(text, self.config.injection_threshold)
            result.injection_score, result.injection_patterns = report.score, report.patterns
            if report.flagged:
                result.reasons.append(f"injection: score {report.score:.2f} {report.patterns or ''}".rstrip())
        return result

    def check_input(self, text: str) -> GuardResult:
        """User input: injection flagged (blocked if configured); PII redacted if configured."""
        result = self._scan(text, self.config.redact_input_pii, injection=True)
        result.blocked = self.config.block_injection and result.injection_score >= self.config.injection_threshold
        return result

    def check_output(self, text: str) -> GuardResult:
        """Model output: PII redacted if configured (the default)."""
        return self._scan(text, self.config.redact_output_pii, injection=False)

    def check_untrusted(self, text: str) -> GuardResult:
        """A retrieved document or tool result: scanned for injection, never blocked, only flagged."""
        return self._scan(text, self.config.redact_untrusted_pii, injection=True)

    def wrap_untrusted(self, text: str, label: str, nonce: str | None = None) -> tuple[str, GuardResult]:
        """(spotlighted text for the prompt, the scan) of untrusted content."""
        result = self.check_untrusted(text)
        return spotlight(result.text, label, self.config.spotlight_mode, nonce), result

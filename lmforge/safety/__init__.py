"""Safety: prompt-injection detection, spotlighting, PII redaction, and the input/output guard."""

"""PII detection and redaction: emails, phone numbers, payment cards, IBANs, IP addresses, national IDs.

Candidates are found by regular expressions and kept only when they validate, which is what keeps
false positives down: cards pass the Luhn check, IBANs ISO 13616's mod-97 and their country's
format (python-stdnum), IPs parse with `ipaddress`, phone numbers are valid for their region by
Google's libphonenumber rules (the `phonenumbers` port), and national IDs pass their check digits
or issuing rules (python-stdnum: US SSN, Spanish DNI/NIE, Dutch BSN (after its name), French NIR, Indian Aadhaar;
UK National Insurance numbers by HMRC's prefix rules). Overlaps go to the earlier, longer match.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Callable, Iterable

EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]{1,64}@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}\b")
CARD = re.compile(r"(?<![\d-])(?:\d[ -]?){12,18}\d(?![\d-])")
IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b")
IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d.]|\.\d)")
IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
SSN = re.compile(r"\b\d{3}-\d{2}-\d{4}\b")
NINO = re.compile(r"\b[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z] ?\d{2} ?\d{2} ?\d{2} ?[A-D]\b")
NINO_BAD_PREFIX = {"BG", "GB", "KN", "NK", "NT", "TN", "ZZ"}  # HMRC: never issued
DNI = re.compile(r"\b[XYZ]?\d{7,8}-?[A-Z]\b")
# a bare 9-digit number is a Dutch BSN only after its name: 1 in 11 random numbers pass the check
BSN = re.compile(r"(?i:\b(?:bsn|burgerservicenummer|sofinummer)\b)\D{0,20}?(?P<id>\b\d{9}\b)")
NIR_AADHAAR = re.compile(r"\b[12] ?\d{2} ?\d{2} ?\d{2} ?\d{3} ?\d{3} ?\d{2}\b|\b\d{4} \d{4} \d{4}\b")


@dataclass(frozen=True)
class PIIMatch:
    """One detected item: its kind, [start, end) in the text, and the matched text."""

    kind: str
    start: int
    end: int
    text: str


def luhn_valid(number: str) -> bool:
    """The Luhn (mod 10) check of ISO/IEC 7812: double every second digit from the right."""
    digits = [int(c) for c in number if c.isdigit()]
    if len(digits) < 2:
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card_ok(text: str) -> bool:
    digits = re.sub(r"\D", "", text)
    return 13 <= len(digits) <= 19 and luhn_valid(digits) and len(set(digits)) > 1


def _iban_ok(text: str) -> bool:
    from stdnum import iban

    return iban.is_valid(text)


def _ip_ok(text: str) -> bool:
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return False
    return not (ip.version == 6 and text.count(":") < 3)  # "12:30:45"-like times are not addresses


def _nino_ok(text: str) -> bool:
    return text.replace(" ", "")[:2] not in NINO_BAD_PREFIX


def _stdnum(module: str) -> Callable[[str], bool]:
    def check(text: str) -> bool:
        import importlib

        return importlib.import_module(f"stdnum.{module}").is_valid(text)
    return check


def _national_ok(text: str) -> bool:
    compact = text.replace(" ", "")
    if len(compact) == 15:
        return _stdnum("fr.nir")(compact)
    return len(compact) == 12 and _stdnum("in_.aadhaar")(compact)


# kind -> (pattern, validator); order is priority when matches overlap
DETECTORS: dict[str, tuple[re.Pattern, Callable[[str], bool]]] = {
    "EMAIL": (EMAIL, lambda t: True),
    "IBAN": (IBAN, _iban_ok),
    "CREDIT_CARD": (CARD, _card_ok),
    "US_SSN": (SSN, _stdnum("us.ssn")),
    "UK_NINO": (NINO, _nino_ok),
    "ES_DNI": (DNI, lambda t: _stdnum("es.nie" if t[0] in "XYZ" else "es.dni")(t)),
    "NL_BSN": (BSN, _stdnum("nl.bsn")),
    "NATIONAL_ID": (NIR_AADHAAR, _national_ok),
    "IP_ADDRESS": (IPV4, _ip_ok),
    "IPV6_ADDRESS": (IPV6, _ip_ok),
}


def _phones(text: str, region: str) -> Iterable[PIIMatch]:
    import phonenumbers

    for m in phonenumbers.PhoneNumberMatcher(text, region, leniency=phonenumbers.Leniency.VALID):
        yield PIIMatch("PHONE", m.start, m.end, m.raw_string)


def detect(text: str, kinds: Iterable[str] | None = None, region: str = "US") -> list[PIIMatch]:
    """Validated PII in `text`, sorted by position, without overlaps.

    Args:
        text: any string.
        kinds: restrict to these kinds (default: all, see DETECTORS plus "PHONE").
        region: default region for phone numbers written without a +country code.
    """
    if not isinstance(text, str):
        raise TypeError(f"detect takes a str, got {type(text).__name__}")
    wanted = set(kinds) if kinds is not None else set(DETECTORS) | {"PHONE"}
    unknown = wanted - set(DETECTORS) - {"PHONE"}
    if unknown:
        raise ValueError(f"unknown PII kinds {sorted(unknown)}; known: {sorted(DETECTORS) + ['PHONE']}")
    found = []
    for kind, (pattern, ok) in DETECTORS.items():
        if kind in wanted:
            group = "id" if "id" in pattern.groupindex else 0  # the value itself, not its label
            found += [PIIMatch(kind, m.start(group), m.end(group), m.group(group))
                      for m in pattern.finditer(text) if ok(m.group(group))]
    if "PHONE" in wanted:
        found += list(_phones(text, region))
    return _without_overlaps(found)


def _without_overlaps(found: list[PIIMatch]) -> list[PIIMatch]:
    """Keep a match unless a higher-priority (earlier kind, then longer) one already covers part of it."""
    priority = {kind: i for i, kind in enumerate(list(DETECTORS) + ["PHONE"])}
    kept: list[PIIMatch] = []
    for m in sorted(found, key=lambda m: (priority[m.kind], -(m.end - m.start), m.start)):
        if all(m.end <= k.start or m.start >= k.end for k in kept):
            kept.append(m)
    return sorted(kept, key=lambda m: m.start)


def redact(text: str, kinds: Iterable[str] | None = None, region: str = "US",
           placeholder: str = "[{kind}]") -> tuple[str, list[PIIMatch]]:
    """(text with each PII item replaced by a placeholder such as "[EMAIL]", the matches)."""
    matches = detect(text, kinds, region)
    out, last = [], 0
    for m in matches:
        out += [text[last:m.start], placeholder.format(kind=m.kind)]
        last = m.end
    return "".join(out) + text[last:], matches

"""PII: every labeled item found with its kind, no false positives on look-alikes, Luhn by hand."""

from __future__ import annotations

import pytest

from lmforge.safety.pii import detect, luhn_valid, redact

# (text, [(kind, value)]) — written for this test; values are published test numbers, not real people
POSITIVE = [
    ("Mail jane.doe+news@example.co.uk today", [("EMAIL", "jane.doe+news@example.co.uk")]),
    ("Call (415) 555-2671 after 5", [("PHONE", "(415) 555-2671")]),
    ("London office: +44 20 7946 0958.", [("PHONE", "+44 20 7946 0958")]),
    ("Visa 4111 1111 1111 1111 on file", [("CREDIT_CARD", "4111 1111 1111 1111")]),
    ("Amex 3782-822463-10005 ok", [("CREDIT_CARD", "3782-822463-10005")]),
    ("card=5555555555554444;", [("CREDIT_CARD", "5555555555554444")]),
    ("Pay to GB82 WEST 1234 5698 7654 32 please", [("IBAN", "GB82 WEST 1234 5698 7654 32")]),
    ("IBAN DE89370400440532013000.", [("IBAN", "DE89370400440532013000")]),
    ("host 192.168.1.20 is up", [("IP_ADDRESS", "192.168.1.20")]),
    ("v6 2001:db8::ff00:42:8329 answers", [("IPV6_ADDRESS", "2001:db8::ff00:42:8329")]),
    ("SSN 536-22-1234 on the form", [("US_SSN", "536-22-1234")]),
    ("NI number AB 12 34 56 C", [("UK_NINO", "AB 12 34 56 C")]),
    ("DNI 12345678Z y NIE X1234567L", [("ES_DNI", "12345678Z"), ("ES_DNI", "X1234567L")]),
    ("mijn BSN is 111222333", [("NL_BSN", "111222333")]),
    ("Aadhaar 2341 2341 2346", [("NATIONAL_ID", "2341 2341 2346")]),
    ("mail a@b.io and call +1 202-555-0143", [("EMAIL", "a@b.io"), ("PHONE", "+1 202-555-0143")]),
]
NEGATIVE = [
    "Python 3.11.4 was released on 2023-06-06.",
    "Card 4111 1111 1111 1112 fails the check.",          # Luhn fails
    "IBAN GB82 WEST 1234 5698 7654 33 is mistyped.",       # mod-97 fails
    "The address 300.168.1.20 is not an IP.",
    "Meet at 12:30:45 in room 101.",
    "Order number 111222333 shipped.",                    # 9 digits without 'BSN' is not a BSN
    "SSN 000-12-3456 is never issued.",
    "NINO QQ 12 34 56 C is invalid.",                      # Q prefix is never issued
    "Use x = a @ b for matrix multiplication.",
    "Page 123-45-678 of the manual.",
    "Call extension 1234 or room 555.",
    "The value 1e10 and 0x1F are numbers.",
    "See version 1.2.3.4.5 of the spec.",
    "0000 0000 0000 0000 is a placeholder card.",
]


@pytest.mark.parametrize("text,expected", POSITIVE)
def test_true_positives(text, expected):
    assert [(m.kind, m.text) for m in detect(text)] == expected


@pytest.mark.parametrize("text", NEGATIVE)
def test_no_false_positives(text):
    assert detect(text) == []


def test_luhn_by_hand():
    assert luhn_valid("79927398713")  # the textbook example
    for bad in ("79927398710", "79927398711", "79927398712", "79927398714", "1", ""):
        assert not luhn_valid(bad)
    assert luhn_valid("4111-1111-1111-1111") and not luhn_valid("4111-1111-1111-1112")


def test_redact_replaces_spans():
    text, found = redact("Write to bob@example.com or call (415) 555-2671.")
    assert text == "Write to [EMAIL] or call [PHONE]." and len(found) == 2
    assert redact("nothing here")[0] == "nothing here"
    assert redact("x bob@example.com", kinds=["PHONE"])[0] == "x bob@example.com"
    with pytest.raises(ValueError, match="unknown PII kinds"):
        detect("x", kinds=["SHOE_SIZE"])

"""Cleaning: the generated PDF's cleaned text equals its known clean text; every rule switches off."""

from __future__ import annotations

import pytest

from lmforge.data.clean import CleanConfig, clean_pages, is_heading
from lmforge.data.pdf import Page, extract_pdf


def text_of(doc) -> str:
    return "\n\n".join(p.text for p in doc.paragraphs)


def test_cleaned_pdf_equals_known_clean_text(synthetic_pdf, expected_text):
    doc = clean_pages(extract_pdf(synthetic_pdf).pages)
    assert text_of(doc) == expected_text
    assert doc.counts["headers_footers"] == 6  # header + footer line on 3 pages
    assert doc.counts["page_numbers"] == 3
    assert doc.counts["citations"] == 5
    assert doc.counts["hyphenation"] == 3
    assert doc.counts["toc_leaders"] == 3
    assert doc.counts["references"] == 3


def test_paragraph_pages_and_sections(synthetic_pdf):
    doc = clean_pages(extract_pdf(synthetic_pdf).pages)
    spanning = next(p for p in doc.paragraphs if p.text.startswith("Earlier work"))
    assert (spanning.page_start, spanning.page_end) == (1, 2)
    assert spanning.section == "1 Introduction"
    last = doc.paragraphs[-1]
    assert last.page_start == 3 and last.section == "2 Method"


@pytest.mark.parametrize("rule, marker", [
    ("headers_footers", "Journal of Synthetic Tests"),
    ("page_numbers", "Page 2"),
    ("citations", "[12]"),
    ("toc_leaders", "Introduction...."),
    ("references", "On boilerplate"),
    ("hyphenation", "sour"),
])
def test_each_rule_can_be_switched_off(synthetic_pdf, rule, marker):
    pages = extract_pdf(synthetic_pdf).pages
    off = clean_pages(pages, CleanConfig(**{rule: False}))
    assert marker in text_of(off) and off.counts[rule] == 0
    assert marker not in text_of(clean_pages(pages)) or rule == "hyphenation"


def test_hyphenation_off_keeps_the_split_word():
    pages = [Page(1, "A long line of words that ends in a hyphenated sour-\nces word and goes on.")]
    assert "sourc" not in text_of(clean_pages(pages, CleanConfig(hyphenation=False)))
    assert "sources word" in text_of(clean_pages(pages))


def test_ligatures_and_unicode_normalization():
    pages = [Page(1, "The \ufb01rst e\ufb03cient caf\u0065\u0301 uses \u00adsoft hyphens and \uff21.")]
    doc = clean_pages(pages)
    assert text_of(doc) == "The first efficient caf\u00e9 uses soft hyphens and A."
    assert doc.counts["ligatures"] == 2 and doc.counts["unicode"] >= 2
    raw = clean_pages(pages, CleanConfig(ligatures=False, unicode=False))
    assert "\ufb01" in text_of(raw)


def test_citation_patterns_are_removed_and_counted():
    text = ("As shown [3], [3-5] and [1, 4] (Smith et al., 2020) and (Jones and Lee, 2019; Brown, 2021), "
            "the value (about 2020) stays.")
    doc = clean_pages([Page(1, text)])
    assert text_of(doc) == "As shown, and and, the value (about 2020) stays."
    assert doc.counts["citations"] == 5


def test_whitespace_is_repaired():
    doc = clean_pages([Page(1, "Too   many    spaces here , and a tab\there .")])
    assert text_of(doc) == "Too many spaces here, and a tab here."


@pytest.mark.parametrize("line, heading", [
    ("1 Introduction", True), ("2.3 Related Work", True), ("Table of Contents", True),
    ("the end of a sentence.", False), ("callCC(function(k) 1)", False), ("Examples", True),
])
def test_is_heading(line, heading):
    assert is_heading(line) is heading

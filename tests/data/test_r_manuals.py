"""R manuals instruction set: numbered headings start sections, contents lines and short sections are
skipped, the split is seeded and disjoint; the real PDFs parse when r-doc-pdf is installed."""

from __future__ import annotations

import pytest

from lmforge.data.r_manuals import DEFAULT_ROOTS, Section, parse_lines, split, to_alpaca

LINES = ["1.1 The R environment . . . . . . . . . . 1",  # table of contents: dot leaders, page number
         "1.2 Related software 2",
         "1.1 The R environment",
         "R is an integrated suite of software facilities. " * 6,
         "It has an effective data handling facility.",
         "1.2 Too short",
         "tiny",
         "2.3 Generating regular sequences",
         "R has a number of facilities for generating commonly used sequences. " * 4,
         "57.333 55.500 53.600",  # a table row, not a heading
         ]


def test_parse_lines():
    sections = parse_lines(LINES, "An Introduction to R", "R-intro.pdf")
    assert [s.title for s in sections] == ["The R environment", "Generating regular sequences"]
    assert sections[0].source == "R-intro.pdf#1.1" and "data handling" in sections[0].text
    assert sections[1].text.endswith("57.333 55.500 53.600")
    record = to_alpaca(sections[0], max_chars=100)
    assert record["instruction"] == 'Explain "The R environment" from An Introduction to R.'
    assert 50 <= len(record["output"]) <= 100


def test_split_is_seeded_and_disjoint():
    sections = [Section(f"t{i}", "x" * 300, "m", f"s#{i}") for i in range(50)]
    train, test = split(sections, 0.1, seed=3)
    assert len(test) == 5 and len(train) == 45 and not set(train) & set(test)
    assert split(sections, 0.1, seed=3) == (train, test)
    with pytest.raises(ValueError, match="held_out"):
        split(sections, 0.0)


@pytest.mark.skipif(not any((r / "R-intro.pdf").is_file() for r in DEFAULT_ROOTS), reason="r-doc-pdf not installed")
def test_real_manuals():
    from lmforge.data.r_manuals import r_sections

    sections = r_sections()
    assert len(sections) > 200
    assert any(s.title == "The array() function" for s in sections)

"""The Python FAQ parser: real pages from python3.11-doc, plus a small synthetic Sphinx page."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from lmforge.data.python_faq import DEFAULT_ROOTS, FAQPair, faq_pairs, parse_page, split

PAGE = """<html><body><div class="body" role="main">
<section id="toy-faq"><h1>Toy FAQ<a class="headerlink" href="#toy-faq">¶</a></h1>
<nav class="contents"><ul><li><a href="#q1">What is it?</a></li></ul></nav>
<section id="group"><h2>Group</h2>
<section id="q1"><h3>What   is it?<a class="headerlink" href="#q1">¶</a></h3>
<p>It is a
   <em>toy</em>.</p>
<div class="highlight"><pre><span>def f():</span>
    <span>return 1</span>
</pre></div>
<ul><li><p>one</p></li><li><p>two</p></li></ul>
</section>
<section id="q2"><h3>Why?</h3><p>Because.</p></section>
</section></section></div>
<div class="footer">not content</div></body></html>"""


def test_parse_synthetic_page(tmp_path: Path) -> None:
    path = tmp_path / "toy.html"
    path.write_text(PAGE, encoding="utf-8")
    pairs = parse_page(path)
    assert [p.question for p in pairs] == ["What is it?", "Why?"]
    first = pairs[0]
    assert first.section == "Toy FAQ"
    assert first.source == f"{path}#q1"
    assert first.answer == "It is a toy.\n\ndef f():\n    return 1\n\n- one\n\n- two"
    assert "¶" not in first.answer and "not content" not in first.answer


def test_split_is_seeded_and_disjoint() -> None:
    pairs = [FAQPair(f"q{i}", "a", "s", f"x#{i}") for i in range(50)]
    train, test = split(pairs, held_out=0.1, seed=0)
    assert len(test) == 5 and len(train) == 45
    assert not {p.source for p in train} & {p.source for p in test}
    assert split(pairs, 0.1, 0) == (train, test)
    assert split(pairs, 0.1, 1)[1] != test
    with pytest.raises(ValueError, match="held_out"):
        split(pairs, held_out=1.5)


def test_missing_root_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no FAQ pages"):
        faq_pairs(tmp_path)


@pytest.mark.skipif(not any(r.is_dir() for r in DEFAULT_ROOTS), reason="python3.11-doc not installed")
def test_real_python_faq() -> None:
    pairs = faq_pairs()
    assert 170 <= len(pairs) <= 185
    pages = Counter(p.section for p in pairs)
    assert pages["Programming FAQ"] > 60 and pages["General Python FAQ"] > 20
    assert all(p.question and p.answer and "¶" not in p.answer for p in pairs)
    assert all("  " not in p.question for p in pairs)
    default_args = next(p for p in pairs if p.question == "Why are default values shared between objects?")
    assert "def foo(mydict={}):" in default_args.answer  # code blocks are kept with their lines
    assert default_args.source.endswith("programming.html#why-are-default-values-shared-between-objects")

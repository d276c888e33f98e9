"""The Python FAQ as question/answer pairs: a real instruction set that installs offline.

Debian's `python3.11-doc` ships the FAQ as Sphinx HTML (/usr/share/doc/python3.11/html/faq).
Each question is a leaf `<section>` below the page title: its heading is the question and the
section's text (paragraphs, lists, code blocks kept verbatim) is the answer. Parsed with the
standard library's `html.parser`, so nothing beyond the Debian package is needed.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

DEFAULT_ROOTS = (
    Path("/usr/share/doc/python3.11/html/faq"),
    Path("/usr/share/doc/python3/html/faq"),
)
BLOCK_TAGS = {"p", "li", "dt", "dd", "pre", "div", "blockquote", "table", "tr", "ul", "ol", "dl"}
SKIP_PAGES = {"index.html"}


@dataclass(frozen=True)
class FAQPair:
    """One FAQ entry: `section` is the FAQ page title, `source` is `path#anchor`."""

    question: str
    answer: str
    section: str
    source: str


@dataclass
class _Section:
    """A `<section>` of the page while parsing: its heading, own text blocks and children."""

    anchor: str
    level: int = 0
    title: str = ""
    blocks: list[str] = field(default_factory=list)
    children: list["_Section"] = field(default_factory=list)


class _FAQParser(HTMLParser):
    """Builds the section tree of one Sphinx page; skips the table of contents and ¶ links."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.roots: list[_Section] = []
        self.stack: list[_Section] = []
        self.buf: list[str] = []
        self.heading: int | None = None  # level of the heading being read
        self.skip = 0  # depth inside <nav> or a headerlink
        self.pre = 0
        self.bullet = False  # the next text block starts a list item

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        starts_skip = tag == "nav" or (tag == "a" and "headerlink" in (a.get("class") or ""))
        if starts_skip or (self.skip and tag in ("nav", "a")):
            self.skip += 1
        if self.skip:
            return
        if tag == "section":
            self._flush()
            sec = _Section(anchor=a.get("id") or "")
            (self.stack[-1].children if self.stack else self.roots).append(sec)
            self.stack.append(sec)
        elif re.fullmatch(r"h[1-6]", tag) and self.stack:
            self._flush()
            self.heading = int(tag[1])
        elif tag in BLOCK_TAGS:
            self._flush()
            self.pre += tag == "pre"
            self.bullet = self.bullet or tag == "li"
        elif tag == "br":
            self.buf.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if self.skip:
            self.skip -= tag in ("nav", "a")
            return
        if tag == "section" and self.stack:
            self._flush()
            self.stack.pop()
        elif self.heading is not None and tag == f"h{self.heading}":
            self.stack[-1].level = self.heading
            self.stack[-1].title = _clean(" ".join(self.buf))
            self.buf, self.heading = [], None
        elif tag in BLOCK_TAGS:
            self._flush()
            self.pre -= tag == "pre"

    def handle_data(self, data: str) -> None:
        if not self.skip and self.stack:
            self.buf.append(data)

    def _flush(self) -> None:
        """End the current text block and store it in the innermost section."""
        if self.heading is not None:
            return
        text = "".join(self.buf)
        self.buf = []
        text = text.strip("\n") if self.pre else _clean(text)
        if text.strip() and self.stack:
            self.stack[-1].blocks.append(("- " if self.bullet else "") + text.rstrip())
            self.bullet = False


def _clean(text: str) -> str:
    """Collapse runs of whitespace to one space (prose only; code blocks are kept as is)."""
    return re.sub(r"\s+", " ", text).strip()


def _leaves(sec: _Section) -> list[_Section]:
    """Sections without sub-sections: the questions."""
    if not sec.children:
        return [sec]
    return [leaf for child in sec.children for leaf in _leaves(child)]


def parse_page(path: Path) -> list[FAQPair]:
    """The question/answer pairs of one FAQ HTML page, in page order."""
    parser = _FAQParser()
    parser.feed(path.read_text(encoding="utf-8"))
    pairs = []
    for page in parser.roots:
        questions = _leaves(page) if page.children else []
        for sec in questions:
            answer = "\n\n".join(sec.blocks).strip()
            if sec.title and answer:
                pairs.append(FAQPair(sec.title, answer, page.title, f"{path}#{sec.anchor}"))
    return pairs


def find_root() -> Path:
    """The installed FAQ folder, or a ValueError saying which package provides it."""
    for root in DEFAULT_ROOTS:
        if root.is_dir() and any(root.glob("*.html")):
            return root
    raise ValueError(
        f"Python FAQ HTML not found in {', '.join(map(str, DEFAULT_ROOTS))}; "
        "install it with `apt-get install python3.11-doc` or pass root=<folder with faq/*.html>"
    )


def faq_pairs(root: Path | None = None) -> list[FAQPair]:
    """Every question/answer pair of the Python FAQ (about 176), sorted by page then order."""
    root = Path(root) if root is not None else find_root()
    pages = sorted(p for p in root.glob("*.html") if p.name not in SKIP_PAGES)
    if not pages:
        raise ValueError(f"no FAQ pages (*.html) in {root}")
    return [pair for page in pages for pair in parse_page(page)]


def split(pairs: list[FAQPair], held_out: float = 0.1, seed: int = 0) -> tuple[list[FAQPair], list[FAQPair]]:
    """(train, held-out) by a seeded shuffle; at least one pair is held out when 0 < held_out."""
    if not 0.0 <= held_out < 1.0:
        raise ValueError(f"held_out={held_out} must be in [0, 1)")
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_test = max(1, round(held_out * len(pairs))) if held_out > 0 and len(pairs) > 1 else 0
    test_idx = set(order[:n_test])
    train = [p for i, p in enumerate(pairs) if i not in test_idx]
    test = [p for i, p in enumerate(pairs) if i in test_idx]
    return train, test


def to_alpaca(pair: FAQPair) -> dict[str, str]:
    """An Alpaca record (instruction, input, output) for SFT."""
    return {"instruction": pair.question, "input": "", "output": pair.answer}

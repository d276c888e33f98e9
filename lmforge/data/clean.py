"""Clean extracted pages into paragraphs: one switchable, counted rule per kind of noise.

Rules, in the order they run: `unicode` (NFKC, soft hyphens, zero-width marks), `ligatures`
(ﬁ -> fi, counted apart from the rest of NFKC), `headers_footers` (edge lines repeated across
pages, or carrying the running page number), `page_numbers`, `toc_leaders` (table-of-contents
lines with leader dots), `references` (a References/Bibliography section up to the next
heading), `hyphenation` (words split across line breaks), `citations` ([12], [3-5],
(Smith et al., 2020)) and `whitespace`. Lines are then reflowed into paragraphs; headings
become their own paragraphs and name the section of the text under them.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field, fields

from lmforge.data.pdf import Page

LIGATURES = {"\ufb00": "ff", "\ufb01": "fi", "\ufb02": "fl", "\ufb03": "ffi", "\ufb04": "ffl", "\ufb05": "st",
             "\ufb06": "st"}
INVISIBLE = re.compile("[\u00ad\u200b\u200c\u200d\u2060\ufeff]")
PDFIUM_HYPHEN = "\ufffe"  # PDFium's mark for a hyphen it removed at a line break
PAGE_NUMBER = re.compile(r"^[\W_]*(?:page\s+)?(\d{1,4}|[ivxlcdm]{1,7})(?:\s*(?:of|/)\s*\d{1,4})?[\W_]*$", re.I)
EDGE_NUMBER = re.compile(r"^(\d{1,4})\s+\S|\S\s+(\d{1,4})$")
TOC_LEADER = re.compile(r"(?:\.\s?){4,}\s*\S{0,4}\d+\s*$|\.{4,}")
REFERENCES = re.compile(r"^(?:\d+(?:\.\d+)*\.?\s+)?(?:references|bibliography|works cited|literature cited)$", re.I)
NUMBERED_HEADING = re.compile(r"^(?:\d+(?:\.\d+)*\.?|chapter \d+:?|appendix [a-z]:?)\s+[A-Z]\S*(?:\s+\S+){0,10}$",
                              re.I)
HYPHEN_BREAK = re.compile(r"([A-Za-z])-\n([a-z])")
_NAME = r"[A-Z][A-Za-z'’\-]+"
_AUTHOR_YEAR = rf"{_NAME}(?:\s+(?:et al\.?|and|&)(?:\s+{_NAME})?)?,?\s+\d{{4}}[a-z]?"
CITATION = re.compile(rf"\s?(?:\[\d+(?:\s*[-–,]\s*\d+)*\]|\((?:see\s+)?{_AUTHOR_YEAR}(?:\s*;\s*{_AUTHOR_YEAR})*\))")
SPACE_BEFORE_PUNCT = re.compile(r"[ \t]+([.,;:!?)])(?=\s|$)")
MULTI_SPACE = re.compile(r"[ \t\u00a0]{2,}|[\t\u00a0]")
TERMINAL = (".", "!", "?", ":")


@dataclass(frozen=True)
class CleanConfig:
    """Which rules run; each is on by default and counted in `CleanDoc.counts`."""

    unicode: bool = True
    ligatures: bool = True
    headers_footers: bool = True
    page_numbers: bool = True
    toc_leaders: bool = True
    references: bool = True
    hyphenation: bool = True
    citations: bool = True
    whitespace: bool = True
    edge_lines: int = 2  # lines at each end of a page that may be header or footer
    min_repeat: float = 0.3  # share of pages an edge line must repeat on to be a header

    @classmethod
    def rules(cls) -> list[str]:
        """Names of the switchable rules, in the order they run."""
        return [f.name for f in fields(cls) if f.type in (bool, "bool")]


@dataclass
class Paragraph:
    """A cleaned paragraph, the pages it spans, its section, and its source line lengths."""

    text: str
    page_start: int
    page_end: int
    section: str = ""
    line_lengths: list[int] = field(default_factory=list)
    heading: bool = False


@dataclass
class CleanDoc:
    """Cleaned paragraphs of one document and how often each rule fired."""

    paragraphs: list[Paragraph]
    counts: dict[str, int]


def normalize_unicode(text: str, config: CleanConfig, counts: Counter) -> str:
    """Replace ligatures, drop invisible marks and apply NFKC, counting changed characters."""
    if config.hyphenation:
        counts["hyphenation"] += text.count(PDFIUM_HYPHEN)
        text = text.replace(PDFIUM_HYPHEN, "")
    if config.ligatures:
        for lig, plain in LIGATURES.items():
            if lig in text:
                counts["ligatures"] += text.count(lig)
                text = text.replace(lig, plain)
    if config.unicode:
        text, n = INVISIBLE.subn("", text)
        normal = unicodedata.normalize("NFKC", text)
        if normal != text:
            n += sum(a != b for a, b in zip(normal, text)) + abs(len(normal) - len(text))
        counts["unicode"] += n
        text = normal
    return text


def _edge_indices(lines: list[str], k: int) -> list[int]:
    """Indices of the first and last `k` non-empty lines."""
    filled = [i for i, line in enumerate(lines) if line.strip()]
    return sorted(set(filled[:k] + filled[-k:]))


def _edge_key(line: str) -> str:
    return re.sub(r"\d+", "#", line.strip().lower())


def _page_offset(pages: list[tuple[int, list[str]]], k: int) -> int | None:
    """The dominant (printed number - page index) of numbers at page edges, if it is common."""
    offsets: Counter = Counter()
    for number, lines in pages:
        seen = set()
        for i in _edge_indices(lines, k):
            m = EDGE_NUMBER.search(lines[i].strip()) or PAGE_NUMBER.match(lines[i].strip())
            for g in (m.groups() if m else ()):
                if g and g.isdigit():
                    seen.add(int(g) - number)
        offsets.update(seen)
    if not offsets:
        return None
    offset, count = offsets.most_common(1)[0]
    return offset if count >= max(2, 0.3 * len(pages)) else None


def strip_edges(pages: list[tuple[int, list[str]]], config: CleanConfig, counts: Counter) -> None:
    """Drop running headers, footers and page numbers from the edges of each page, in place."""
    k = config.edge_lines
    repeats = Counter(key for _, lines in pages for key in {_edge_key(lines[i]) for i in _edge_indices(lines, k)})
    min_pages = max(3, config.min_repeat * len(pages))
    offset = _page_offset(pages, k) if config.headers_footers else None
    for number, lines in pages:
        for i in _edge_indices(lines, k):
            line = lines[i].strip()
            if config.page_numbers and PAGE_NUMBER.match(line):
                counts["page_numbers"] += 1
            elif config.headers_footers and not PAGE_NUMBER.match(line) and (repeats[_edge_key(line)] >= min_pages
                                             or _has_page_number(line, number, offset)):
                counts["headers_footers"] += 1
            else:
                continue
            lines[i] = None  # dropped, not blanked: a blank line would end a paragraph


def _has_page_number(line: str, number: int, offset: int | None) -> bool:
    """Whether `line` starts or ends with this page's printed number (a numbered running header)."""
    if offset is None:
        return False
    m = EDGE_NUMBER.search(line)
    return bool(m) and any(g is not None and int(g) - number == offset for g in m.groups())


def is_heading(line: str) -> bool:
    """A short line that names a section: numbered, or a capitalized phrase without final stop."""
    line = line.strip()
    if not 2 <= len(line) <= 80 or line.endswith((".", ",", ";", ":")) or not line[0].isalnum():
        return False
    if NUMBERED_HEADING.match(line):
        return True
    words = line.split()
    return len(words) <= 6 and words[0][0].isupper() and all(
        w[0].isupper() or (w.isalpha() and len(w) <= 3 and w.islower()) for w in words if w[0].isalpha()
    ) and all(w.replace("-", "").replace("(", "").replace(")", "").isalpha() for w in words)


def drop_toc_and_references(lines: list[str], config: CleanConfig, counts: Counter) -> list[str]:
    """Remove table-of-contents leader lines and reference sections (up to the next heading)."""
    out: list[str] = []
    in_refs = False
    for line in lines:
        stripped = line.strip()
        if config.references and REFERENCES.match(stripped):
            in_refs = True
            counts["references"] += 1
            continue
        if in_refs:
            if stripped and is_heading(stripped) and not TOC_LEADER.search(stripped):
                in_refs = False
            else:
                counts["references"] += bool(stripped)
                continue
        if config.toc_leaders and TOC_LEADER.search(stripped):
            counts["toc_leaders"] += 1
            continue
        out.append(line)
    return out


def clean_inline(text: str, config: CleanConfig, counts: Counter) -> str:
    """Remove citation markers and repair whitespace inside one paragraph."""
    if config.citations:
        text, n = CITATION.subn("", text)
        counts["citations"] += n
    if config.whitespace:
        fixed = SPACE_BEFORE_PUNCT.sub(r"\1", MULTI_SPACE.sub(" ", text)).strip()
        counts["whitespace"] += fixed != text
        text = fixed
    return text


def clean_pages(pages: list[Page], config: CleanConfig = CleanConfig()) -> CleanDoc:
    """Apply every enabled rule to a document's pages and reflow them into paragraphs."""
    counts: Counter = Counter({rule: 0 for rule in CleanConfig.rules()})
    split = [(p.number, normalize_unicode(p.text, config, counts).split("\n")) for p in pages]
    if config.headers_footers or config.page_numbers:
        strip_edges(split, config, counts)
    tagged = [(number, line.rstrip()) for number, lines in split for line in lines if line is not None]
    kept = drop_toc_and_references([line for _, line in tagged], config, counts)
    tagged = _align(tagged, kept)
    paragraphs = reflow(tagged, config, counts)
    for para in paragraphs:
        para.text = clean_inline(para.text, config, counts)
    return CleanDoc([p for p in paragraphs if p.text], dict(counts))


def _align(tagged: list[tuple[int, str]], kept: list[str]) -> list[tuple[int, str]]:
    """Page numbers for the lines that survived `drop_toc_and_references` (an order-kept subset)."""
    out, j = [], 0
    for number, line in tagged:
        if j < len(kept) and kept[j] == line:
            out.append((number, line))
            j += 1
    return out


def reflow(lines: list[tuple[int, str]], config: CleanConfig, counts: Counter) -> list[Paragraph]:
    """Join lines into paragraphs: break at blank lines, headings and short sentence-final lines."""
    widths = sorted(len(line) for _, line in lines if line.strip())
    full = widths[int(0.9 * (len(widths) - 1))] if widths else 0
    paragraphs: list[Paragraph] = []
    current: Paragraph | None = None
    section = ""
    for number, line in lines:
        text = line.strip()
        if not text:
            if current and current.page_end == number:
                current = None  # a blank line inside a page ends the paragraph
            continue
        if is_heading(text) and (current is None or current.text.endswith(TERMINAL)):
            section = text
            paragraphs.append(Paragraph(text, number, number, section, [len(text)], heading=True))
            current = None
            continue
        if current is not None and not _continues(current, text, number):
            current = None
        if current is None:
            current = Paragraph(text, number, number, section, [len(text)])
            paragraphs.append(current)
        else:
            current.text = _join(current.text, text, config, counts)
            current.page_end = number
            current.line_lengths.append(len(text))
        if text.endswith(TERMINAL) and len(text) < 0.8 * full:
            current = None
    return paragraphs


def _continues(current: Paragraph, text: str, number: int) -> bool:
    """Whether `text` goes on the open paragraph (across a page break only mid-sentence)."""
    if current.page_end == number:
        return True
    return not current.text.endswith(TERMINAL) and text[:1].islower()


def _join(previous: str, line: str, config: CleanConfig, counts: Counter) -> str:
    """Append a line to a paragraph, undoing a hyphenated line break when the rule is on."""
    if config.hyphenation and HYPHEN_BREAK.search(previous[-1:] and previous[-2:] + "\n" + line[:1]):
        counts["hyphenation"] += 1
        return previous[:-1] + line
    return previous + " " + line

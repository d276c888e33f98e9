"""Chunk a cleaned document by tokens of the model's tokenizer, at paragraph and sentence boundaries.

The text is cut into sentences (sentences longer than the limit are cut at words, words
longer than it at characters). Sentences are packed greedily up to `max_tokens`; when a
chunk is full, it is cut at the last paragraph boundary instead if that keeps it at least
`min_fill` full. The next chunk starts with the longest run of whole trailing sentences of the
previous chunk that fits in `overlap_tokens`. Every limit is checked by encoding the final
text, so a chunk never exceeds `max_tokens` even where a tokenizer merges across a join.
Chunks never cross a heading or a garbage paragraph, so each is one slice
``doc_text[char_start:char_end]`` of the cleaned document.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol, Sequence

SENTENCE_END = re.compile(r"(?<=[.!?])[\"”’)\]]*\s+(?=[A-Z0-9\"“‘(\[])")
WORD = re.compile(r"\S+")


class TokenizerLike(Protocol):
    """Anything that turns text into token ids (lmforge's Tokenizer, a wrapped `tokenizers` one)."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]: ...


@dataclass(frozen=True)
class ChunkConfig:
    """Chunk size and overlap in tokens, and how full a chunk must be to end at a paragraph."""

    max_tokens: int = 256
    overlap_tokens: int = 32
    min_fill: float = 0.5

    def __post_init__(self) -> None:
        if self.max_tokens < 8:
            raise ValueError(f"max_tokens must be >= 8, got {self.max_tokens}")
        if not 0 <= self.overlap_tokens < self.max_tokens // 2 + 1:
            raise ValueError(f"overlap_tokens must be in [0, max_tokens/2], got {self.overlap_tokens} "
                             f"for max_tokens={self.max_tokens}")


@dataclass
class Span:
    """A paragraph of the document text: [start, end) offsets, pages, section, whether to chunk it."""

    start: int
    end: int
    page_start: int
    page_end: int
    section: str = ""
    keep: bool = True
    boundary: bool = False  # a heading: starts a new run of chunks


@dataclass
class Unit:
    """A sentence (or a piece of one) with its offsets, paragraph index and token count."""

    start: int
    end: int
    para: int
    tokens: int


class Counter:
    """Counts tokens of text slices with one tokenizer."""

    def __init__(self, tokenizer: TokenizerLike, text: str):
        self.tokenizer, self.text = tokenizer, text

    def __call__(self, start: int, end: int) -> int:
        return len(self.tokenizer.encode(self.text[start:end], add_special_tokens=False))


def sentence_units(text: str, span: Span, para: int, count: Counter, max_tokens: int) -> list[Unit]:
    """Sentences of one paragraph, each cut further until it fits in `max_tokens`."""
    segment = text[span.start:span.end]
    cuts = [0] + [m.end() for m in SENTENCE_END.finditer(segment)] + [len(segment)]
    units = []
    for a, b in zip(cuts, cuts[1:]):
        start, end = span.start + a, span.start + len(segment[:b].rstrip())
        if end > start:
            units.extend(_fit(start, end, para, count, max_tokens))
    return units


def _fit(start: int, end: int, para: int, count: Counter, max_tokens: int) -> list[Unit]:
    """[start, end) as units of at most `max_tokens`, cut at words, else at characters."""
    n = count(start, end)
    if n <= max_tokens:
        return [Unit(start, end, para, n)]
    words = [(start + m.start(), start + m.end()) for m in WORD.finditer(count.text[start:end])]
    if len(words) <= 1:
        return _cut_chars(start, end, para, count, max_tokens)
    half = words[len(words) // 2][0]  # bisect at a word boundary: O(log n) encodes per level
    return _fit(start, _rstrip(count.text, start, half), para, count, max_tokens) + \
        _fit(half, end, para, count, max_tokens)


def _rstrip(text: str, start: int, end: int) -> int:
    while end > start and text[end - 1].isspace():
        end -= 1
    return end


def _cut_chars(start: int, end: int, para: int, count: Counter, max_tokens: int) -> list[Unit]:
    """Cut one long word into the longest character prefixes that fit."""
    units = []
    while start < end:
        lo, hi = start + 1, end
        while lo < hi:  # largest prefix end with count <= max_tokens
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if count(start, mid) <= max_tokens else (lo, mid - 1)
        units.append(Unit(start, lo, para, count(start, lo)))
        start = lo
    return units


def runs(spans: Sequence[Span]) -> list[list[int]]:
    """Indices of kept paragraphs grouped into runs broken by headings and dropped paragraphs."""
    groups: list[list[int]] = [[]]
    for i, span in enumerate(spans):
        if span.boundary or not span.keep:
            groups.append([])
        if span.keep:
            groups[-1].append(i)
    return [g for g in groups if g]


def _pack_end(units: list[Unit], a: int, count: Counter, config: ChunkConfig) -> int:
    """End index (exclusive) of the chunk that starts at unit `a`."""
    b, total = a, 0
    while b < len(units) and total + units[b].tokens <= config.max_tokens:
        total += units[b].tokens
        b += 1
    b = max(b, a + 1)
    if b < len(units):  # full: prefer to end at a paragraph boundary
        filled = sum(u.tokens for u in units[a:b])
        for i in range(b - 1, a, -1):
            filled -= units[i].tokens
            if units[i].para != units[i - 1].para:
                if filled >= config.min_fill * config.max_tokens:
                    b = i
                break
    while b - a > 1 and count(units[a].start, units[b - 1].end) > config.max_tokens:
        b -= 1
    return b


def _overlap_start(units: list[Unit], a: int, b: int, count: Counter, config: ChunkConfig) -> int:
    """First unit of the next chunk: the longest tail of [a, b) within `overlap_tokens`."""
    s = b
    while s - 1 > a and count(units[s - 1].start, units[b - 1].end) <= config.overlap_tokens:
        s -= 1
    return s


def chunk_document(text: str, spans: Sequence[Span], tokenizer: TokenizerLike,
                   config: ChunkConfig = ChunkConfig()) -> list[dict]:
    """Chunks of `text` as dicts: text, char offsets, pages, section, token count."""
    count = Counter(tokenizer, text)
    chunks = []
    for group in runs(spans):
        units = [u for i in group for u in sentence_units(text, spans[i], i, count, config.max_tokens)]
        a = 0
        while a < len(units):
            b = _pack_end(units, a, count, config)
            first, last = spans[units[a].para], spans[units[b - 1].para]
            start, end = units[a].start, units[b - 1].end
            chunks.append({"text": text[start:end], "char_start": start, "char_end": end,
                           "page_start": first.page_start, "page_end": last.page_end,
                           "section": first.section, "n_tokens": count(start, end)})
            if b >= len(units):
                break
            a = _overlap_start(units, a, b, count, config)
    return chunks

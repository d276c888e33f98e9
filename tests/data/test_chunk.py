"""Chunking: never over the token limit, overlaps as configured, offsets map back, boundaries respected."""

from __future__ import annotations

import random

import pytest

from lmforge.data.chunk import ChunkConfig, Span, chunk_document

WORDS = "data model token text page chunk cleaning layer source value result method section".split()


def make_doc(rng: random.Random, n_paras: int = 12) -> tuple[str, list[Span]]:
    paras = []
    for _ in range(n_paras):
        sents = []
        for _ in range(rng.randint(1, 6)):
            words = [rng.choice(WORDS) for _ in range(rng.randint(3, 25))]
            sents.append(" ".join(words).capitalize() + rng.choice([".", "!", "?"]))
        paras.append(" ".join(sents))
    spans, offset = [], 0
    for i, p in enumerate(paras):
        spans.append(Span(offset, offset + len(p), page_start=1 + i // 4, page_end=1 + i // 4, section=f"S{i // 6}"))
        offset += len(p) + 2
    return "\n\n".join(paras), spans


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("max_tokens, overlap", [(16, 0), (32, 8), (64, 16), (100, 50)])
def test_limits_overlap_and_offsets(word_tokenizer, seed, max_tokens, overlap):
    text, spans = make_doc(random.Random(seed))
    chunks = chunk_document(text, spans, word_tokenizer, ChunkConfig(max_tokens=max_tokens, overlap_tokens=overlap))
    assert chunks
    count = lambda s: len(word_tokenizer.encode(s))  # noqa: E731
    for c in chunks:
        assert text[c["char_start"]:c["char_end"]] == c["text"]
        assert count(c["text"]) == c["n_tokens"] <= max_tokens
    covered = set()
    for a, b in zip(chunks, chunks[1:]):
        shared = max(0, a["char_end"] - b["char_start"])
        if shared:  # the overlap is a tail of `a` and a head of `b`, within the configured tokens
            assert a["text"][-shared:] == b["text"][:shared]
            assert count(b["text"][:shared]) <= overlap
        else:
            assert b["char_start"] >= a["char_end"]
    for c in chunks:
        covered.update(range(c["char_start"], c["char_end"]))
    for s in spans:  # every non-space character of every paragraph is in some chunk
        assert all(i in covered for i in range(s.start, s.end) if not text[i].isspace())


def test_overlap_is_used_when_sentences_are_short(word_tokenizer):
    text = " ".join(f"Sentence number {i} is here." for i in range(60))  # 6 tokens a sentence
    spans = [Span(0, len(text), 1, 1)]
    chunks = chunk_document(text, spans, word_tokenizer, ChunkConfig(max_tokens=30, overlap_tokens=12))
    for a, b in zip(chunks, chunks[1:]):
        shared = a["char_end"] - b["char_start"]
        assert shared > 0 and len(word_tokenizer.encode(b["text"][:shared])) == 12  # two whole sentences


def test_chunks_end_at_sentence_boundaries(word_tokenizer):
    text, spans = make_doc(random.Random(1))
    for c in chunk_document(text, spans, word_tokenizer, ChunkConfig(max_tokens=64, overlap_tokens=8)):
        assert c["text"][-1] in ".!?" and c["text"][0].isupper()


def test_long_sentence_and_long_word_are_split(word_tokenizer):
    text = " ".join(["word"] * 100) + " " + "x" * 50 + "."
    chunks = chunk_document(text, [Span(0, len(text), 1, 1)], word_tokenizer, ChunkConfig(max_tokens=10,
                                                                                          overlap_tokens=0))
    assert all(c["n_tokens"] <= 10 for c in chunks)
    assert "".join(c["text"].replace(" ", "") for c in chunks) == text.replace(" ", "")


def test_garbage_and_headings_break_chunks_and_metadata(word_tokenizer):
    paras = ["Intro", "First part of the text. It has two sentences.", "%%%% junk", "Second part is here.",
             "Methods", "Third part."]
    spans, offset = [], 0
    for i, p in enumerate(paras):
        spans.append(Span(offset, offset + len(p), i + 1, i + 1, section="Intro" if i < 4 else "Methods",
                          keep=p != "%%%% junk", boundary=p in ("Intro", "Methods")))
        offset += len(p) + 2
    text = "\n\n".join(paras)
    chunks = chunk_document(text, spans, word_tokenizer, ChunkConfig(max_tokens=200, overlap_tokens=0))
    assert [c["text"] for c in chunks] == ["Intro\n\nFirst part of the text. It has two sentences.",
                                           "Second part is here.", "Methods\n\nThird part."]
    assert [(c["page_start"], c["page_end"], c["section"]) for c in chunks] == [
        (1, 2, "Intro"), (4, 4, "Intro"), (5, 6, "Methods")]


def test_paragraph_boundary_is_preferred(word_tokenizer):
    p1 = "Alpha beta gamma delta. Epsilon zeta eta theta."  # 10 tokens
    p2 = "One two three four five six. Seven eight nine ten eleven."  # 13 tokens
    text = p1 + "\n\n" + p2
    spans = [Span(0, len(p1), 1, 1), Span(len(p1) + 2, len(text), 1, 1)]
    chunks = chunk_document(text, spans, word_tokenizer, ChunkConfig(max_tokens=18, overlap_tokens=0, min_fill=0.5))
    assert chunks[0]["text"] == p1


@pytest.mark.parametrize("kwargs", [{"max_tokens": 4}, {"max_tokens": 64, "overlap_tokens": 40}])
def test_bad_config_is_rejected(kwargs):
    with pytest.raises(ValueError):
        ChunkConfig(**kwargs)

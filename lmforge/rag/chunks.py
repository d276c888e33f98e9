"""What `lmforge rag index PATH` reads: the ingest stage's chunks.jsonl, or folders of text files.

A chunks.jsonl (docs/ingest.md: id, source, text, char_start, char_end, page_start, page_end,
section, n_tokens) is taken as is. Plain-text and Markdown files are cut into paragraphs and
chunked by `lmforge.data.chunk` with the embedder's own tokenizer, so no chunk is longer than the
256 tokens all-MiniLM-L6-v2 reads. Every file is read and checked before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TEXT_SUFFIXES = (".txt", ".md", ".rst")
HEADING = re.compile(r"^(#{1,6}\s|\S.*\n[=\-~^]{3,}\s*$)")


@dataclass
class Chunk:
    """One retrievable passage: a stable id, its text, where it came from, and filterable metadata."""

    id: str
    text: str
    source: str = ""
    section: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise ValueError(f"a chunk needs a non-empty string id, got {self.id!r}")
        if not isinstance(self.text, str):
            raise TypeError(f"chunk {self.id}: text must be a str, got {type(self.text).__name__}")

    def flat_metadata(self) -> dict[str, str | int | float | bool]:
        """Metadata a vector store can filter on: scalars only, with source and section."""
        flat = {k: v for k, v in self.metadata.items() if isinstance(v, (str, int, float, bool))}
        return {**flat, "source": self.source, "section": self.section}


def read_chunks_jsonl(path: str | Path) -> list[Chunk]:
    """Chunks of an ingest chunks.jsonl; a bad line is a ValueError naming file and line."""
    path = Path(path)
    chunks = []
    for number, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            extra = {k: v for k, v in record.items() if k not in ("id", "text", "source", "section")}
            chunks.append(Chunk(str(record["id"]), record["text"], str(record.get("source", "")),
                                str(record.get("section") or ""), extra))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}:{number}: not a chunk record ({err}); expected JSON with 'id' and 'text' "
                             "as `lmforge ingest` writes") from None
    return chunks


def _read_text(path: Path) -> str:
    """A file's UTF-8 text, or a ValueError that names the file and the fix."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 (byte {err.start}: {err.reason}); convert it, e.g. "
                         f"`iconv -f latin1 -t utf-8`, or leave it out (--skip-bad)") from None


def paragraph_spans(text: str):
    """lmforge.data.chunk Spans, one per blank-line paragraph; a heading names the section of what follows."""
    from lmforge.data.chunk import Span

    spans, section = [], ""
    for match in re.finditer(r"\S(?:.|\n(?!\s*\n))*", text):
        para = match.group(0)
        is_heading = bool(HEADING.match(para)) and len(para) < 200
        if is_heading:
            section = para.lstrip("#").splitlines()[0].strip()
        spans.append(Span(match.start(), match.end(), 0, 0, section, keep=not is_heading, boundary=is_heading))
    return spans


def chunk_text_file(path: Path, tokenizer, max_tokens: int = 200, overlap_tokens: int = 32) -> list[Chunk]:
    """Chunks of one UTF-8 text file; ids are content hashes, so re-indexing upserts in place."""
    from lmforge.data.chunk import ChunkConfig, chunk_document

    text = _read_text(path)
    out = []
    for piece in chunk_document(text, paragraph_spans(text), tokenizer, ChunkConfig(max_tokens, overlap_tokens)):
        digest = hashlib.sha256(f"{path}\0{piece['char_start']}\0{piece['text']}".encode()).hexdigest()[:16]
        meta = {k: piece[k] for k in ("char_start", "char_end", "n_tokens")}
        out.append(Chunk(digest, piece["text"], str(path), piece["section"], meta))
    return out


def find_inputs(path: str | Path) -> list[Path]:
    """chunks.jsonl files and text files under `path` (a file or a folder), sorted."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path} does not exist; pass a chunks.jsonl, a text file or a folder of them")
    if path.is_file():
        return [path]
    files = [p for p in sorted(path.rglob("*")) if p.is_file()
             and (p.name.endswith(".jsonl") or p.suffix.lower() in TEXT_SUFFIXES)]
    jsonl = [p for p in files if p.name == "chunks.jsonl"]
    return jsonl or files  # an ingest output folder: its chunks, not its text/ copies


def load_corpus(path: str | Path, tokenizer=None, skip_bad: bool = False,
                max_tokens: int = 200) -> tuple[list[Chunk], dict[str, str]]:
    """(chunks, {file: reason skipped}) from a path; unreadable files raise unless `skip_bad`."""
    chunks: list[Chunk] = []
    skipped: dict[str, str] = {}
    for file in find_inputs(path):
        try:
            if file.name.endswith(".jsonl"):
                chunks += read_chunks_jsonl(file)
            else:
                tokenizer = tokenizer or embedder_tokenizer()
                chunks += chunk_text_file(file, tokenizer, max_tokens=max_tokens)
        except ValueError as err:
            if not skip_bad:
                raise
            skipped[str(file)] = str(err)
    return dedupe_ids(chunks), skipped


def dedupe_ids(chunks: list[Chunk]) -> list[Chunk]:
    """The last chunk for each id (as an upsert would keep it), in first-seen order."""
    by_id: dict[str, Chunk] = {}
    for chunk in chunks:
        by_id[chunk.id] = chunk
    return list(by_id.values())


class EmbedderTokenizer:
    """all-MiniLM-L6-v2's tokenizer.json without its padding and truncation (they would fake the counts)."""

    def __init__(self):
        from tokenizers import Tokenizer

        from lmforge.rag.embed import default_model_dir

        self._tok = Tokenizer.from_file(str(default_model_dir() / "tokenizer.json"))
        self._tok.no_padding()
        self._tok.no_truncation()

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids


def embedder_tokenizer() -> EmbedderTokenizer:
    """The embedder's own tokenizer, so chunk limits match what the embedder reads."""
    return EmbedderTokenizer()

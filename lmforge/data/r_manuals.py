"""The R manuals as an instruction set: section title -> section text, a second SFT task that installs
offline (Debian's r-doc-pdf: /usr/share/R/doc/manual/*.pdf), used to measure forgetting of the Python
FAQ in continual learning (bench/bench_continual.py).

Text comes from data/pdf.py (the PDF's text layer); each page's first line is the running header and
is dropped; a section starts at a numbered heading line (`3.2 Changing the length of an object`), so
table-of-contents lines (dot leaders, a trailing page number) and sections with little text are skipped.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

from lmforge.atomic import atomic_write_jsonl

DEFAULT_ROOTS = (Path("/usr/share/R/doc/manual"), Path("/usr/share/doc/r-doc-pdf/manual"))
MANUALS = {"R-intro": "An Introduction to R", "R-data": "R Data Import/Export",
           "R-lang": "R Language Definition", "R-FAQ": "R FAQ"}
HEADING = re.compile(r"^(\d{1,2}(?:\.\d{1,2})+) (?=.*[A-Za-z]{3})([A-Z\"'‘“(\w].{2,78})$")
TOC_LINE = re.compile(r"(\.\s?){3,}\s*\d+$|\s\d+$")


@dataclass(frozen=True)
class Section:
    """One numbered section of a manual: `source` is `file#number`."""

    title: str
    text: str
    manual: str
    source: str


def find_root() -> Path:
    for root in DEFAULT_ROOTS:
        if all((root / f"{name}.pdf").is_file() for name in MANUALS):
            return root
    raise ValueError(f"the R manuals are not in {[str(r) for r in DEFAULT_ROOTS]}; install Debian's r-doc-pdf "
                     "(apt-get install r-doc-pdf) or pass root=")


def parse_lines(lines: list[str], manual: str, source: str, min_chars: int = 200) -> list[Section]:
    """Sections of one manual's body lines (headers already dropped)."""
    sections, title, number, body = [], None, None, []

    def close() -> None:
        text = "\n".join(body).strip()
        if title is not None and len(text) >= min_chars:
            sections.append(Section(title, text, manual, f"{source}#{number}"))

    for line in lines:
        m = HEADING.match(line.strip())
        if m and not TOC_LINE.search(line.strip()):
            close()
            number, title, body = m.group(1), m.group(2).strip(), []
        elif title is not None:
            body.append(line.rstrip())
    close()
    return sections


def manual_sections(path: Path, manual: str) -> list[Section]:
    from lmforge.data.pdf import ExtractConfig, extract_pdf

    result = extract_pdf(path, ExtractConfig(ocr=False))
    if result.error:
        raise ValueError(f"{path}: {result.error}")
    lines = [line for page in result.pages for line in page.text.splitlines()[1:]]  # drop the running header
    return parse_lines(lines, manual, path.name)


def r_sections(root: Path | None = None) -> list[Section]:
    """Every section of the R manuals in MANUALS, in manual then page order."""
    root = Path(root) if root is not None else find_root()
    return [s for name, title in MANUALS.items() for s in manual_sections(root / f"{name}.pdf", title)]


def split(sections: list[Section], held_out: float = 0.1, seed: int = 0) -> tuple[list[Section], list[Section]]:
    """(train, held-out) by a seeded shuffle."""
    if not 0.0 < held_out < 1.0:
        raise ValueError(f"held_out={held_out} must be in (0, 1)")
    order = list(range(len(sections)))
    random.Random(seed).shuffle(order)
    test = set(order[:max(1, round(held_out * len(sections)))])
    return [s for i, s in enumerate(sections) if i not in test], [s for i, s in enumerate(sections) if i in test]


def to_alpaca(section: Section, max_chars: int = 1200) -> dict[str, str]:
    """Instruction 'Explain <title> (manual)' -> the section's text, cut at a line end near max_chars."""
    text = section.text
    if len(text) > max_chars:
        cut = text.rfind("\n", 0, max_chars)
        text = text[:cut if cut > max_chars // 2 else max_chars]
    return {"instruction": f"Explain \"{section.title}\" from {section.manual}.", "input": "", "output": text}


def r_manuals_dataset(out: str | Path, held_out: float = 0.1, seed: int = 0) -> tuple[Path, Path]:
    """Write out/train.jsonl and out/eval.jsonl (held-out sections)."""
    out = Path(out)
    train, test = split(r_sections(), held_out, seed)
    atomic_write_jsonl(out / "train.jsonl", [to_alpaca(s) for s in train])
    atomic_write_jsonl(out / "eval.jsonl", [to_alpaca(s) for s in test])
    return out / "train.jsonl", out / "eval.jsonl"

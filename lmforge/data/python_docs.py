"""The Python documentation as plain text, one document per page: a pretraining source that installs offline.

Debian's `python3.11-doc` ships the docs as Sphinx HTML (/usr/share/doc/python3.11/html). Each page's
main body (`<div role="main">`) becomes one document: headings and paragraphs as lines, code blocks
verbatim, the ¶ links, navigation, scripts and styles dropped. Parsed with the standard library's
`html.parser`, as python_faq.py does; nothing beyond the Debian package is needed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

DEFAULT_ROOTS = (Path("/usr/share/doc/python3.11/html"), Path("/usr/share/doc/python3/html"))
# index pages (lists of links), the search page and Sphinx's asset folders are not prose
SKIP_NAMES = {"search.html", "py-modindex.html", "genindex.html", "genindex-all.html", "contents.html"}
SKIP_DIRS = {"_static", "_sources", "_images", "_downloads"}
BLOCK_TAGS = {"p", "li", "dt", "dd", "pre", "div", "blockquote", "table", "tr", "ul", "ol", "dl", "section",
              "h1", "h2", "h3", "h4", "h5", "h6", "br"}
SKIP_TAGS = {"script", "style", "nav"}


@dataclass(frozen=True)
class Page:
    """One documentation page: its title and main-body text; `source` is its path."""

    title: str
    text: str
    source: str


class _BodyParser(HTMLParser):
    """Collects the text of `<div role="main">`: blocks become lines, <pre> stays verbatim."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.depth = 0  # <div> nesting inside the main body (0: outside)
        self.skip = 0  # inside <script>/<style>/<nav> or a headerlink anchor
        self.pre = 0
        self.blocks: list[str] = []
        self.buf: list[str] = []
        self.title = ""
        self.in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "title":
            self.in_title = True
        if not self.depth:
            if tag == "div" and a.get("role") == "main":
                self.depth = 1
            return
        if tag == "div":
            self.depth += 1
        if self.skip or tag in SKIP_TAGS or (tag == "a" and "headerlink" in (a.get("class") or "")):
            self.skip += tag in SKIP_TAGS or tag == "a"
            return
        if tag in BLOCK_TAGS:
            self._flush()
            self.pre += tag == "pre"

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self.in_title = False
        if not self.depth:
            return
        if self.skip:
            self.skip -= tag in SKIP_TAGS or tag == "a"
            if tag == "div":
                self.depth -= 1
            return
        if tag in BLOCK_TAGS:
            self._flush()
            self.pre -= tag == "pre"
        if tag == "div":
            self.depth -= 1

    def handle_data(self, data: str) -> None:
        if self.in_title:
            self.title += data
        if self.depth and not self.skip:
            self.buf.append(data)

    def _flush(self) -> None:
        text = "".join(self.buf)
        self.buf = []
        text = text.strip("\n").rstrip() if self.pre else re.sub(r"\s+", " ", text).strip()
        if text.strip():
            self.blocks.append(text)


def parse_page(path: Path) -> Page:
    """The title and main-body text of one Sphinx HTML page (blocks joined by newlines)."""
    parser = _BodyParser()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    parser._flush()
    title = re.sub(r"\s+", " ", parser.title).strip()
    return Page(title, "\n".join(parser.blocks).strip(), str(path))


def find_root() -> Path:
    """The installed HTML folder, or a ValueError saying which package provides it."""
    for root in DEFAULT_ROOTS:
        if (root / "library").is_dir():
            return root
    raise ValueError(f"Python documentation HTML not found in {', '.join(map(str, DEFAULT_ROOTS))}; "
                     "install it with `apt-get install python3.11-doc`")


def page_files(root: Path | None = None) -> list[Path]:
    """Every prose page under the root, sorted (index pages, search and asset folders skipped)."""
    root = Path(root) if root is not None else find_root()
    return sorted(p for p in root.rglob("*.html")
                  if p.name not in SKIP_NAMES and not p.name.startswith("genindex-")
                  and not SKIP_DIRS & set(p.relative_to(root).parts))


def pages(root: Path | None = None, min_chars: int = 200) -> list[Page]:
    """The text of every page with at least `min_chars` characters of body, in path order."""
    out = [parse_page(p) for p in page_files(root)]
    return [p for p in out if len(p.text) >= min_chars]


def records(root: Path | None = None) -> list[dict]:
    """Pretraining records, one per page: {"text", "source", "title"} (the JSONL layout of ingest's pretrain.jsonl)."""
    return [{"text": p.text, "source": p.source, "title": p.title} for p in pages(root)]

"""PDF -> text per page, with OCR for pages that have no text layer.

The extractor is pypdfium2 (Google's PDFium, the engine in Chrome): it is the fastest of
the well-kept Python options (about 1,800 pages/s on the R manuals, against tens of pages/s
for pdfminer.six), keeps a sane reading order, repairs damaged cross-reference tables, and
renders pages to images, which the OCR fallback needs anyway. `bench/bench_ingest.py`
compares it with pypdf and pdfminer.six on the same files.

Bad input never raises out of `extract_pdf`: the result carries a reason instead, and a
page that fails or runs past its time limit is skipped with a reason while the rest go on.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pypdfium2 as pdfium
import pypdfium2.raw as pdfium_c


@dataclass(frozen=True)
class ExtractConfig:
    """How pages are read: OCR fallback, its resolution and language, and time limits."""

    ocr: bool = True
    ocr_dpi: int = 200
    ocr_lang: str = "eng"
    page_timeout: float = 30.0  # seconds for one page (text or OCR)

    def __post_init__(self) -> None:
        if self.page_timeout <= 0:
            raise ValueError(f"page_timeout must be > 0 seconds, got {self.page_timeout}")
        if not 50 <= self.ocr_dpi <= 600:
            raise ValueError(f"ocr_dpi must be in [50, 600], got {self.ocr_dpi}")


@dataclass
class Page:
    """One page's text; `method` is 'text' (text layer) or 'ocr'."""

    number: int  # 1-based
    text: str
    method: str = "text"


@dataclass
class Extraction:
    """The pages read from one file, the pages skipped (with reasons), or why the file failed."""

    path: str
    pages: list[Page] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # {"page": n, "reason": str}
    error: str | None = None
    n_pages: int = 0
    seconds: float = 0.0


class PageTimeout(Exception):
    """A page took longer than `ExtractConfig.page_timeout`."""


@contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """Raise PageTimeout after `seconds` (SIGALRM; only in the main thread, else no limit)."""

    def _raise(signum, frame):  # noqa: ARG001
        raise PageTimeout(f"page took longer than {seconds:g} s")

    try:
        previous = signal.signal(signal.SIGALRM, _raise)
    except ValueError:  # not the main thread: run without a limit
        yield
        return
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def check_pdf_file(path: Path) -> str | None:
    """Why `path` is not a readable PDF before opening it (empty, not a PDF), else None."""
    if not path.is_file():
        return "not a file"
    if path.stat().st_size == 0:
        return "empty file (0 bytes)"
    with open(path, "rb") as f:
        head = f.read(1024)
    if b"%PDF-" not in head:
        return f"not a PDF: no %PDF- header (starts with {head[:16]!r})"
    return None


def _open_error(err: Exception) -> str:
    """A readable reason for a PDFium load failure."""
    text = str(err)
    if "password" in text.lower():
        return "encrypted: a password is required to open it"
    if "format" in text.lower():
        return f"corrupt or truncated PDF ({text})"
    return f"cannot open PDF ({text})"


def _page_text(page: pdfium.PdfPage) -> str:
    """The text layer of one page, lines joined by newlines."""
    textpage = page.get_textpage()
    try:
        return textpage.get_text_range().replace("\r\n", "\n").replace("\r", "\n")
    finally:
        textpage.close()


def _has_images(page: pdfium.PdfPage) -> bool:
    """Whether the page draws any image (a scan), so OCR could find text on it."""
    return any(True for _ in page.get_objects(filter=[pdfium_c.FPDF_PAGEOBJ_IMAGE], max_depth=2))


def tesseract_available() -> bool:
    """Whether the Tesseract binary (Debian `tesseract-ocr`) is on PATH."""
    return shutil.which("tesseract") is not None


def ocr_page(page: pdfium.PdfPage, config: ExtractConfig) -> str:
    """Render the page and read it with Tesseract; raises RuntimeError on failure."""
    image = page.render(scale=config.ocr_dpi / 72, grayscale=True).to_pil()
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    proc = subprocess.run(["tesseract", "stdin", "stdout", "-l", config.ocr_lang, "--psm", "3"],
                          input=buf.getvalue(), capture_output=True, timeout=config.page_timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"tesseract failed: {proc.stderr.decode(errors='replace').strip()[:200]}")
    return proc.stdout.decode("utf-8", errors="replace")


def _read_page(page: pdfium.PdfPage, number: int, config: ExtractConfig) -> Page | dict:
    """One page as a Page, or a {"page", "reason"} record when it yields no text."""
    text = _page_text(page)
    if text.strip():
        return Page(number, text, "text")
    if not _has_images(page):
        return {"page": number, "reason": "blank page (no text layer, no image)"}
    if not config.ocr:
        return {"page": number, "reason": "no text layer; OCR switched off"}
    if not tesseract_available():
        return {"page": number, "reason": "no text layer; OCR unavailable (install Debian tesseract-ocr)"}
    text = ocr_page(page, config)
    if not text.strip():
        return {"page": number, "reason": "no text layer; OCR found no text"}
    return Page(number, text, "ocr")


def extract_pdf(path: str | Path, config: ExtractConfig = ExtractConfig()) -> Extraction:
    """Read every page of one PDF; failures become reasons, never exceptions."""
    path = Path(path)
    start = time.perf_counter()
    result = Extraction(path=str(path))
    result.error = check_pdf_file(path)
    if result.error:
        return result
    try:
        doc = pdfium.PdfDocument(str(path))
    except pdfium.PdfiumError as err:
        result.error = _open_error(err)
        return result
    try:
        result.n_pages = len(doc)
        for index in range(result.n_pages):
            _read_into(result, doc, index, config)
    finally:
        doc.close()
    if not result.pages and not result.error:
        result.error = "no text on any page" if result.n_pages else "PDF has no pages"
    result.seconds = time.perf_counter() - start
    return result


def _read_into(result: Extraction, doc: pdfium.PdfDocument, index: int, config: ExtractConfig) -> None:
    """Read page `index` into `result`, recording a skip with its reason on any failure."""
    try:
        with _deadline(config.page_timeout):
            page = doc[index]
            try:
                got = _read_page(page, index + 1, config)
            finally:
                page.close()
    except PageTimeout as err:
        got = {"page": index + 1, "reason": f"timeout: {err}"}
    except subprocess.TimeoutExpired:
        got = {"page": index + 1, "reason": f"timeout: OCR took longer than {config.page_timeout:g} s"}
    except Exception as err:  # noqa: BLE001 -- a broken page must not stop the file
        got = {"page": index + 1, "reason": f"page failed: {type(err).__name__}: {err}"}
    if isinstance(got, Page):
        result.pages.append(got)
    else:
        result.skipped.append(got)

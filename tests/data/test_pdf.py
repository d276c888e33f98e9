"""PDF extraction: page numbers kept, OCR or a reason for image-only pages, bad files become reasons."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest

from lmforge.data import pdf as pdf_mod
from lmforge.data.pdf import ExtractConfig, extract_pdf

from fpdf import FPDF


def test_pages_are_numbered_and_texts_kept(synthetic_pdf):
    ext = extract_pdf(synthetic_pdf)
    assert ext.error is None and ext.n_pages == 3
    assert [p.number for p in ext.pages] == [1, 2, 3]
    assert "2 Method" in ext.pages[1].text and "References" in ext.pages[2].text


@pytest.mark.parametrize("name, data, reason", [
    ("empty.pdf", b"", "empty file"),
    ("fake.pdf", b"PK\x03\x04 this is a zip, not a pdf" * 10, "not a PDF"),
    ("corrupt.pdf", b"%PDF-1.4\n" + bytes(range(256)) * 4, "corrupt"),
])
def test_bad_files_give_reasons(tmp_path, name, data, reason):
    path = tmp_path / name
    path.write_bytes(data)
    ext = extract_pdf(path)
    assert ext.error and reason in ext.error and not ext.pages


def test_truncated_pdf_gives_reason_or_recovers(tmp_path, synthetic_pdf):
    path = tmp_path / "truncated.pdf"
    path.write_bytes(synthetic_pdf.read_bytes()[:700])
    ext = extract_pdf(path)
    assert ext.error is not None or ext.pages  # never an exception


def test_encrypted_pdf_gives_reason(tmp_path, encrypted_writer):
    ext = extract_pdf(encrypted_writer(tmp_path / "locked.pdf"))
    assert ext.error and "encrypted" in ext.error


def test_slow_page_is_skipped_and_others_kept(synthetic_pdf, monkeypatch):
    real = pdf_mod._page_text
    calls = iter(range(100))

    def slow(page):
        if next(calls) == 1:
            time.sleep(5)
        return real(page)

    monkeypatch.setattr(pdf_mod, "_page_text", slow)
    start = time.perf_counter()
    ext = extract_pdf(synthetic_pdf, ExtractConfig(page_timeout=0.3))
    assert time.perf_counter() - start < 3
    assert [p.number for p in ext.pages] == [1, 3]
    assert ext.skipped[0]["page"] == 2 and "timeout" in ext.skipped[0]["reason"]


def image_pdf(path: Path, text: str) -> Path:
    """A one-page PDF whose only content is a picture of `text` (no text layer)."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("L", (1400, 200), 255)
    ImageDraw.Draw(image).text((30, 60), text, fill=0, font=ImageFont.load_default(size=56))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    doc = FPDF()
    doc.add_page()
    doc.image(buf, x=10, y=20, w=190)
    doc.output(str(path))
    return path


def test_image_only_page_is_skipped_with_reason_without_tesseract(tmp_path, monkeypatch):
    monkeypatch.setattr(pdf_mod, "tesseract_available", lambda: False)
    ext = extract_pdf(image_pdf(tmp_path / "scan.pdf", "Hello scanned world"))
    assert ext.skipped == [{"page": 1, "reason": "no text layer; OCR unavailable (install Debian tesseract-ocr)"}]
    assert ext.error == "no text on any page"


@pytest.mark.skipif(not pdf_mod.tesseract_available(), reason="tesseract-ocr is not installed")
def test_image_only_page_is_ocred(tmp_path):
    ext = extract_pdf(image_pdf(tmp_path / "scan.pdf", "Hello scanned world"))
    assert ext.pages and ext.pages[0].method == "ocr"
    assert "scanned world" in ext.pages[0].text

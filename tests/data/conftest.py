"""Fixtures for the ingest tests: generated PDFs with known noise and their known clean text."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

fpdf = pytest.importorskip("fpdf")

HEADER = "Journal of Synthetic Tests"
FOOTER = "Confidential draft"
GARBAGE_1 = "%#@! 8f9g 0x3F ^^&& ]]{{ ~~~ 4j2k@@ 77$$ q#1 zz@9 ##!% }{][ 3$4% .."
GARBAGE_2 = "|| -- || -- 0101 1110 0011 ## ## ## %% %% %% 7777 $$$$ @@@@ !!!! ????."

# Each page: a list of paragraphs; a paragraph is a list of printed lines. "" marks a heading.
PAGES = [
    [
        ["Contents"],
        ["1 Introduction . . . . . . . . . . . . . . . . . . . . . . . . . . . . 1",
         "2 Method . . . . . . . . . . . . . . . . . . . . . . . . . . . . . . . . 2",
         "References . . . . . . . . . . . . . . . . . . . . . . . . . . . . . . 3"],
        ["1 Introduction"],
        ["Language models learn from large amounts of text that was collected from many different sour-",
         "ces, and the quality of that text matters a great deal for the final model [12]. Noise in the",
         "data, such as headers or page numbers, is learned as language [3-5]."],
        ["Earlier work (Smith et al., 2020) showed that removing boilerplate improves downstream accu-",
         "racy on several benchmarks, while other studies (Jones and Lee, 2019; Brown, 2021) found that",
         "the effect depends on the domain. In this section we describe the cleaning steps that"],
    ],
    [
        ["follow, in the order in which they are applied to each document of the collection."],
        ["2 Method"],
        ["Every page is read from the text layer of the file, and pages without such a layer are sent",
         "to optical character recognition. The extracted lines are then normalized and joined."],
        [GARBAGE_1],
        ["Paragraphs that look like noise are not dropped silently; they are written to a separate file",
         "with their scores and the reasons, so that a person can review them later [7]."],
        [GARBAGE_2],
    ],
    [
        ["Finally the text is split into chunks of a fixed number of tokens with a small overlap be-",
         "tween neighbouring chunks, and duplicated chunks are removed before training."],
        ["References"],
        ["[1] A. Smith, B. Jones. Cleaning web text for language models. 2020.",
         "[2] C. Brown. On boilerplate. 2021."],
    ],
]


def expected_clean_text() -> str:
    """The known clean text of the document built from PAGES."""
    paras = [
        "Contents",
        "1 Introduction",
        "Language models learn from large amounts of text that was collected from many different sources, "
        "and the quality of that text matters a great deal for the final model. Noise in the data, such as "
        "headers or page numbers, is learned as language.",
        "Earlier work showed that removing boilerplate improves downstream accuracy on several benchmarks, "
        "while other studies found that the effect depends on the domain. In this section we describe the "
        "cleaning steps that follow, in the order in which they are applied to each document of the collection.",
        "2 Method",
        "Every page is read from the text layer of the file, and pages without such a layer are sent to optical "
        "character recognition. The extracted lines are then normalized and joined.",
        GARBAGE_1,
        "Paragraphs that look like noise are not dropped silently; they are written to a separate file with "
        "their scores and the reasons, so that a person can review them later.",
        GARBAGE_2,
        "Finally the text is split into chunks of a fixed number of tokens with a small overlap between "
        "neighbouring chunks, and duplicated chunks are removed before training.",
    ]
    return "\n\n".join(paras)


def write_pdf(path: Path, pages: list[list[list[str]]] = PAGES, header: str = HEADER, footer: str = FOOTER) -> Path:
    """A PDF with a running header, a footer line and a page number on every page."""

    class Doc(fpdf.FPDF):
        def header(self):
            self.set_font("Helvetica", size=9)
            self.cell(0, 6, header, new_x="LMARGIN", new_y="NEXT")
            self.ln(4)

        def footer(self):
            self.set_y(-18)
            self.set_font("Helvetica", size=9)
            self.cell(0, 5, footer, new_x="LMARGIN", new_y="NEXT", align="C")
            self.cell(0, 5, f"Page {self.page_no()}", align="C")

    pdf = Doc(format="A4")
    pdf.set_auto_page_break(False)
    for page in pages:
        pdf.add_page()
        pdf.set_font("Helvetica", size=10)
        for para in page:
            for line in para:
                pdf.cell(0, 5, line, new_x="LMARGIN", new_y="NEXT")
            pdf.ln(3)
    pdf.output(str(path))
    return path


@pytest.fixture
def synthetic_pdf(tmp_path: Path) -> Path:
    return write_pdf(tmp_path / "synthetic.pdf")


class WordTokenizer:
    """A deterministic test tokenizer: words, numbers and single punctuation marks are tokens."""

    pattern = re.compile(r"\w+|[^\w\s]")

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [self.vocab.setdefault(t, len(self.vocab)) for t in self.pattern.findall(text)]


@pytest.fixture
def word_tokenizer() -> WordTokenizer:
    return WordTokenizer()


@pytest.fixture
def expected_text() -> str:
    return expected_clean_text()


@pytest.fixture
def pdf_writer():
    """The PDF writer, for tests that build their own pages."""
    return write_pdf


def write_encrypted_pdf(path: Path) -> Path:
    """A PDF that needs a user password to open."""
    doc = fpdf.FPDF()
    doc.add_page()
    doc.set_font("Helvetica", size=12)
    doc.cell(0, 10, "secret text")
    doc.set_encryption(owner_password="owner", user_password="user")
    doc.output(str(path))
    return path


@pytest.fixture
def encrypted_writer():
    return write_encrypted_pdf

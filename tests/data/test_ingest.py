"""End to end: a folder of good and bad PDFs -> outputs, report with reasons, resume, review labels applied."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from lmforge.data import ingest as ingest_mod
from lmforge.data.chunk import ChunkConfig
from lmforge.data.ingest import IngestConfig, ingest, paragraph_id
from lmforge.data.io import read_jsonl

CONFIG = IngestConfig(chunk=ChunkConfig(max_tokens=40, overlap_tokens=8), workers=2, file_timeout=60)


@pytest.fixture
def corpus(tmp_path, synthetic_pdf, encrypted_writer) -> Path:
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(synthetic_pdf, folder / "a.pdf")
    shutil.copy(synthetic_pdf, folder / "sub" / "copy.pdf")
    (folder / "empty.pdf").write_bytes(b"")
    (folder / "notes.pdf").write_text("just some notes, not a pdf\n" * 20)
    (folder / "broken.pdf").write_bytes(b"%PDF-1.7\n" + b"\x00garbage" * 100)
    encrypted_writer(folder / "locked.pdf")
    (folder / "ignored.txt").write_text("not a pdf by name")
    return folder


def run(corpus: Path, out: Path, tokenizer, config: IngestConfig = CONFIG) -> dict:
    return ingest([str(corpus)], out, tokenizer, config, progress=False)


def test_outputs_report_and_bad_files(corpus, tmp_path, word_tokenizer, expected_text):
    out = tmp_path / "out"
    report = run(corpus, out, word_tokenizer)
    files = {Path(k).name: v for k, v in report["files"].items()}
    assert set(files) == {"a.pdf", "copy.pdf", "empty.pdf", "notes.pdf", "broken.pdf", "locked.pdf"}
    assert files["a.pdf"]["status"] == "ok" and files["a.pdf"]["pages"] == 3
    assert "empty" in files["empty.pdf"]["reason"] and "not a PDF" in files["notes.pdf"]["reason"]
    assert "corrupt" in files["broken.pdf"]["reason"] and "encrypted" in files["locked.pdf"]["reason"]
    assert report["totals"]["files_failed"] == 4 and report["rules"]["citations"] == 10
    assert (out / "text" / "a.txt").read_text() == expected_text

    garbage = read_jsonl(out / "garbage.jsonl")
    assert {g["text"][:9] for g in garbage} == {"%#@! 8f9g", "|| -- || "}
    assert all(g["score"] >= 0.5 and g["reasons"] and g["page"] == 2 for g in garbage)

    chunks = read_jsonl(out / "chunks.jsonl")
    text = (out / "text" / "a.txt").read_text()
    assert chunks and all(c["source"].endswith("a.pdf") for c in chunks)  # copy.pdf's are exact duplicates
    for c in chunks:
        assert text[c["char_start"]:c["char_end"]] == c["text"] and c["n_tokens"] <= 40
        assert "%#@!" not in c["text"]
    dups = read_jsonl(out / "duplicates.jsonl")
    assert {d["kind"] for d in dups} == {"exact"} and all(d["id"].startswith("copy:") for d in dups
                                                         if d["output"] == "chunks")
    pretrain = read_jsonl(out / "pretrain.jsonl")
    assert len(pretrain) == 2 and all("%#@!" not in p["text"] for p in pretrain)
    assert (out / "garbage_scores.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "report.json").read_text())["totals"]["chunks"] == len(chunks)


def test_second_run_skips_done_files(corpus, tmp_path, word_tokenizer):
    out = tmp_path / "out"
    first = run(corpus, out, word_tokenizer)
    before = (out / "chunks.jsonl").read_text()
    second = run(corpus, out, word_tokenizer)
    assert second["totals"]["files_cached"] == 2 and first["totals"]["files_cached"] == 0
    assert (out / "chunks.jsonl").read_text() == before


def test_hanging_file_is_stopped_and_earlier_output_kept(corpus, tmp_path, word_tokenizer, monkeypatch):
    out = tmp_path / "out"
    run(corpus, out, word_tokenizer)
    n_chunks = len(read_jsonl(out / "chunks.jsonl"))
    hang = corpus / "zz_hang.pdf"
    shutil.copy(corpus / "a.pdf", hang)
    real = ingest_mod.extract_pdf

    def extract(path, config):
        if Path(path).name == "zz_hang.pdf":
            time.sleep(60)
        return real(path, config)

    monkeypatch.setattr(ingest_mod, "extract_pdf", extract)
    start = time.perf_counter()
    report = run(corpus, out, word_tokenizer, IngestConfig(chunk=CONFIG.chunk, workers=2, file_timeout=1.5))
    assert time.perf_counter() - start < 20
    entry = report["files"][str(hang.resolve())]
    assert entry["status"] == "failed" and "timeout" in entry["reason"]
    assert report["totals"]["files_cached"] == 2
    assert len(read_jsonl(out / "chunks.jsonl")) == n_chunks


def test_slow_page_is_reported_and_run_goes_on(corpus, tmp_path, word_tokenizer, monkeypatch):
    from lmforge.data import pdf as pdf_mod

    real = pdf_mod._page_text

    def slow(page):
        text = real(page)
        if "Every page is read" in text:
            time.sleep(30)
        return text

    monkeypatch.setattr(pdf_mod, "_page_text", slow)
    config = IngestConfig(extract=pdf_mod.ExtractConfig(page_timeout=0.5), chunk=CONFIG.chunk, workers=2)
    report = run(corpus, tmp_path / "out", word_tokenizer, config)
    entry = next(v for k, v in report["files"].items() if k.endswith("a.pdf"))
    assert entry["status"] == "ok" and entry["pages_read"] == 2
    assert entry["pages_skipped"][0]["page"] == 2 and "timeout" in entry["pages_skipped"][0]["reason"]


def test_kept_label_returns_paragraph_to_corpus(corpus, tmp_path, word_tokenizer):
    out = tmp_path / "out"
    run(corpus, out, word_tokenizer)
    item = next(g for g in read_jsonl(out / "garbage.jsonl") if g["text"].startswith("%#@!"))
    assert item["id"] == paragraph_id(item["text"])
    (out / "labels.json").write_text(json.dumps({item["id"]: {"label": "keep", "text": item["text"],
                                                               "source": item["source"],
                                                               "features": item["features"]}}))
    report = run(corpus, out, word_tokenizer)
    assert report["totals"]["files_cached"] == 0  # stage 2 redone with the labels
    assert not any(g["text"].startswith("%#@!") for g in read_jsonl(out / "garbage.jsonl"))
    assert any("%#@!" in c["text"] for c in read_jsonl(out / "chunks.jsonl"))


def test_cli_runs_with_a_tokenizer_json(corpus, tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from lmforge.cli import main

    tok = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    out = tmp_path / "out"
    rc = main(["ingest", str(corpus / "a.pdf"), "--out", str(out), "--tokenizer", str(tmp_path / "tokenizer.json"),
               "--max-tokens", "64", "--overlap", "8", "--workers", "1", "--no-progress", "--disable", "citations"])
    assert rc == 0 and "pages 3" in capsys.readouterr().out
    assert any("[12]" in c["text"] for c in read_jsonl(out / "chunks.jsonl"))
    assert main(["ingest", str(corpus), "--out", str(out), "--disable", "nonsense"]) == 2


def test_missing_input_is_a_clear_error(tmp_path, word_tokenizer):
    with pytest.raises(ValueError, match="does not exist"):
        ingest([str(tmp_path / "nope")], tmp_path / "out", word_tokenizer)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="no PDF files"):
        ingest([str(tmp_path / "empty_dir")], tmp_path / "out", word_tokenizer)


@pytest.mark.real_model
def test_real_tokenizer_chunks(smollm2_gguf, synthetic_pdf, tmp_path):
    tokenizer_mod = pytest.importorskip("lmforge.tokenizer")
    tok = tokenizer_mod.Tokenizer.load(smollm2_gguf)
    report = ingest([str(synthetic_pdf)], tmp_path / "out", tok, CONFIG, progress=False)
    chunks = read_jsonl(tmp_path / "out" / "chunks.jsonl")
    assert report["totals"]["chunks"] == len(chunks) > 1
    for c in chunks:
        assert len(tok.encode(c["text"], add_special_tokens=False)) == c["n_tokens"] <= 40

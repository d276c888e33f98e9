"""`lmforge ingest`: PDFs -> cleaned text -> garbage kept aside -> chunks -> training and retrieval data.

Per file, in a worker process: extract (pdf.py) -> clean (clean.py) -> features and
garbage score (garbage.py) -> chunk (chunk.py). Each file's result is saved atomically under
``OUT/work/`` keyed by the file's size, mtime and the settings, so a second run skips files
already done and a review only redoes the garbage and chunking of each file. Then, in the
parent: de-duplicate (dedup.py) across all files and write the outputs and report (report.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lmforge.data import report as report_mod
from lmforge.data.chunk import ChunkConfig, Span, TokenizerLike, chunk_document
from lmforge.data.clean import CleanConfig, clean_pages
from lmforge.data.dedup import DedupConfig, dedup
from lmforge.data.garbage import GarbageConfig, GarbageModel, features, score
from lmforge.atomic import atomic_write_json, atomic_write_jsonl, atomic_write_text
from lmforge.data.io import read_json
from lmforge.data.parallel import run_tasks
from lmforge.data.pdf import ExtractConfig, extract_pdf

MODEL_FILE, LABELS_FILE = "garbage_model.json", "labels.json"


@dataclass(frozen=True)
class IngestConfig:
    """Every stage's settings, plus parallelism and the per-file time limit."""

    extract: ExtractConfig = field(default_factory=ExtractConfig)
    clean: CleanConfig = field(default_factory=CleanConfig)
    garbage: GarbageConfig = field(default_factory=GarbageConfig)
    chunk: ChunkConfig = field(default_factory=ChunkConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    workers: int = 2
    file_timeout: float = 600.0
    tokenizer_name: str = ""  # part of the cache key: chunks depend on the tokenizer


def find_pdfs(paths: list[str]) -> list[Path]:
    """PDF files named directly or found (recursively, *.pdf) under the given folders."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found.extend(sorted(q for q in p.rglob("*") if q.suffix.lower() == ".pdf" and q.is_file()))
        elif p.exists():
            found.append(p)
        else:
            raise ValueError(f"input {str(p)!r} does not exist; pass PDF files or folders that hold them")
    return sorted(set(f.resolve() for f in found))


def _digest(*parts: object) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def paragraph_id(text: str) -> str:
    """Stable id of a paragraph's text: a label applies wherever the same text occurs, across runs."""
    return _digest(" ".join(text.split()))


# ---- stage 1: extract, clean, features (cached per file) ----

def stage1(path: Path, config: IngestConfig) -> dict:
    """Extract and clean one PDF; the cleaned text, its paragraph spans and their features."""
    t0 = time.perf_counter()
    ext = extract_pdf(path, config.extract)
    t1 = time.perf_counter()
    base = {"source": str(path), "n_pages": ext.n_pages, "skipped": ext.skipped, "error": ext.error,
            "pages_ocr": sum(p.method == "ocr" for p in ext.pages), "pages_read": len(ext.pages)}
    if ext.error:
        return {**base, "text": "", "paragraphs": [], "counts": {}, "seconds": {"extract": t1 - t0}}
    doc = clean_pages(ext.pages, config.clean)
    t2 = time.perf_counter()
    text, paras, offset = [], [], 0
    for p in doc.paragraphs:
        paras.append({"start": offset, "end": offset + len(p.text), "page_start": p.page_start,
                      "page_end": p.page_end, "section": p.section, "heading": p.heading,
                      "features": features(p.text, p.line_lengths)})
        text.append(p.text)
        offset += len(p.text) + 2
    t3 = time.perf_counter()
    return {**base, "text": "\n\n".join(text), "paragraphs": paras, "counts": doc.counts,
            "seconds": {"extract": t1 - t0, "clean": t2 - t1, "features": t3 - t2}}


# ---- stage 2: garbage decision and chunks (redone when labels or the model change) ----

def decide_garbage(doc: dict, model: GarbageModel | None, labels: dict, config: GarbageConfig) -> list[dict]:
    """Score each paragraph; mark it garbage (with reasons) unless a reviewer kept it."""
    text, paras = doc["text"], doc["paragraphs"]
    scored = [i for i, p in enumerate(paras) if not p["heading"] and p["end"] - p["start"] >= config.min_chars]
    results = score([paras[i]["features"] for i in scored], model, config)
    decisions = [{"score": 0.0, "reasons": [], "garbage": False} for _ in paras]
    for i, (s, reasons) in zip(scored, results):
        pid = paragraph_id(text[paras[i]["start"]:paras[i]["end"]])
        label = labels.get(pid, {}).get("label")
        garbage = label == "discard" or (label != "keep" and s >= config.threshold)
        reasons = reasons + [f"reviewed: {label}"] if label else reasons
        decisions[i] = {"id": pid, "score": round(s, 4), "reasons": reasons, "garbage": garbage, "label": label}
    return decisions


def stage2(doc: dict, tokenizer: TokenizerLike, model: GarbageModel | None, labels: dict,
           config: IngestConfig) -> dict:
    """Garbage records and chunks of one cleaned document."""
    t0 = time.perf_counter()
    decisions = decide_garbage(doc, model, labels, config.garbage)
    t1 = time.perf_counter()
    paras, text = doc["paragraphs"], doc["text"]
    spans = [Span(p["start"], p["end"], p["page_start"], p["page_end"], p["section"], keep=not d["garbage"],
                  boundary=p["heading"]) for p, d in zip(paras, decisions)]
    chunks = chunk_document(text, spans, tokenizer, config.chunk)
    garbage = [{"id": d["id"], "source": doc["source"], "page": p["page_start"], "page_end": p["page_end"],
                "score": d["score"], "reasons": d["reasons"], "label": d["label"],
                "text": text[p["start"]:p["end"]], "features": p["features"]}
               for p, d in zip(paras, decisions) if d["garbage"]]
    scores = [d["score"] for p, d in zip(paras, decisions) if "id" in d]
    return {"chunks": chunks, "garbage": garbage, "scores": scores, "pretrain": pretrain_records(doc, spans),
            "garbage_chars": sum(len(g["text"]) for g in garbage),
            "seconds": {"garbage": t1 - t0, "chunk": time.perf_counter() - t1}}


def pretrain_records(doc: dict, spans: list[Span]) -> list[dict]:
    """Plain text for continued pretraining: kept paragraphs, one record per section."""
    records: list[dict] = []
    for span in spans:
        if not span.keep:
            continue
        if span.boundary or not records or records[-1]["section"] != span.section:
            records.append({"text": "", "source": doc["source"], "section": span.section,
                            "page_start": span.page_start, "page_end": span.page_end})
        rec = records[-1]
        rec["text"] += ("\n\n" if rec["text"] else "") + doc["text"][span.start:span.end]
        rec["page_end"] = span.page_end
    return [r for r in records if r["text"] != r["section"]]


# ---- the worker: both stages for one file, results written atomically ----

_STATE: dict = {}  # set in the parent before forking; workers inherit it


def _work(task: dict) -> dict:
    """Run (or reuse) stage 1 and stage 2 for one file; returns a small summary."""
    config: IngestConfig = _STATE["config"]
    s1_path, s2_path = Path(task["stage1"]), Path(task["stage2"])
    doc = read_json(s1_path) if s1_path.exists() else None
    if doc is None:
        doc = stage1(Path(task["path"]), config)
        atomic_write_json(s1_path, doc)
    if not doc["error"]:
        result = stage2(doc, _STATE["tokenizer"], _STATE["model"], _STATE["labels"], config)
        atomic_write_json(s2_path, result)
    return {"pages": doc["n_pages"], "error": doc["error"]}


def _tasks(files: list[Path], work: Path, config: IngestConfig, stage2_key: str) -> list[dict]:
    settings = asdict(config)
    tasks = []
    for f in files:
        st = f.stat()
        k1 = _digest(str(f), st.st_size, st.st_mtime_ns, settings["extract"], settings["clean"])
        tasks.append({"path": str(f), "stage1": str(work / f"{f.stem}.{k1}.doc.json"),
                      "stage2": str(work / f"{f.stem}.{k1}.{stage2_key}.out.json")})
    return tasks


def ingest(paths: list[str], out: str | Path, tokenizer: TokenizerLike, config: IngestConfig = IngestConfig(),
           progress: bool = True) -> dict:
    """Run the whole pipeline over `paths` into `out`; returns the run report."""
    out = Path(out)
    files = find_pdfs(paths)
    if not files:
        raise ValueError(f"no PDF files found in {paths}; pass .pdf files or folders holding them")
    start = time.perf_counter()
    model = GarbageModel.load(out / MODEL_FILE)
    labels = read_json(out / LABELS_FILE, default={})
    settings = asdict(config)
    key2 = _digest([settings[k] for k in ("garbage", "chunk", "tokenizer_name")], model and asdict(model),
                   {k: v["label"] for k, v in labels.items()})
    tasks = _tasks(files, out / "work", config, key2)
    todo = [t for t in tasks if not (Path(t["stage1"]).exists() and _stage2_done(t))]
    _STATE.update(config=config, tokenizer=tokenizer, model=model, labels=labels)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    failures: dict[str, str] = {}
    bar = report_mod.progress_bar(len(tasks), len(tasks) - len(todo), progress)

    def done(task: dict, result: dict) -> None:
        if result.get("error") and not Path(task["stage1"]).exists():
            failures[task["path"]] = result["error"]  # killed or crashed: not cached, retried next run
        bar.update(1)

    run_tasks(_work, todo, done, workers=config.workers, timeout=config.file_timeout)
    bar.close()
    cached = {t["path"] for t in tasks if t not in todo}
    return finish(out, tasks, failures, cached, config, time.perf_counter() - start)


def _stage2_done(task: dict) -> bool:
    """Stage 2 is done, or not needed because stage 1 recorded a failure."""
    if Path(task["stage2"]).exists():
        return True
    doc = read_json(task["stage1"], default={})
    return bool(doc.get("error"))


def finish(out: Path, tasks: list[dict], failures: dict[str, str], cached: set[str], config: IngestConfig,
           seconds: float) -> dict:
    """Gather per-file results, de-duplicate, and write every output atomically."""
    t_finish = time.perf_counter()
    docs, results = [], []
    for t in tasks:
        doc = read_json(t["stage1"]) if t["path"] not in failures else None
        res = read_json(t["stage2"]) if doc and not doc["error"] else None
        docs.append(doc)
        results.append(res)
        if doc and not doc["error"]:
            atomic_write_text(out / "text" / f"{Path(t['path']).stem}.txt", doc["text"])
    t0 = time.perf_counter()
    chunks, dup_log = _dedup_chunks(tasks, results, config.dedup)
    pretrain, pre_log = _dedup_records([r for res in results if res for r in res["pretrain"]], config.dedup)
    dedup_s = time.perf_counter() - t0
    atomic_write_jsonl(out / "chunks.jsonl", chunks)
    atomic_write_jsonl(out / "pretrain.jsonl", pretrain)
    atomic_write_jsonl(out / "garbage.jsonl", [g for res in results if res for g in res["garbage"]])
    atomic_write_jsonl(out / "duplicates.jsonl", dup_log + pre_log)
    seconds += time.perf_counter() - t_finish  # the wall time covers gathering and writing too
    report = report_mod.build(tasks, docs, results, failures, cached, chunks, dup_log, pretrain, dedup_s, seconds)
    report_mod.histogram([s for res in results if res for s in res["scores"]], config.garbage.threshold,
                         out / "garbage_scores.png")
    atomic_write_json(out / "report.json", report)
    return report


def _dedup_chunks(tasks: list[dict], results: list, config: DedupConfig) -> tuple[list[dict], list[dict]]:
    """All chunks with ids and sources, near and exact duplicates removed and logged."""
    chunks = []
    for t, res in zip(tasks, results):
        for i, c in enumerate(res["chunks"] if res else []):
            chunks.append({"id": f"{Path(t['path']).stem}:{i}", "source": t["path"], **c})
    keep, log = dedup([c["text"] for c in chunks], config)
    log = [{"output": "chunks", "id": chunks[r["index"]]["id"], "duplicate_of": chunks[r["duplicate_of"]]["id"],
            "kind": r["kind"], "jaccard": r["jaccard"], "text": chunks[r["index"]]["text"][:200]} for r in log]
    return [c for c, k in zip(chunks, keep) if k], log


def _dedup_records(records: list[dict], config: DedupConfig) -> tuple[list[dict], list[dict]]:
    """Pretraining records with duplicates removed and logged."""
    keep, log = dedup([r["text"] for r in records], config)
    log = [{"output": "pretrain", "source": records[r["index"]]["source"], "section": records[r["index"]]["section"],
            "duplicate_of": records[r["duplicate_of"]]["source"], "kind": r["kind"], "jaccard": r["jaccard"],
            "text": records[r["index"]]["text"][:200]} for r in log]
    return [r for r, k in zip(records, keep) if k], log


# ---- tokenizer and the CLI command ----

class HFTokenizer:
    """A `tokenizers` tokenizer.json behind the small `encode(text, add_special_tokens)` protocol."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(path))

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids


def load_tokenizer(name_or_path: str) -> TokenizerLike:
    """A tokenizer.json file, or a model name/path resolved by lmforge.hub and read by lmforge.tokenizer."""
    if name_or_path.endswith(".json") and Path(name_or_path).is_file():
        return HFTokenizer(name_or_path)
    from lmforge import hub

    path = hub.resolve(name_or_path)
    try:
        from lmforge.tokenizer import Tokenizer
    except ImportError as err:
        raise ValueError(f"cannot load the tokenizer of {name_or_path!r}: lmforge.tokenizer is unavailable ({err}); "
                         "pass --tokenizer path/to/tokenizer.json instead") from err
    return Tokenizer.load(path)


def ingest_command(paths: list[str], out: str | None = None, tokenizer: str = "smollm2-135m-instruct",
                   max_tokens: int = 256, overlap: int = 32, dedup_threshold: float = 0.8,
                   garbage_threshold: float = 0.5, workers: int = 0, page_timeout: float = 30.0,
                   file_timeout: float = 600.0, ocr: bool = True, disable: list[str] | None = None,
                   progress: bool = True) -> int:
    """Turn PDFs into cleaned, chunked, de-duplicated training and retrieval data.

    Writes OUT/chunks.jsonl, pretrain.jsonl, garbage.jsonl, duplicates.jsonl, report.json,
    garbage_scores.png and text/. Files already done are skipped on the next run; review
    garbage with `lmforge review OUT`.

    Args:
        paths: PDF files or folders holding them
        out: output folder (required)
        tokenizer: model name or path whose tokenizer counts chunk tokens, or a tokenizer.json
        max_tokens: most tokens in one chunk
        overlap: tokens of whole sentences repeated from the previous chunk
        dedup_threshold: Jaccard similarity at or above which chunks are near-duplicates
        garbage_threshold: garbage score at or above which a paragraph is set aside
        workers: processes in parallel (0 = one per CPU)
        page_timeout: seconds one page may take before it is skipped
        file_timeout: seconds one file may take before its worker is stopped
        ocr: OCR pages without a text layer with Tesseract when it is installed
        disable: cleaning rules to switch off (unicode ligatures headers_footers page_numbers toc_leaders references hyphenation citations whitespace)
        progress: show a progress bar
    """
    if not out:
        raise ValueError("--out DIR is required: the folder the outputs are written to")
    unknown = set(disable or ()) - set(CleanConfig.rules())
    if unknown:
        raise ValueError(f"unknown cleaning rules {sorted(unknown)}; known: {CleanConfig.rules()}")
    config = IngestConfig(
        extract=ExtractConfig(ocr=ocr, page_timeout=page_timeout),
        clean=CleanConfig(**{rule: False for rule in disable or ()}),
        garbage=GarbageConfig(threshold=garbage_threshold),
        chunk=ChunkConfig(max_tokens=max_tokens, overlap_tokens=overlap),
        dedup=DedupConfig(threshold=dedup_threshold),
        workers=workers or os.cpu_count() or 1, file_timeout=file_timeout, tokenizer_name=tokenizer)
    report = ingest(paths, out, load_tokenizer(tokenizer), config, progress=progress)
    print(report_mod.summary(report))
    return 0

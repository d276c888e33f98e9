"""Benchmark `lmforge ingest` on Debian's R manuals (r-doc-pdf): pages/s per stage, garbage share,
and pypdfium2 against pypdf and pdfminer.six on the same pages.

    python bench/bench_ingest.py                     # all 8 manuals, 3,092 pages
    python bench/bench_ingest.py --json result.json  # also write the numbers as JSON

Writes a JSON result and prints a table.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from lmforge.data.garbage import _wordlike
from lmforge.data.ingest import IngestConfig, ingest, load_tokenizer
from lmforge.data.report import summary

MANUALS = "/usr/share/doc/r-doc-pdf/manual/*.pdf"


def pages_pdfium(path: str, n: int) -> list[str]:
    import pypdfium2 as pdfium

    doc = pdfium.PdfDocument(path)
    out = [doc[i].get_textpage().get_text_range() for i in range(min(n, len(doc)))]
    doc.close()
    return out


def pages_pypdf(path: str, n: int) -> list[str]:
    import pypdf

    reader = pypdf.PdfReader(path)
    return [reader.pages[i].extract_text() for i in range(min(n, len(reader.pages)))]


def pages_pdfminer(path: str, n: int) -> list[str]:
    from pdfminer.high_level import extract_text

    parts = extract_text(path, page_numbers=range(n)).split("\f")
    if parts and not parts[-1].strip():  # the text ends with a form feed
        parts.pop()
    return parts[:n]


EXTRACTORS = {"pypdfium2": pages_pdfium, "pypdf": pages_pypdf, "pdfminer.six": pages_pdfminer}


def compare_extractors(files: list[str], max_pages: int) -> dict:
    """Speed and output of each extractor on the first `max_pages` pages of each file."""
    words: dict[str, Counter] = {}
    rows = {}
    for name, fn in EXTRACTORS.items():
        start, pages, text = time.perf_counter(), 0, []
        for f in files:
            got = fn(f, max_pages)
            pages += len(got)
            text.extend(got)
        seconds = time.perf_counter() - start
        joined = "\n".join(text)
        words[name] = Counter(joined.replace("\ufffe", "").split())
        n_words = sum(words[name].values())
        rows[name] = {"pages": pages, "seconds": round(seconds, 2), "pages_per_s": round(pages / seconds, 1),
                      "chars": len(joined), "words": n_words,
                      "wordlike_share": round(sum(c for w, c in words[name].items() if _wordlike(w.strip(".,;:()"))) /
                                              max(n_words, 1), 4)}
    ref = words["pypdfium2"]
    for name in rows:  # agreement with pypdfium2's words (multiset Jaccard)
        inter, union = sum((words[name] & ref).values()), sum((words[name] | ref).values())
        rows[name]["word_jaccard_vs_pypdfium2"] = round(inter / union, 4) if union else 1.0
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pdfs", nargs="*", default=sorted(glob.glob(MANUALS)))
    parser.add_argument("--tokenizer", default="smollm2-135m-instruct")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--compare-pages", type=int, default=300, help="pages per file for the extractor comparison")
    parser.add_argument("--out", default=None, help="output folder (default: a fresh temporary one)")
    parser.add_argument("--json", default=None, help="write the result here as JSON")
    args = parser.parse_args()
    if not args.pdfs:
        print(f"no PDFs at {MANUALS}: run scripts/setup_data_deps.sh (installs r-doc-pdf)", file=sys.stderr)
        return 2
    out = Path(args.out or tempfile.mkdtemp(prefix="lmforge-bench-ingest-"))
    shutil.rmtree(out, ignore_errors=True)
    tokenizer = load_tokenizer(args.tokenizer)
    start = time.perf_counter()
    report = ingest(args.pdfs, out, tokenizer, IngestConfig(workers=args.workers, tokenizer_name=args.tokenizer),
                    progress=False)
    wall = time.perf_counter() - start
    print(summary(report))
    print(f"\nwhole pipeline, fresh: {wall:.1f} s wall for {report['totals']['pages']} pages "
          f"= {report['totals']['pages'] / wall:.0f} pages/s ({args.workers} workers)")
    t0 = time.perf_counter()
    again = ingest(args.pdfs, out, tokenizer, IngestConfig(workers=args.workers, tokenizer_name=args.tokenizer),
                   progress=False)
    resumed = time.perf_counter() - t0
    print(f"second run (all {again['totals']['files_cached']} files cached): {resumed:.1f} s")
    print("\ngarbage examples:")
    for g in report["garbage_examples"]:
        print(f"  {g['source']} p.{g['page']} score {g['score']:.2f}: {g['text'][:100]!r}")
    comparison = compare_extractors(args.pdfs, args.compare_pages)
    print(f"\nextractors on the first {args.compare_pages} pages of each file:")
    print(f"{'extractor':<14}{'pages':>7}{'s':>8}{'pages/s':>9}{'chars':>10}{'wordlike':>10}{'vs pdfium':>11}")
    for name, r in comparison.items():
        print(f"{name:<14}{r['pages']:>7}{r['seconds']:>8}{r['pages_per_s']:>9}{r['chars']:>10}"
              f"{r['wordlike_share']:>10}{r['word_jaccard_vs_pypdfium2']:>11}")
    result = {"pages": report["totals"]["pages"], "wall_seconds": round(wall, 2), "resume_seconds": round(resumed, 2),
              "workers": args.workers, "totals": report["totals"], "stages": report["stages"],
              "rules": report["rules"], "garbage_examples": report["garbage_examples"], "extractors": comparison}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

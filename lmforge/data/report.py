"""The run report of `lmforge ingest`: counts per stage, per cleaning rule and per file; timings;
a histogram PNG of garbage scores; a short table for the terminal."""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

from lmforge.atomic import atomic_write_bytes

STAGES = ("extract", "clean", "features", "garbage", "chunk")


def progress_bar(total: int, initial: int, enabled: bool):
    """A tqdm bar over files (files already done count from the start)."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="file", desc="ingest", disable=not enabled, dynamic_ncols=True)


def _file_entry(task: dict, doc: dict | None, res: dict | None, failures: dict, cached: set) -> dict:
    """One file's line in the report."""
    if doc is None or doc.get("error"):
        reason = failures.get(task["path"]) or (doc or {}).get("error", "unknown")
        return {"status": "failed", "reason": reason, "pages": (doc or {}).get("n_pages", 0)}
    res = res or {"chunks": [], "garbage": [], "seconds": {}, "garbage_chars": 0}
    return {
        "status": "cached" if task["path"] in cached else "ok",
        "pages": doc["n_pages"], "pages_read": doc["pages_read"], "pages_ocr": doc["pages_ocr"],
        "pages_skipped": doc["skipped"], "chars": len(doc["text"]), "paragraphs": len(doc["paragraphs"]),
        "garbage_paragraphs": len(res["garbage"]), "garbage_chars": res["garbage_chars"],
        "chunks": len(res["chunks"]), "rules": doc["counts"], "seconds": {**doc["seconds"], **res["seconds"]},
    }


def build(tasks: list[dict], docs: list, results: list, failures: dict, cached: set, chunks: list[dict],
          dup_log: list[dict], pretrain: list[dict], dedup_seconds: float, wall_seconds: float) -> dict:
    """The whole report as a JSON-able dict."""
    files = {t["path"]: _file_entry(t, d, r, failures, cached) for t, d, r in zip(tasks, docs, results)}
    ok = [f for f in files.values() if f["status"] != "failed"]
    pages = sum(f["pages_read"] for f in ok)
    rules: Counter = Counter()
    seconds: Counter = Counter()
    for f in ok:
        rules.update(f["rules"])
        seconds.update(f["seconds"])
    seconds["dedup"] = dedup_seconds
    chars = sum(f["chars"] for f in ok)
    garbage_chars = sum(f["garbage_chars"] for f in ok)
    kinds = Counter(r["kind"] for r in dup_log)
    examples = sorted((g for r in results if r for g in r["garbage"]), key=lambda g: -g["score"])
    return {
        "totals": {
            "files": len(files), "files_ok": len(ok), "files_cached": sum(f["status"] == "cached" for f in ok),
            "files_failed": len(files) - len(ok), "pages": pages,
            "pages_skipped": sum(len(f["pages_skipped"]) for f in ok), "pages_ocr": sum(f["pages_ocr"] for f in ok),
            "paragraphs": sum(f["paragraphs"] for f in ok), "garbage_paragraphs": sum(f["garbage_paragraphs"] for f in ok),
            "chars": chars, "garbage_chars": garbage_chars, "garbage_share": garbage_chars / chars if chars else 0.0,
            "chunks_before_dedup": sum(f["chunks"] for f in ok), "chunks": len(chunks),
            "exact_duplicates": kinds["exact"], "near_duplicates": kinds["near"], "pretrain_records": len(pretrain),
        },
        "rules": dict(rules),
        "stages": {s: {"seconds": round(seconds[s], 3), "pages_per_s": round(pages / seconds[s], 1) if seconds[s] else None}
                   for s in (*STAGES, "dedup")},
        "wall_seconds": round(wall_seconds, 3),
        "pages_per_s": round(pages / wall_seconds, 1) if wall_seconds else None,
        "garbage_examples": [{"source": Path(g["source"]).name, "page": g["page"], "score": g["score"],
                              "reasons": g["reasons"], "text": g["text"][:300]} for g in examples[:5]],
        "files": files,
    }


def histogram(scores: list[float], threshold: float, path: Path) -> None:
    """A PNG histogram of garbage scores with the threshold marked, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    ax.hist(scores, bins=50, range=(0, 1), color="#4c72b0")
    ax.axvline(threshold, color="#c44e52", linestyle="--", label=f"threshold {threshold:g}")
    ax.set_yscale("log")
    ax.set_xlabel("garbage score")
    ax.set_ylabel("paragraphs")
    ax.set_title(f"Garbage scores of {len(scores)} paragraphs")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def summary(report: dict) -> str:
    """A few lines for the terminal: totals, stage speeds, failures."""
    t = report["totals"]
    lines = [f"files {t['files_ok']}/{t['files']} ok ({t['files_cached']} cached, {t['files_failed']} failed), "
             f"pages {t['pages']} ({t['pages_skipped']} skipped, {t['pages_ocr']} OCR) in {report['wall_seconds']} s",
             f"paragraphs {t['paragraphs']}, garbage {t['garbage_paragraphs']} ({100 * t['garbage_share']:.1f}% of chars), "
             f"chunks {t['chunks']} (-{t['exact_duplicates']} exact, -{t['near_duplicates']} near duplicates)",
             "stage      seconds  pages/s"]
    lines += [f"{s:<10} {v['seconds']:>7.2f}  {v['pages_per_s'] or '-'}" for s, v in report["stages"].items()]
    lines += [f"FAILED {Path(p).name}: {f['reason']}" for p, f in report["files"].items() if f["status"] == "failed"]
    return "\n".join(lines)

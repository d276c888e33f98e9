"""Sparse attention prefill: lmforge's block-sparse kernel vs dense SDPA with the same mask (issue 18).

Pattern: a local window of 256 + 16 global tokens. At each length, one attention layer (batch 1, 8 heads of
64) and a whole tiny model (4 layers of that pattern, n_embd 256 in 4 heads of 64, SwiGLU 688), forward and
forward+backward.
Dense is torch's F.scaled_dot_product_attention with the pattern's boolean mask as attn_mask, the mask built
once outside the timing; block-sparse is timed with its plan (tiles and element masks) included. Each round
runs both engines (the order alternates by round); medians, and the speed-up is the median of per-round
ratios. The output difference is max |block-sparse - dense| over the layer's outputs or the model's logits.
Run from the repository root:

    python bench/bench_sparse.py                      # 4k, 8k, 16k tokens, 3 rounds; writes results and docs
    python bench/bench_sparse.py --quick              # 1k and 2k tokens, 1 round; prints only
    python bench/bench_sparse.py --lengths 8192 --rounds 5 --no-backward --no-write
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

from lmforge.config import Config
from lmforge.model import sparse
from lmforge.model.masks import attention_mask
from lmforge.model.sparse import block_sparse_attention, build_plan, sparse_context
from lmforge.model.transformer import build_model

ROOT = Path(__file__).resolve().parent.parent
PATTERN = {"window": 256, "global_tokens": 16}  # issue 18's benchmark pattern
HEADS, HEAD_DIM = 8, 64
TARGET, TARGET_TOKENS = 4.0, 8192  # >= 4x at 8k tokens with equal output
EQUAL = 1e-4  # fp32: outputs within this of each other count as equal


def _timed(fn) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def layer_engines(T: int, backward: bool) -> dict:
    """dense / block-sparse callables for one attention layer over T tokens; each returns its output."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, T, HEAD_DIM, requires_grad=backward) for _ in range(3))
    grad = torch.randn(1, HEADS, T, HEAD_DIM)
    pos = torch.arange(T)[None]
    mask = attention_mask(pos, pos, None, pattern=PATTERN)  # (1, 1, T, T), built once
    scale = HEAD_DIM ** -0.5

    def run(attend):
        def step():
            with torch.set_grad_enabled(backward):
                out = attend()
                if backward:
                    q.grad = k.grad = v.grad = None
                    out.backward(grad)
            return out.detach()
        return step

    return {"dense SDPA": run(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)),
            "block-sparse": run(lambda: block_sparse_attention(q, k, v, build_plan(PATTERN, pos, pos), scale))}


def model_engines(T: int, backward: bool) -> dict:
    """dense / block-sparse callables for a whole tiny model over T tokens; each returns the logits."""
    torch.manual_seed(0)
    config = Config(name="bench-sparse", vocab_size=256, n_layer=4, n_embd=4 * HEAD_DIM, n_head=4,
                    intermediate_size=688, block_size=T, layer_types=["local"] * 4,  # 688 ~ 8/3 n_embd (LLaMA)
                    sparse_patterns={"local": PATTERN})
    model = build_model(config).train(backward)
    ids = torch.randint(0, 256, (1, T))
    pos = torch.arange(T)[None]
    with sparse.dense():  # the same pattern mask, built once for SDPA
        contexts = {"local": sparse_context(PATTERN, model.rope_at("local", pos), pos, None)}

    def run(forward):
        def step():
            with torch.set_grad_enabled(backward):
                logits = forward()
                if backward:
                    model.zero_grad(set_to_none=True)
                    F.cross_entropy(logits[0, :-1].float(), ids[0, 1:]).backward()
            return logits.detach()
        return step

    return {"dense SDPA": run(lambda: model(ids, contexts=contexts)), "block-sparse": run(lambda: model(ids))}


def measure(case: str, T: int, backward: bool, rounds: int) -> dict:
    """Seconds per call of both engines over `rounds` (after an untimed warm-up), and their output gap."""
    engines = (layer_engines if case == "layer" else model_engines)(T, backward)
    outs = {name: fn() for name, fn in engines.items()}  # warm-up, and the outputs compared
    times = {name: [] for name in engines}
    for r in range(rounds):
        for name in (list(engines) if r % 2 == 0 else list(engines)[::-1]):
            times[name].append(_timed(engines[name])[0])
    dense, ours = times["dense SDPA"], times["block-sparse"]
    pos = torch.arange(T)[None]
    plan = build_plan(PATTERN, pos, pos)
    n = plan.index.shape[0]
    return {"case": case, "tokens": T, "pass": "forward+backward" if backward else "forward",
            "dense_s": dense, "sparse_s": ours, "speedup": statistics.median(d / s for d, s in zip(dense, ours)),
            "max_diff": float((outs["dense SDPA"] - outs["block-sparse"]).abs().max()),
            "tiles": plan.tiles, "causal_tiles": n * (n + 1) // 2}


def table(results: list[dict]) -> str:
    lines = ["| case | tokens | pass | dense SDPA s | block-sparse s | speed-up | max abs diff | tiles computed |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        lines.append(f"| {r['case']} | {r['tokens']} | {r['pass']} | {statistics.median(r['dense_s']):.3f} | "
                     f"{statistics.median(r['sparse_s']):.3f} | {r['speedup']:.2f}x | {r['max_diff']:.1e} | "
                     f"{r['tiles']} of {r['causal_tiles']} |")
    return "\n".join(lines)


def verdicts(results: list[dict]) -> list[str]:
    """The issue's target (>= 4x at 8k, equal output) for each case and pass measured at 8k."""
    lines = []
    for r in results:
        if r["tokens"] == TARGET_TOKENS:
            met = "met" if r["speedup"] >= TARGET and r["max_diff"] <= EQUAL else "NOT met"
            lines.append(f"{r['case']} {r['pass']} at {TARGET_TOKENS}: {r['speedup']:.2f}x, max diff "
                         f"{r['max_diff']:.1e}: target (>= {TARGET:g}x, diff <= {EQUAL:g}) {met}")
    return lines


def write_docs(text: str, meta: dict, verdict: list[str]) -> None:
    from lmforge.benchmark import write_docs_section

    section = (
        f"## Sparse attention: block-sparse vs dense SDPA with the same mask\n\n```bash\n{meta['command']}\n```\n\n"
        f"{meta['date']}, {meta['machine']}, {meta['threads']} threads; torch {meta['torch']}; load average "
        f"before: {meta['loadavg']:.2f}. Pattern: window 256 + 16 global tokens; one layer is batch 1, 8 heads "
        f"of 64; the model has 4 layers of that pattern (n_embd 256, 4 heads of 64, SwiGLU width 688). Dense "
        f"SDPA's mask is built outside the timing, the block-sparse plan inside it. {meta['rounds']} rounds, "
        f"medians; speed-up = median of per-round ratios.\n\n{text}\n\n" + "".join(f"- {line}\n" for line in verdict) +
        "\nRaw numbers: `bench/results/sparse.json`.")
    write_docs_section(ROOT / "docs" / "benchmarks.md", "sparse", section)
    write_docs_section(ROOT / "docs" / "sparse_attention.md", "sparse-results", section.replace("## ", "### ", 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--no-backward", action="store_true", help="forward passes only")
    parser.add_argument("--quick", action="store_true", help="1k and 2k tokens, 1 round; writes nothing")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs and results alone")
    args = parser.parse_args()
    if args.quick:
        args.lengths, args.rounds, args.no_write = [1024, 2048], 1, True
    torch.set_num_threads(args.threads)
    meta = {"date": date.today().isoformat(), "machine": f"{os.cpu_count()} CPUs", "threads": args.threads,
            "torch": torch.__version__, "loadavg": os.getloadavg()[0], "rounds": args.rounds,
            "pattern": PATTERN, "command": "python bench/bench_sparse.py" + "".join(
                f" {shlex.quote(a)}" for a in sys.argv[1:])}
    results = []
    for T in args.lengths:
        for case in ("layer", "model"):
            for backward in (False,) if args.no_backward else (False, True):
                results.append(measure(case, T, backward, args.rounds))
                print(table(results[-1:]).splitlines()[-1], flush=True)
    meta["loadavg_after"] = os.getloadavg()[0]
    text, verdict = table(results), verdicts(results)
    print(text, *verdict, sep="\n")
    if not args.no_write:
        (ROOT / "bench" / "results").mkdir(exist_ok=True)
        out = ROOT / "bench" / "results" / "sparse.json"
        out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
        write_docs(text, meta, verdict)


if __name__ == "__main__":
    main()

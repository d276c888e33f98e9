"""Decode kernels: lmforge's GEMVs vs torch's (MKL, packed int4) over SmolLM2-135M's linear shapes.

One "pass" runs every linear of SmolLM2-135M once (30 layers of q, k, v, o, gate, up, down and
the 49152-row lm_head: 540 MB of fp32 weights, so a pass streams from memory, as a decode step
does) for M rows of input. Rounds interleave the engines; medians of per-round ratios. Run:

    python bench/bench_kernels.py            # 3 rounds, writes docs/benchmarks.md and bench/results/kernels.json
    python bench/bench_kernels.py --quick    # 1 round, prints only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

from lmforge.kernels import gemv
from lmforge.quantization.int4 import Int4Linear, quantize_rtn

ROOT = Path(__file__).resolve().parent.parent
LAYER = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
SHAPES = LAYER * 30 + [(49152, 576)]
F32_ROWS, INT4_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512), (1, 2, 4, 8)


def time_pass(fn, weights, m: int, repeats: int) -> float:
    """Milliseconds per pass of fn(x, w) over all weights, after one untimed pass."""
    xs = {k: torch.randn(m, k) for k in (576, 1536)}
    for w, k in weights:
        fn(xs[k], w)
    start = time.perf_counter()
    for _ in range(repeats):
        for w, k in weights:
            fn(xs[k], w)
    return (time.perf_counter() - start) / repeats * 1e3


def f32_engines(ext) -> dict:
    torch.manual_seed(0)
    rows = [torch.randn(n, k) * 0.02 for n, k in SHAPES]
    return {"lmforge linear_f32": (ext.linear_f32, [(w, w.shape[1]) for w in rows]),
            "torch F.linear (row-major)": (F.linear, [(w, w.shape[1]) for w in rows]),
            "torch F.linear (column-major)": (F.linear, [(w.t().contiguous().t(), w.shape[1]) for w in rows])}


def int4_engines(ext) -> dict:
    torch.manual_seed(0)
    mods = []
    for n, k in SHAPES:
        q, scale, zero = quantize_rtn(torch.randn(n, k) * 0.02, 128)
        mods.append((Int4Linear.from_codes(q, scale, zero, 128), q))
    ours = [((ext.int4_pack(q), m.scale, m.zero), m.in_features) for m, q in mods]
    theirs = [(m, m.in_features) for m, _ in mods]
    for m, _ in mods:
        m.kernel_weight()  # pack for torch's kernel outside the timing

    def torch_int4(x, m):
        packed, scales_and_zeros = m.kernel_weight()
        xb = F.pad(x.to(torch.bfloat16), (0, m.padded_in - m.in_features))
        return torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed, 128, scales_and_zeros)

    return {"lmforge int4_linear": (lambda x, w: ext.int4_linear(x, *w, 128), ours),
            "torch _weight_int4pack_mm (bf16 x)": (torch_int4, theirs)}


def measure(rounds: int, repeats: int) -> dict:
    ext = gemv.extension()
    if ext is None:
        raise SystemExit("lmforge's kernels could not be built here (see the warning above)")
    results = {}
    for kind, engines, row_counts in (("fp32", f32_engines(ext), F32_ROWS), ("int4 g128", int4_engines(ext), INT4_ROWS)):
        for m in row_counts:
            times = {name: [] for name in engines}
            for r in range(rounds):
                order = list(engines)[r % len(engines):] + list(engines)[:r % len(engines)]
                for name in order:
                    fn, weights = engines[name]
                    times[name].append(time_pass(fn, weights, m, repeats))
            results[f"{kind} M={m}"] = times
            print(kind, f"M={m}", {k: f"{statistics.median(v):.1f} ms" for k, v in times.items()}, flush=True)
    return results


def table(results: dict) -> str:
    lines = ["| weights, rows M | engine | ms per pass | lmforge speed-up |", "| --- | --- | --- | --- |"]
    for key, times in results.items():
        ours_name = next(n for n in times if n.startswith("lmforge"))
        for name, values in times.items():
            ratio = "-" if name == ours_name else \
                f"{statistics.median(t / o for t, o in zip(values, times[ours_name])):.2f}x"
            lines.append(f"| {key} | {name} | {statistics.median(values):.1f} | {ratio} |")
    return "\n".join(lines)


def write_docs(text: str, command: str, meta: dict) -> None:
    from lmforge.benchmark import write_docs_section

    section = (
        f"## Decode kernels: lmforge's GEMVs vs torch's on SmolLM2-135M's shapes\n\n```bash\n{command}\n"
        f"```\n\n{meta['date']}, {meta['machine']}, {meta['threads']} threads; torch {meta['torch']}; load "
        f"average before: {meta['loadavg']:.2f}.\n\nOne pass runs every linear of SmolLM2-135M once for M rows "
        f"of random input (30 x q, k, v, o, gate, up, down, and the lm_head), the products of one decode step "
        f"at batch M; the fp32 weights (540 MB) stream from memory as in a real step. {meta['rounds']} "
        f"interleaved rounds of {meta['repeats']} passes, medians; the speed-up is the median of per-round "
        f"ratios. lmforge's int4 kernel rounds its inputs to int8 per 32 columns on VNNI CPUs "
        f"({meta['int8_inputs']} here); torch's computes in bf16.\n\n{text}\n\nRaw numbers: "
        f"`bench/results/kernels.json`.")
    write_docs_section(ROOT / "docs" / "benchmarks.md", "kernels", section)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5, help="passes per timing")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--quick", action="store_true", help="1 round of 2 passes; writes nothing")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rounds, repeats = (1, 2) if args.quick else (args.rounds, args.repeats)
    meta = {"date": date.today().isoformat(), "machine": f"{os.cpu_count()} CPUs", "threads": args.threads,
            "torch": torch.__version__, "loadavg": os.getloadavg()[0], "rounds": rounds, "repeats": repeats}
    results = measure(rounds, repeats)
    meta["int8_inputs"] = "yes" if gemv.extension().INT4_INT8_INPUTS else "no"
    text = table(results)
    print(text)
    if not args.quick:
        (ROOT / "bench" / "results").mkdir(exist_ok=True)
        (ROOT / "bench" / "results" / "kernels.json").write_text(json.dumps({"meta": meta, "ms": results}, indent=1))
        write_docs(text, "python bench/bench_kernels.py", meta)


if __name__ == "__main__":
    main()

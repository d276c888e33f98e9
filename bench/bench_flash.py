"""Flash attention benchmark (issue 18): lmforge's CPU flash vs torch SDPA and SDPA's math path; Triton on a GPU.

CPU: causal self-attention of one head group (--heads query heads over one key/value head, head_dim 64,
batch 1). Peak memory of forward+backward at each length, every (implementation, length) in a fresh
process: the peak resident set (VmHWM, reset through /proc/self/clear_refs once the inputs exist)
minus the resident set then. Implementations: lmforge flash (`lmforge.model.flash`), torch SDPA (its
fused CPU kernel) and `lmforge.model.attention.math_attention`, the (T, S) score matrix as SDPA's math
path builds it; a math case whose estimate passes --math-limit-gib is skipped and listed. Time: flash
vs SDPA, forward (no grad) and forward+backward, implementations alternating within each round, one
process per length. Target: flash within 1.5x of SDPA's time; its memory linear in the length.

GPU (--gpu; skipped without CUDA): the Triton kernels (lmforge/kernels/flash_triton.py) forward+backward
vs SDPA's flash backend, bf16, causal, 16 heads, 16k tokens per batch at 4k, 8k and 16k tokens per
sequence; block sizes chosen at 8k among a few. Target >= 0.8x SDPA's speed.

    python bench/bench_flash.py                      # CPU: 8k, 16k, 32k tokens, 3 rounds; writes results + docs
    python bench/bench_flash.py --quick              # CPU: 1k and 2k tokens, 1 round; writes nothing
    python bench/bench_flash.py --gpu                # GPU: writes bench/results/flash_gpu.json + docs
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMPLS = ("flash", "sdpa", "math")
MATH_COPIES = 4  # (T, S) fp32 matrices math_attention holds at once in forward+backward (3.3 measured at 4k)


# --- workers: one case in a fresh process -----------------------------------------------------

def _status_kib(field: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])


def _attention(impl: str):
    """The causal attention callable (q, k, v) -> out of one implementation."""
    import torch.nn.functional as F

    from lmforge.model.attention import math_attention
    from lmforge.model.flash import flash_attention

    if impl == "flash":
        return lambda q, k, v: flash_attention(q, k, v, causal=True)
    if impl == "sdpa":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                              enable_gqa=q.shape[1] != k.shape[1])
    return lambda q, k, v: math_attention(q, k, v, None, True, q.shape[-1] ** -0.5)


def _inputs(T: int, args, grad: bool):
    import torch

    torch.manual_seed(0)
    return tuple(torch.randn(1, h, T, args.head_dim, requires_grad=grad) for h in (args.heads, 1, 1))


def memory_worker(impl: str, T: int, args) -> dict:
    """Peak MiB above the resident set with inputs in place, for one forward+backward."""
    import torch

    torch.set_num_threads(args.threads)
    fn = _attention(impl)
    q, k, v = _inputs(T, args, grad=True)
    fn(*_inputs(256, args, grad=True)).sum().backward()  # first-call set-up out of the measurement
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    fn(q, k, v).sum().backward()
    return {"peak_mib": (_status_kib("VmHWM") - before) / 1024, "seconds": time.perf_counter() - start}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def time_worker(T: int, args) -> dict:
    """Seconds of forward and forward+backward per round, flash and SDPA alternating."""
    import torch

    torch.set_num_threads(args.threads)
    q, k, v = _inputs(T, args, grad=True)
    fns = {impl: _attention(impl) for impl in ("flash", "sdpa")}
    out: dict = {impl: {"fwd": [], "fwd_bwd": []} for impl in fns}
    for fn in fns.values():  # warm-up at a small size
        fn(*_inputs(512, args, grad=True)).sum().backward()
    for r in range(args.rounds):
        for impl in (("flash", "sdpa") if r % 2 == 0 else ("sdpa", "flash")):
            fn = fns[impl]
            with torch.no_grad():
                out[impl]["fwd"].append(_timed(lambda: fn(q, k, v)))
            out[impl]["fwd_bwd"].append(_timed(lambda: fn(q, k, v).sum().backward()))
    return out


def spawn(kind: str, T: int, args, impl: str = "") -> dict | None:
    """Run one worker in a fresh process; its JSON result, or None with the error's last line."""
    cmd = [sys.executable, __file__, "--worker", kind, "--impl", impl or "-", "--length", str(T),
           "--heads", str(args.heads), "--head-dim", str(args.head_dim), "--threads", str(args.threads),
           "--rounds", str(args.rounds)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"]
        print(f"{kind} {impl} {T}: worker failed: {tail[0]}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- CPU parent: cases, table, plot, docs -----------------------------------------------------

def math_estimate_gib(T: int, args) -> float:
    """What math_attention's forward+backward holds at once: MATH_COPIES (T, T) fp32 matrices per head."""
    return MATH_COPIES * args.heads * T * T * 4 / 2**30


def cpu_bench(args) -> dict:
    """Memory per (implementation, length) and timing per length, each in fresh processes."""
    memory: dict = {impl: {} for impl in IMPLS}
    skipped = []
    for T in args.lengths:
        for impl in IMPLS:
            if impl == "math" and math_estimate_gib(T, args) > args.math_limit_gib:
                skipped.append(f"math at {T} tokens (estimate {math_estimate_gib(T, args):.1f} GiB)")
                continue
            print(f"memory: {impl} at {T} tokens", file=sys.stderr)
            result = spawn("memory", T, args, impl)
            if result:
                memory[impl][T] = result
    timing = {}
    for T in args.lengths:
        print(f"time: flash vs sdpa at {T} tokens, {args.rounds} round(s)", file=sys.stderr)
        timing[T] = spawn("time", T, args)
    return {"memory": memory, "timing": timing, "skipped": skipped}


def _ratio(timing: dict, kind: str) -> tuple[float, float, float]:
    """Median, min and max of flash/SDPA over rounds (each round's own pair)."""
    ratios = [f / s for f, s in zip(timing["flash"][kind], timing["sdpa"][kind])]
    return statistics.median(ratios), min(ratios), max(ratios)


def cpu_table(result: dict, args) -> str:
    """Markdown table (memory and time per length) and verdict lines."""
    mem, timing = result["memory"], result["timing"]
    lines = ["| tokens | flash peak MiB | SDPA peak MiB | math peak MiB | flash fwd s | SDPA fwd s | flash/SDPA fwd | "
             "flash fwd+bwd s | SDPA fwd+bwd s | flash/SDPA fwd+bwd |", "| --- " * 10 + "|"]
    verdicts = []
    for T in args.lengths:
        cells = [f"{mem[i][T]['peak_mib']:.0f}" if T in mem[i] else "skipped" for i in IMPLS]
        t = timing.get(T)
        if t:
            for kind in ("fwd", "fwd_bwd"):
                med, lo, hi = _ratio(t, kind)
                cells += [f"{statistics.median(t['flash'][kind]):.3f}", f"{statistics.median(t['sdpa'][kind]):.3f}",
                          f"{med:.2f}x ({lo:.2f}-{hi:.2f})"]
                met = "met" if hi <= 1.5 else ("NOT met" if lo > 1.5 else "inconclusive (rounds straddle it)")
                verdicts.append(f"- {T} tokens, {kind.replace('_', '+')}: flash/SDPA time {med:.2f}x "
                                f"(target <= 1.5x) — {met}")
        else:
            cells += ["-"] * 6
        lines.append(f"| {T} | " + " | ".join(cells) + " |")
    flash = [(T, mem["flash"][T]["peak_mib"]) for T in args.lengths if T in mem["flash"]]
    for (t0, m0), (t1, m1) in zip(flash, flash[1:]):
        verdicts.append(f"- flash peak memory {t0} -> {t1} tokens: {m1 / m0:.2f}x for {t1 / t0:.0f}x the tokens "
                        f"(linear: {t1 / t0:.0f}x, quadratic: {(t1 / t0) ** 2:.0f}x)")
    for T in args.lengths:
        if T in mem["math"] and T in mem["flash"]:
            verdicts.append(f"- {T} tokens: math path / flash peak memory {mem['math'][T]['peak_mib'] / mem['flash'][T]['peak_mib']:.0f}x")
    verdicts += [f"- skipped: {s} > {args.math_limit_gib} GiB" for s in result["skipped"]]
    return "\n".join(lines + [""] + verdicts)


def plot_memory(result: dict, args, path: Path) -> None:
    """Peak memory against sequence length, one line per implementation (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for impl, label in zip(IMPLS, ("lmforge flash", "torch SDPA (fused CPU kernel)", "math path (T x S scores)")):
        points = sorted(result["memory"][impl].items(), key=lambda x: int(x[0]))
        if points:
            ax.plot([int(t) for t, _ in points], [m["peak_mib"] for _, m in points], marker="o", label=label)
    ax.set(xscale="log", yscale="log", xlabel="tokens", ylabel="peak memory above inputs (MiB)",
           title=f"Causal attention forward+backward, {args.heads} head(s), head_dim {args.head_dim}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# --- GPU: Triton vs SDPA's flash backend --------------------------------------------------------

FWD_CHOICES = ((128, 64), (64, 64), (128, 32))
BWD_CHOICES = ((64, 64), (32, 64), (64, 32), (128, 64))


def gpu_bench(args) -> dict | None:
    """Forward+backward ms of Triton and SDPA-flash per length; blocks chosen at the middle length."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench

    from lmforge.kernels.flash_triton import flash_attention_triton

    def inputs(T: int):
        shape = (max(1, args.gpu_tokens // T), args.gpu_heads, T, args.gpu_head_dim)
        return [torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]

    def fwd_bwd(fn, q, k, v):
        grad = torch.randn_like(q)
        return do_bench(lambda: fn(q, k, v).backward(grad), grad_to_none=[q, k, v])

    def sdpa(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def triton_fn(fwd, bwd):
        return lambda q, k, v: flash_attention_triton(q, k, v, causal=True, fwd_blocks=fwd, bwd_blocks=bwd)

    q, k, v = inputs(8192)
    fwd = min(FWD_CHOICES, key=lambda b: do_bench(lambda: triton_fn(b, BWD_CHOICES[0])(q, k, v)))
    bwd = min(BWD_CHOICES, key=lambda b: fwd_bwd(triton_fn(fwd, b), q, k, v))
    rows = {}
    for T in (4096, 8192, 16384):
        q, k, v = inputs(T)
        with torch.no_grad():
            err = (triton_fn(fwd, bwd)(q, k, v).float() - sdpa(q, k, v).float()).abs().max().item()
        rows[T] = {"batch": q.shape[0], "triton_ms": fwd_bwd(triton_fn(fwd, bwd), q, k, v),
                   "sdpa_flash_ms": fwd_bwd(sdpa, q, k, v), "max_abs_diff_out": err}
    return {"device": torch.cuda.get_device_name(), "fwd_blocks": fwd, "bwd_blocks": bwd, "rows": rows,
            "torch": torch.__version__}


def gpu_table(result: dict, args) -> str:
    lines = [f"{result['device']}, torch {result['torch']}; Triton blocks fwd {tuple(result['fwd_blocks'])}, "
             f"bwd {tuple(result['bwd_blocks'])}", "",
             "| tokens | batch | Triton fwd+bwd ms | SDPA flash fwd+bwd ms | Triton speed / SDPA | max abs diff |",
             "| --- | --- | --- | --- | --- | --- |"]
    for T, r in result["rows"].items():
        speed = r["sdpa_flash_ms"] / r["triton_ms"]
        lines.append(f"| {T} | {r['batch']} | {r['triton_ms']:.2f} | {r['sdpa_flash_ms']:.2f} | {speed:.2f}x "
                     f"({'met' if speed >= 0.8 else 'NOT met'}, target >= 0.8x) | {r['max_abs_diff_out']:.3g} |")
    return "\n".join(lines)


# --- entry ----------------------------------------------------------------------------------------

def write_docs(name: str, title: str, command: str, text: str, note: str) -> None:
    from lmforge.benchmark import write_docs_section

    write_docs_section(ROOT / "docs" / "benchmarks.md", name,
                       f"## {title}\n\n```bash\n{command}\n```\n\n{note}\n\n{text}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[8192, 16384, 32768])
    parser.add_argument("--heads", type=int, default=1, help="query heads over the one key/value head")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--math-limit-gib", type=float, default=8.0)
    parser.add_argument("--quick", action="store_true", help="1k and 2k tokens, 1 round; writes nothing")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--gpu", action="store_true", help="Triton vs SDPA flash on CUDA (skips without it)")
    parser.add_argument("--gpu-tokens", type=int, default=16384, help="tokens per batch in GPU mode")
    parser.add_argument("--gpu-heads", type=int, default=16)
    parser.add_argument("--gpu-head-dim", type=int, default=128)
    for hidden in ("--worker", "--impl", "--length"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.worker:
        T = int(args.length)
        out = memory_worker(args.impl, T, args) if args.worker == "memory" else time_worker(T, args)
        print(json.dumps(out))
        return
    command = "python bench/bench_flash.py" + "".join(f" {shlex.quote(a)}" for a in sys.argv[1:])
    if args.quick:
        args.lengths, args.rounds, args.no_write = [1024, 2048], 1, True
    if args.gpu:
        return run_gpu(args, command)
    load = os.getloadavg()[0]
    result = cpu_bench(args)
    text = cpu_table(result, args)
    print(text)
    if args.no_write:
        return
    meta = {"command": command, "date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "threads": args.threads,
            "heads": args.heads, "head_dim": args.head_dim, "loadavg_before": load, "loadavg_after": os.getloadavg()[0]}
    (ROOT / "bench" / "results" / "flash.json").write_text(json.dumps({"meta": meta, **result}, indent=2))
    plot_memory(result, args, ROOT / "bench" / "results" / "flash_memory.png")
    note = (f"{meta['date']}, {meta['cpus']} CPUs, {args.threads} threads; load average {load:.2f} before, "
            f"{meta['loadavg_after']:.2f} after. Causal attention, batch 1, {args.heads} query head(s) over one "
            f"key/value head, head_dim {args.head_dim}, fp32. Peak memory: forward+backward, each case in a fresh "
            f"process. Time: medians of {args.rounds} rounds; ratios are per-round pairs, median (min-max). "
            f"Plot: `bench/results/flash_memory.png`; raw numbers: `bench/results/flash.json`.")
    write_docs("flash", "Flash attention on the CPU: memory and time vs torch SDPA", command, text, note)


def run_gpu(args, command: str) -> None:
    """GPU mode: skip cleanly without CUDA or Triton."""
    import importlib.util

    import torch

    if not torch.cuda.is_available() or importlib.util.find_spec("triton") is None:
        print("GPU mode skipped: needs a CUDA device and triton")
        return
    result = gpu_bench(args)
    text = gpu_table(result, args)
    print(text)
    if args.no_write:
        return
    (ROOT / "bench" / "results" / "flash_gpu.json").write_text(json.dumps({"command": command, **result}, indent=2))
    note = (f"Causal, bf16, {args.gpu_heads} heads, head_dim {args.gpu_head_dim}, {args.gpu_tokens} tokens per "
            f"batch; forward+backward timed by triton.testing.do_bench (median ms).")
    write_docs("flash-gpu", "Flash attention on a GPU: Triton kernels vs SDPA's flash backend", command, text, note)


if __name__ == "__main__":
    main()

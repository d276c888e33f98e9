"""Mamba benchmark (issue 22): the selective scan, decoding at long contexts, and training from scratch.

(a) scan: lmforge's parallel scan (ssm.selective_scan) vs the same recurrence one token at a time
    (ssm.sequential_scan), batch 1, the bench Mamba's inner width, 1k-16k tokens; forward, and
    forward+backward up to --backward-max tokens; the max relative difference of their outputs.
(b) decode: a transformer and a Mamba model of equal parameters (bench/ssm_train.py builds the pair),
    each prefilled with 1k-16k random tokens, then --steps greedy decode steps timed; the memory is
    what the cache holds for that context (the KV cache grows with it, the SSM state does not). The
    transformer runs twice: through lmforge's fused C++ decode step (its default) and through the
    PyTorch forward Mamba uses too.
(c) train: both models trained from scratch on the same bytes for the same steps, held-out loss
    (bench/ssm_train.py has the text and its split).
Run from the repository root:

    python bench/bench_ssm.py                      # all three parts, about 10 minutes on 2 cores
    python bench/bench_ssm.py --parts scan decode  # a subset
    python bench/bench_ssm.py --quick              # short lengths, a few steps; writes nothing
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ssm_train import model_pair, param_count, run_training  # noqa: E402

from lmforge.generation import fused_decode  # noqa: E402
from lmforge.generation.generate import decode_one_token, prefill  # noqa: E402
from lmforge.generation.state_cache import make_cache  # noqa: E402
from lmforge.model import ssm  # noqa: E402
from lmforge.model.transformer import build_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# --- (a) scan --------------------------------------------------------------------------------

def scan_inputs(T: int, D: int, N: int, grad: bool) -> list[torch.Tensor]:
    """u, delta, A, B, C as a Mamba layer makes them (delta from softplus, A = -(1..N) as initialised)."""
    torch.manual_seed(0)
    u, B, C = torch.randn(1, T, D), torch.randn(1, T, N), torch.randn(1, T, N)
    delta = torch.nn.functional.softplus(torch.randn(1, T, D) - 3)
    A = -torch.arange(1, N + 1, dtype=torch.float32).expand(D, N).contiguous()
    return [t.requires_grad_(grad) for t in (u, delta, A, B, C)]


def scan_case(T: int, D: int, N: int, backward: bool, rounds: int) -> dict:
    """Seconds per call of both scans (rounds alternate their order) and their output difference."""
    inputs = scan_inputs(T, D, N, backward)
    weight = torch.randn(1, T, D)

    def run(scan):
        def call():
            with torch.set_grad_enabled(backward):
                y, _ = scan(*inputs)
                if backward:
                    (y * weight).sum().backward()
            return y.detach()
        return call

    engines = {"parallel": run(ssm.selective_scan), "sequential": run(ssm.sequential_scan)}
    outs = {name: fn() for name, fn in engines.items()}  # warm-up, and the outputs compared
    times = {name: [] for name in engines}
    for r in range(rounds):
        for name in (list(engines) if r % 2 == 0 else list(engines)[::-1]):
            times[name].append(_timed(engines[name]))
    gap = float((outs["parallel"] - outs["sequential"]).abs().max() / outs["sequential"].abs().max())
    return {"tokens": T, "pass": "forward+backward" if backward else "forward", "parallel_s": times["parallel"],
            "sequential_s": times["sequential"], "max_rel_diff": gap,
            "speedup": statistics.median(s / p for s, p in zip(times["sequential"], times["parallel"]))}


def run_scan(args, d_inner: int) -> list[dict]:
    """Every length, forward (and forward+backward up to --backward-max), after an untimed small case."""
    scan_case(64, d_inner, 16, True, 1)
    out = []
    for T in args.lengths:
        for backward in (False, True) if T <= args.backward_max else (False,):
            out.append(scan_case(T, d_inner, 16, backward, args.rounds))
            r = out[-1]
            print(f"scan {T} {r['pass']}: parallel {min(r['parallel_s']):.3f}s, sequential "
                  f"{min(r['sequential_s']):.3f}s, rel diff {r['max_rel_diff']:.1e}", flush=True)
    return out


# --- (b) decode ------------------------------------------------------------------------------

def cache_bytes(config, context: int) -> int:
    """Bytes the decoding cache holds for one sequence of `context` tokens (built on the meta device)."""
    cache = make_cache(config, 1, context, device="meta")
    if hasattr(cache, "nbytes"):
        return cache.nbytes()
    tensors = [t for t in cache.k + cache.v if t is not None] + [cache.positions, cache.valid]
    return sum(t.numel() * t.element_size() for t in tensors)


@torch.inference_mode()
def decode_case(model, context: int, steps: int, paths: dict[str, bool]) -> dict[str, dict]:
    """Prefill `context` random tokens, then per path (name -> fused step or not) time `steps` greedy
    decode steps after 2 untimed ones; the paths continue the same cache one after another."""
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, context))
    cache = make_cache(model.config, 1, context + len(paths) * (steps + 2))
    prefill_s = time.perf_counter()
    logits, pos = prefill(model, ids, torch.ones_like(ids, dtype=torch.bool), cache)
    prefill_s = time.perf_counter() - prefill_s
    out = {}
    for name, fused in paths.items():
        times = []
        for i in range(steps + 2):
            token = logits.argmax(-1)
            start = time.perf_counter()
            with contextlib.nullcontext() if fused else fused_decode.disabled():
                logits = decode_one_token(model, token, pos, cache, aligned=True)
            if i >= 2:
                times.append(time.perf_counter() - start)
            pos = pos + 1
        out[name] = {"context": context, "prefill_s": prefill_s, "step_ms": statistics.median(times) * 1e3,
                     "step_ms_min": min(times) * 1e3, "cache_bytes": cache_bytes(model.config, context),
                     "bytes_per_new_token": cache_bytes(model.config, context + 1) - cache_bytes(model.config, context)}
    return out


def run_decode(args, transformer_config, mamba_config) -> dict:
    """Decode timings and cache sizes per context: the transformer by both paths, Mamba by its forward."""
    models = [(build_model(transformer_config).eval(), {"transformer (fused C++ step)": True,
                                                        "transformer (PyTorch forward)": False}),
              (build_model(mamba_config).eval(), {"mamba (PyTorch forward)": False})]
    for model, paths in models:  # untimed warm-up: lazy tables, the kernels' first calls
        decode_case(model, 64, 2, paths)
    out: dict[str, list] = {name: [] for _, paths in models for name in paths}
    for context in args.contexts:
        for model, paths in models:
            for name, r in decode_case(model, context, args.steps, paths).items():
                out[name].append(r)
                print(f"decode {name} at {context}: {r['step_ms']:.2f} ms/token, cache "
                      f"{r['cache_bytes'] / 2**20:.2f} MiB, prefill {r['prefill_s']:.1f}s", flush=True)
    return out


# --- report ----------------------------------------------------------------------------------

def scan_table(rows: list[dict]) -> str:
    lines = ["| tokens | pass | parallel s | sequential s | sequential / parallel | max rel diff |",
             "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['tokens']} | {r['pass']} | {statistics.median(r['parallel_s']):.3f} | "
              f"{statistics.median(r['sequential_s']):.3f} | {r['speedup']:.2f}x | {r['max_rel_diff']:.1e} |"
              for r in rows]
    return "\n".join(lines)


def decode_table(decode: dict) -> str:
    lines = ["| model | context | decode ms/token | cache MiB | cache bytes per new token | prefill s |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, rows in decode.items():
        lines += [f"| {name} | {r['context']} | {r['step_ms']:.2f} | {r['cache_bytes'] / 2**20:.3f} | "
                  f"{r['bytes_per_new_token']} | {r['prefill_s']:.1f} |" for r in rows]
    return "\n".join(lines)


def train_table(train: dict) -> str:
    names = [n for n in train if n != "corpora"]
    held = list(train[names[0]]["held_out"])
    lines = ["| model | parameters | layers | bytes trained | train s | " +
             " | ".join(f"held-out {h} nats/byte" for h in held) + " |", "| --- " * (5 + len(held)) + "|"]
    for n in names:
        r = train[n]
        lines.append(f"| {n} | {r['params'] / 1e6:.3f}M | {r['n_layer']} | {r['tokens']} | {r['train_s']:.0f} | " +
                     " | ".join(f"{r['held_out'][h]:.4f}" for h in held) + " |")
    return "\n".join(lines)


def plot(result: dict, path_prefix: Path) -> list[str]:
    """PNGs: scan seconds vs tokens; decode ms/token and cache MiB vs context; training loss curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if result.get("scan"):
        fig, ax = plt.subplots(figsize=(6, 4))
        for p in ("forward", "forward+backward"):
            rows = [r for r in result["scan"] if r["pass"] == p]
            for engine, style in (("parallel", "-o"), ("sequential", "--s")):
                if rows:
                    ax.plot([r["tokens"] for r in rows], [statistics.median(r[f"{engine}_s"]) for r in rows], style,
                            label=f"{engine}, {p}")
        ax.set(xscale="log", yscale="log", xlabel="tokens", ylabel="seconds", title="selective scan, batch 1")
        ax.legend()
        written.append(_save(fig, path_prefix.with_name(path_prefix.name + "_scan.png")))
    if result.get("decode"):
        fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
        for name, rows in result["decode"].items():
            x = [r["context"] for r in rows]
            left.plot(x, [r["step_ms"] for r in rows], "-o", label=name)
            right.plot(x, [r["cache_bytes"] / 2**20 for r in rows], "-o", label=name)
        left.set(xscale="log", xlabel="context tokens", ylabel="ms per decoded token", title="decode time")
        right.set(xscale="log", yscale="log", xlabel="context tokens", ylabel="cache MiB (one sequence)",
                  title="decode memory")
        left.legend(fontsize=8)
        written.append(_save(fig, path_prefix.with_name(path_prefix.name + "_decode.png")))
    if result.get("train"):
        fig, ax = plt.subplots(figsize=(6, 4))
        for name in ("transformer", "mamba"):
            curve = result["train"][name]["curve"]
            ax.plot([c["step"] for c in curve], [c["loss"] for c in curve], label=f"{name} train")
            evals = [c for c in curve if "eval_loss" in c]
            ax.plot([c["step"] for c in evals], [c["eval_loss"] for c in evals], "o--", label=f"{name} held out")
        ax.set(xlabel="step", ylabel="nats per byte", title="trained from scratch, same bytes")
        ax.legend()
        written.append(_save(fig, path_prefix.with_name(path_prefix.name + "_train.png")))
    return written


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return str(path.relative_to(ROOT))


def write_docs(text: str, meta: dict, images: list[str]) -> None:
    from lmforge.benchmark import write_docs_section

    pictures = "".join(f"![{Path(p).stem}](../{p})\n" for p in images)
    section = (
        f"## Mamba: parallel vs sequential scan, decode at long contexts, training vs a transformer\n\n"
        f"```bash\n{meta['command']}\n```\n\n"
        f"{meta['date']}, {meta['machine']}, {meta['threads']} threads; torch {meta['torch']}; load average before: "
        f"{meta['loadavg']:.2f}, after: {meta['loadavg_after']:.2f}. Models: {meta['models']}. Scan: batch 1, "
        f"d_inner {meta['d_inner']}, d_state 16, {meta['rounds']} rounds, medians. Decode: batch 1, prefill of "
        f"random tokens, then the median of {meta['steps']} greedy steps; cache MiB is what the cache holds for "
        f"one sequence at that context. Training: fp32, AdamW lr {meta['lr']}, cosine, {meta['train_steps']} steps "
        f"of {meta['micro_batch']} x {meta['seq_len']} bytes (bench/ssm_train.py has the text and split).\n\n"
        f"{text}\n\n{pictures}\nRaw numbers: `bench/results/ssm.json`.")
    write_docs_section(ROOT / "docs" / "benchmarks.md", "ssm", section)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=("scan", "decode", "train"), default=["scan", "decode", "train"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--backward-max", type=int, default=2048, help="longest scan timed with backward too")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--steps", type=int, default=24, help="timed decode steps per context")
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4, help="transformer layers (Mamba's are matched)")
    parser.add_argument("--train-steps", type=int, default=120)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=16, help="held-out windows per corpus")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--quick", action="store_true", help="short lengths, a few steps; writes nothing")
    parser.add_argument("--no-write", action="store_true", help="print only; leave results and docs alone")
    args = parser.parse_args()
    if args.quick:
        args.lengths, args.contexts, args.backward_max, args.rounds, args.steps = [256, 512], [256, 512], 256, 1, 4
        args.train_steps, args.eval_windows, args.seq_len, args.no_write = 4, 2, 64, True
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    transformer, mamba = model_pair(args.d_model, args.layers, block_size=max(args.contexts) + 2 * args.steps + 16)
    meta = {"date": date.today().isoformat(), "machine": f"{os.cpu_count()} CPUs", "threads": args.threads,
            "torch": torch.__version__, "loadavg": os.getloadavg()[0], "d_inner": mamba.d_inner,
            "models": f"transformer {args.layers} layers, n_embd {args.d_model}, "
                      f"{param_count(transformer) / 1e6:.3f}M parameters; Mamba {mamba.n_layer} layers, n_embd "
                      f"{args.d_model}, {param_count(mamba) / 1e6:.3f}M parameters; vocabulary 256 (bytes)",
            **{k: getattr(args, k) for k in ("rounds", "steps", "train_steps", "micro_batch", "seq_len", "lr")},
            "command": "python bench/bench_ssm.py" + "".join(f" {shlex.quote(a)}" for a in sys.argv[1:])}
    print(meta["models"], flush=True)
    result: dict = {}
    if "scan" in args.parts:
        result["scan"] = run_scan(args, mamba.d_inner)
    if "decode" in args.parts:
        result["decode"] = run_decode(args, transformer, mamba)
    if "train" in args.parts:
        result["train"] = run_training(args)
    meta["loadavg_after"] = os.getloadavg()[0]
    tables = [f(result[k]) for k, f in (("scan", scan_table), ("decode", decode_table), ("train", train_table))
              if k in result]
    text = "\n\n".join(tables)
    print(text)
    if not args.no_write:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "ssm.json").write_text(json.dumps({"meta": meta, **result}, indent=1))
        write_docs(text, meta, plot(result, RESULTS / "ssm"))


if __name__ == "__main__":
    main()

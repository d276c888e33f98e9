"""Native GGUF benchmark: lmforge's default quantized path vs its fp32 path vs llama.cpp (issue 26).

`load(path)` keeps quantized linear weights in their GGUF blocks (GGUFLinear); `load(path,
dtype=torch.float32)` dequantizes them. llama.cpp runs the same file. Each (model, engine, round)
runs in a fresh process, rounds rotate the engine order; perplexity runs once per (model, engine)
in its own process on the same held-out State of the Union token ids. Run:

    python bench/bench_native.py                                   # both models, 3 rounds
    python bench/bench_native.py --model smollm2-135m-instruct     # one model
    python bench/bench_native.py --quick                           # 1 round, 32 steps, 2 windows; writes nothing
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_foundation import (ROOT, WARMUP_STEPS, machine_meta, paired_ratio, peak_rss_mib, summarize, verdict,
                              worker_llama_cpp)

MODELS = {"smollm2-135m-instruct": "SmolLM2-135M-Instruct Q4_1", "gemma3-270m": "Gemma 3 270M Q4_K_M"}
ENGINES = ("lmforge native", "lmforge fp32", "llama.cpp")
WEIGHTS = {"lmforge fp32": "none (all fp32)", "llama.cpp": "all, as stored"}
WINDOW = 256  # tokens per perplexity window
PPL_TOLERANCE = 0.005  # lmforge native perplexity within 0.5% of llama.cpp's (issue 26)


def rss_mib() -> float:
    """Current resident memory of this process (VmRSS in /proc/self/status, KiB)."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


# --- workers: one engine, one task, in a fresh process --------------------------------------

def _load_lmforge(model: Path, native: bool, threads: int) -> tuple[object, dict]:
    """An lmforge model by the default (native) or fp32 path, with import/load times and RSS after imports."""
    start = time.perf_counter()
    import torch

    from lmforge.benchmark import time_decode, time_prefill  # noqa: F401  (imported before the RSS reading)
    from lmforge.checkpoint.gguf_blocks import GGUFLinear
    from lmforge.checkpoint.load import load

    torch.set_num_threads(threads)
    info = {"import_s": time.perf_counter() - start, "import_rss_mib": rss_mib()}
    net, _ = load(model) if native else load(model, dtype=torch.float32)
    info["load_s"] = time.perf_counter() - start
    kinds = sorted({m.qtype.name for m in net.modules() if isinstance(m, GGUFLinear)})
    info["gguf_linear_types"] = kinds
    if native and not kinds:
        raise RuntimeError(f"load({model}) kept no GGUFLinear module: the native path did not run")
    return net, info


def speed_lmforge(model: Path, ids: list[int], steps: int, threads: int, native: bool) -> dict:
    """Load, prefill and decode timings of one lmforge path."""
    net, info = _load_lmforge(model, native, threads)  # imports torch first: nothing may import it before
    from lmforge.benchmark import time_decode, time_prefill

    time_prefill(net, ids), time_decode(net, ids, WARMUP_STEPS)  # untimed warm-up
    return {**info, "prefill_s": time_prefill(net, ids), "decode_s": time_decode(net, ids, steps)}


def speed_llama_cpp(model: Path, ids: list[int], steps: int, threads: int) -> dict:
    """bench_foundation's llama.cpp worker, plus the import it would time (done here, for the RSS after it)."""
    start = time.perf_counter()
    import llama_cpp  # noqa: F401  (what worker_llama_cpp imports first)

    import_s, import_rss = time.perf_counter() - start, rss_mib()
    result = worker_llama_cpp(model, ids, steps, threads)
    return {**result, "import_s": import_s, "load_s": import_s + result["load_s"], "import_rss_mib": import_rss}


def ppl_lmforge(model: Path, ids: list[int], threads: int, native: bool) -> dict:
    """lmforge's perplexity over non-overlapping WINDOW-token windows of `ids`."""
    from lmforge.evaluation.perplexity import perplexity

    net, _ = _load_lmforge(model, native, threads)
    result = perplexity(net, ids, context=WINDOW)
    return {"nll": result.nll, "tokens": result.tokens, "ppl": result.ppl}


def ppl_llama_cpp(model: Path, ids: list[int], threads: int) -> dict:
    """The same windows' NLL from llama.cpp's logits (log-softmax in numpy, float64)."""
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=str(model), n_ctx=2 * WINDOW, n_batch=2 * WINDOW, n_threads=threads,
                logits_all=True, verbose=False)
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, WINDOW):  # the spans perplexity(context=stride=WINDOW) scores
        end = min(start + WINDOW, len(ids) - 1)
        llm.reset()
        llm.eval(ids[start:end])
        logits = np.asarray(llm.scores[:end - start], dtype=np.float64)  # (T, vocab)
        top = logits.max(axis=1, keepdims=True)
        log_z = (top + np.log(np.exp(logits - top).sum(axis=1, keepdims=True)))[:, 0]
        targets = np.asarray(ids[start + 1:end + 1])
        total += float((log_z - logits[np.arange(end - start), targets]).sum())
        count += end - start
    return {"nll": total / count, "tokens": count, "ppl": math.exp(total / count)}


def run_task(task: str, engine: str, model: Path, ids: list[int], steps: int, threads: int) -> dict:
    """Dispatch one worker task ('speed' or 'ppl') to its engine."""
    if engine == "llama.cpp":
        return speed_llama_cpp(model, ids, steps, threads) if task == "speed" else ppl_llama_cpp(model, ids, threads)
    native = engine == "lmforge native"
    if task == "speed":
        return speed_lmforge(model, ids, steps, threads, native)
    return ppl_lmforge(model, ids, threads, native)


def spawn(task: str, engine: str, model: Path, ids_file: Path, steps: int, threads: int) -> dict | None:
    """Run one task in a fresh process; its result, or None (with the error's last line) when it failed."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as out:
        out_path = Path(out.name)
    cmd = [sys.executable, __file__, "--worker", engine, "--task", task, "--gguf", str(model), "--ids",
           str(ids_file), "--steps", str(steps), "--threads", str(threads), "--out", str(out_path)]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            tail = result.stderr.strip().splitlines()[-1:] or ["(no stderr)"]
            print(f"\n{engine} {task}: worker failed (exit {result.returncode}): {tail[0]}", file=sys.stderr)
            return None
        result_json = json.loads(out_path.read_text())
        if "compiling the CPU decode kernels" in result.stderr:  # sources changed since the parent built them
            print(f"\n{engine} {task}: this worker compiled the kernels (its load time includes it)", file=sys.stderr)
            result_json["compiled_kernels"] = True
        return result_json
    finally:
        out_path.unlink(missing_ok=True)


# --- parent: rounds, perplexity, targets, table, docs ---------------------------------------

def bench_model(name: str, args: argparse.Namespace, bar) -> dict:
    """Speed rounds (engines rotated) and one perplexity run per engine for one model."""
    from lmforge import hub
    from lmforge.benchmark import bench_prompt
    from lmforge.compression.report import held_out_ids
    from lmforge.tokenizer import Tokenizer

    path = hub.resolve(name, pull_missing=True)
    tokenizer = Tokenizer.load(path)
    prompt, ppl_ids = bench_prompt(tokenizer, args.prompt_tokens), held_out_ids(tokenizer, args.windows * WINDOW + 1)
    runs: dict[str, list[dict]] = {e: [] for e in ENGINES}
    ppl: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        prompt_file, ppl_file = Path(tmp) / "prompt.json", Path(tmp) / "ppl.json"
        prompt_file.write_text(json.dumps(prompt))
        ppl_file.write_text(json.dumps(ppl_ids))
        for r in range(args.rounds):
            for engine in ENGINES[r % len(ENGINES):] + ENGINES[:r % len(ENGINES)]:
                bar.set_postfix_str(f"{name} round {r + 1}: {engine}")
                load_avg = os.getloadavg()[0]
                result = spawn("speed", engine, path, prompt_file, args.steps, args.threads)
                if result:
                    runs[engine].append({"round": r + 1, "loadavg_1min_before": load_avg, **result})
                bar.update()
        for engine in ENGINES:
            bar.set_postfix_str(f"{name} perplexity: {engine}")
            result = spawn("ppl", engine, path, ppl_file, args.steps, args.threads)
            if result:
                ppl[engine] = result
            bar.update()
    return {"file": path.name, "runs": runs, "ppl": ppl}


def paired_rss(runs: dict, num: str, den: str) -> dict | None:
    """Peak RSS num/den per round, median and range."""
    by_round = {r["round"]: r["peak_rss_mib"] for r in runs.get(den, [])}
    ratios = [r["peak_rss_mib"] / by_round[r["round"]] for r in runs.get(num, []) if r["round"] in by_round]
    if not ratios:
        return None
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "per_round": ratios}


def ppl_ratio(ppl: dict) -> dict | None:
    """lmforge native perplexity / llama.cpp's (one deterministic run each)."""
    if "lmforge native" not in ppl or "llama.cpp" not in ppl:
        return None
    x = ppl["lmforge native"]["ppl"] / ppl["llama.cpp"]["ppl"]
    return {"median": x, "min": x, "max": x, "per_round": [x]}


def targets_of(name: str, data: dict, meta: dict) -> dict:
    """Issue 26's targets for one model: {label: (value, goal, verdict)}; Gemma's untargeted ones as 'reported'."""
    runs, n, steps = data["runs"], meta["prompt_tokens"], meta["steps"]
    smol = name == "smollm2-135m-instruct"
    decode_goal = 1.5 if smol else 1.2
    rows = {
        "decode native / llama.cpp": (paired_ratio(runs, "decode", "lmforge native", "llama.cpp", n, steps),
                                      decode_goal, True),
        "prefill native / llama.cpp": (paired_ratio(runs, "prefill", "lmforge native", "llama.cpp", n, steps),
                                       1.5 if smol else None, True),
        "peak RSS native / llama.cpp": (paired_rss(runs, "lmforge native", "llama.cpp"), 2 if smol else None, False),
    }
    out = {}
    for label, (value, goal, above) in rows.items():
        if value is not None:
            sign = ">=" if above else "<="
            out[label] = (value, f"{sign} {goal}x" if goal else "-",
                          verdict(value, goal, above) if goal else "reported (no target)")
    ratio = ppl_ratio(data["ppl"])
    if ratio is not None:
        met = abs(ratio["median"] - 1) <= PPL_TOLERANCE
        out["perplexity native / llama.cpp"] = (ratio, "within 0.5%",
                                                ("met" if met else "NOT met") if smol else "reported (no target)")
    return out


def _cell(values: list[float], fmt: str) -> str:
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def engine_row(engine: str, runs: dict, ppl: dict, meta: dict) -> str:
    """One table row: load, RSS after imports, peak RSS, speeds, perplexity, native's ratios to it."""
    rs, n, steps = runs[engine], meta["prompt_tokens"], meta["steps"]
    s = summarize(rs, n, steps)
    ratios = [paired_ratio(runs, m, "lmforge native", engine, n, steps) for m in ("prefill", "decode")]
    cells = ["-" if engine == "lmforge native" or x is None else f"{x['median']:.2f}x" for x in ratios]
    weights = ", ".join(rs[0].get("gguf_linear_types", [])) or WEIGHTS.get(engine, "-")
    p = f"{ppl[engine]['ppl']:.3f}" if engine in ppl else "-"
    return (f"| {engine} | {weights} | {_cell([r['load_s'] for r in rs], '.2f')} ({s['import_s']['median']:.2f}) | "
            f"{statistics.median(r['import_rss_mib'] for r in rs):.0f} | {s['peak_rss_mib']['median']:.0f} | "
            f"{_cell([n / r['prefill_s'] for r in rs], '.0f')} | {_cell([steps / r['decode_s'] for r in rs], '.1f')} | "
            f"{p} | {cells[0]} | {cells[1]} |")


def model_table(name: str, data: dict, targets: dict, meta: dict) -> str:
    """Markdown table and verdict lines for one model."""
    lines = [f"### {MODELS[name]} (`{data['file']}`)", "",
             "| engine | quantized linears | load s (import s) | RSS after imports MiB | peak RSS MiB | prefill tok/s | "
             "decode tok/s | perplexity | native prefill / this | native decode / this |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [engine_row(e, data["runs"], data["ppl"], meta) for e in ENGINES if data["runs"].get(e)]
    lines.append("")
    for label, (value, goal, met) in targets.items():
        if "perplexity" in label:
            shown = f"{value['median']:.4f} ({(value['median'] - 1) * 100:+.2f}%)"
        else:
            shown = f"{value['median']:.2f}x (per round {value['min']:.3f}-{value['max']:.3f}x)"
        lines.append(f"- {label}: **{shown}** (target {goal}) — {met}")
    return "\n".join(lines)


def write_docs(text: str, meta: dict) -> None:
    """The `native` section of docs/benchmarks.md: command, conditions, tables and verdicts."""
    from lmforge.benchmark import write_docs_section

    section = (
        f"## Native GGUF: lmforge's default quantized path vs its fp32 path vs llama.cpp\n\n"
        f"```bash\n{meta['command']}\n```\n\n"
        f"{meta['date']}, {meta['machine']}; {meta['threads']} thread(s) per engine; torch {meta['torch']}, "
        f"llama-cpp-python {meta['llama_cpp']}. Load average (1 min) before the run: {meta['loadavg_before']:.2f}, "
        f"after: {meta['loadavg_after']:.2f}.\n\n"
        f"`lmforge native` is `load(path)`, the default: quantized linear weights stay in their GGUF blocks "
        f"(GGUFLinear on lmforge's kernels; the column lists their types). `lmforge fp32` is "
        f"`load(path, dtype=torch.float32)`, everything dequantized. llama.cpp (llama-cpp-python) runs the "
        f"same file. Each (model, engine, round) runs in a fresh process; {meta['rounds']} rounds rotate the "
        f"engine order. Load is import + load (import alone in brackets); RSS after imports is VmRSS right "
        f"after `import torch` and lmforge's modules (after `import llama_cpp` for llama.cpp), peak RSS the "
        f"process's maximum. Batch 1, the same {meta['prompt_tokens']} prompt token ids for every engine "
        f"(`lmforge.benchmark.bench_prompt`), then {meta['steps']} greedy decode steps, EOS ignored, after an "
        f"untimed warm-up. Perplexity: the first {meta['windows']} non-overlapping {WINDOW}-token windows of "
        f"the held-out State of the Union speeches (2000 on, `lmforge.compression.report.held_out_ids`, no "
        f"BOS), tokenised once by the model's own tokenizer; lmforge scores them with "
        f"`lmforge.evaluation.perplexity`, llama.cpp's NLL of the same ids comes from its logits "
        f"(`logits_all=True`, log-softmax in numpy), each engine in its own process. Medians with min-max in "
        f"brackets; ratios are medians of per-round ratios; a target is met only when every round meets it. "
        f"The 2-core machine is shared with other work, so compare ratios, not absolute numbers.\n\n"
        f"{text}\n\nRaw numbers per round: `bench/results/native.json`.")
    write_docs_section(ROOT / "docs" / "benchmarks.md", "native", section)


def report(meta: dict, models: dict, write: bool) -> None:
    """Print the tables; with `write`, save bench/results/native.json and the docs section."""
    targets = {name: targets_of(name, data, meta) for name, data in models.items()}
    text = "\n\n".join(model_table(name, data, targets[name], meta) for name, data in models.items())
    print(text)
    if not write:
        return
    saved = {name: {**data, "targets": {k: {"value": v, "goal": g, "verdict": m} for k, (v, g, m) in t.items()}}
             for (name, data), t in zip(models.items(), targets.values())}
    out = ROOT / "bench" / "results" / "native.json"
    out.write_text(json.dumps({"meta": meta, "models": saved}, indent=2))
    write_docs(text, meta)


def parse_args() -> argparse.Namespace:
    """Command-line options; the worker flags are hidden."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=[*MODELS, "both"], default="both")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--steps", type=int, default=128, help="decode steps")
    parser.add_argument("--windows", type=int, default=8, help=f"perplexity windows of {WINDOW} tokens")
    parser.add_argument("--threads", type=int, default=2, help="compute threads for every engine")
    parser.add_argument("--quick", action="store_true", help="1 round, 32 steps, 2 windows; writes nothing")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs and results alone")
    parser.add_argument("--render", metavar="JSON", help="re-make tables and docs from a saved result")
    for hidden in ("--worker", "--task", "--gguf", "--ids", "--out"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.worker:
        ids = json.loads(Path(args.ids).read_text())
        result = run_task(args.task, args.worker, Path(args.gguf), ids, args.steps, args.threads)
        Path(args.out).write_text(json.dumps({**result, "peak_rss_mib": peak_rss_mib()}))
        return
    if args.render:
        saved = json.loads(Path(args.render).read_text())
        return report(saved["meta"], saved["models"], write=not args.no_write)
    if args.quick:
        args.rounds, args.steps, args.windows, args.no_write = 1, 32, 2, True
    from tqdm import tqdm

    from lmforge.kernels import gemv

    gemv.extension()  # compile the kernels here, once, so no worker's load time includes it
    names = list(MODELS) if args.model == "both" else [args.model]
    meta = {**machine_meta(args, args.prompt_tokens), "windows": args.windows, "models": names,
            "command": "python bench/bench_native.py" + "".join(f" {shlex.quote(a)}" for a in sys.argv[1:])}
    with tqdm(total=len(names) * len(ENGINES) * (args.rounds + 1), desc="bench") as bar:
        models = {name: bench_model(name, args, bar) for name in names}
    meta["loadavg_after"] = os.getloadavg()[0]
    report(meta, models, write=not args.no_write)


if __name__ == "__main__":
    main()

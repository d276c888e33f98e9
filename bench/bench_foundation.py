"""Foundation benchmark: lmforge vs llama.cpp vs transformers on SmolLM2-135M, interleaved.

Each (engine, round) runs in a fresh process, so load time is what a user waits for and
peak RSS is the engine's own. Rounds rotate the engine order. All engines read the same
GGUF and see the same 256 prompt token ids. Run:

    python bench/bench_foundation.py            # 3 rounds, 256-token prefill, 128 decode steps
    python bench/bench_foundation.py --quick    # 1 round, 32 decode steps (smoke test)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENGINES = ("lmforge", "llama.cpp", "transformers")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker_lmforge(model: Path, ids: list[int], steps: int) -> dict:
    start = time.perf_counter()
    from lmforge.benchmark import time_decode, time_prefill
    from lmforge.checkpoint.load import load

    net, _ = load(model)
    load_s = time.perf_counter() - start
    time_prefill(net, ids), time_decode(net, ids[:16], 4)  # warm-up
    return {"load_s": load_s, "prefill_s": time_prefill(net, ids), "decode_s": time_decode(net, ids, steps)}


def worker_llama_cpp(model: Path, ids: list[int], steps: int) -> dict:
    start = time.perf_counter()
    from llama_cpp import Llama

    llm = Llama(model_path=str(model), n_ctx=512, n_batch=512, n_threads=os.cpu_count(), verbose=False)
    load_s = time.perf_counter() - start

    def prefill() -> float:
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids)
        return time.perf_counter() - t

    def decode(n: int) -> float:
        t = time.perf_counter()
        for _ in range(n):  # greedy: argmax of the last logits, fed back one token at a time
            llm.eval([int(llm.scores[llm.n_tokens - 1].argmax())])
        return time.perf_counter() - t

    prefill(), decode(4)  # warm-up
    prefill_s = prefill()
    return {"load_s": load_s, "prefill_s": prefill_s, "decode_s": decode(steps)}


def worker_transformers(model: Path, ids: list[int], steps: int) -> dict:
    start = time.perf_counter()
    import torch
    from transformers import AutoModelForCausalLM

    net = AutoModelForCausalLM.from_pretrained(model.parent, gguf_file=model.name, dtype=torch.float32).eval()
    load_s = time.perf_counter() - start
    prompt = torch.tensor([ids])

    @torch.inference_mode()
    def run(n: int) -> tuple[float, float]:
        t = time.perf_counter()
        out = net(prompt, use_cache=True)
        prefill_s = time.perf_counter() - t
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t = time.perf_counter()
        for _ in range(n):  # what generate() does per token, without its bookkeeping
            out = net(token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        return prefill_s, time.perf_counter() - t

    run(4)  # warm-up
    prefill_s, decode_s = run(steps)
    return {"load_s": load_s, "prefill_s": prefill_s, "decode_s": decode_s}


WORKERS = {"lmforge": worker_lmforge, "llama.cpp": worker_llama_cpp, "transformers": worker_transformers}


def run_worker(engine: str, model: Path, ids_file: Path, steps: int) -> dict | None:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as out:
        out_path = Path(out.name)
    cmd = [sys.executable, __file__, "--worker", engine, "--model", str(model), "--ids", str(ids_file),
           "--steps", str(steps), "--out", str(out_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    try:
        if result.returncode != 0:
            print(f"  {engine}: failed: {result.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            return None
        return json.loads(out_path.read_text())
    finally:
        out_path.unlink(missing_ok=True)


def available(engine: str) -> bool:
    module = {"lmforge": "lmforge", "llama.cpp": "llama_cpp", "transformers": "transformers"}[engine]
    try:
        __import__(module)
        return True
    except ImportError:
        print(f"skipping {engine}: `{module}` is not installed (pip install -e .[bench])", file=sys.stderr)
        return False


def summarize(runs: list[dict], prompt_tokens: int, steps: int) -> dict:
    def stats(values: list[float]) -> dict:
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    return {
        "load_s": stats([r["load_s"] for r in runs]),
        "prefill_tok_s": stats([prompt_tokens / r["prefill_s"] for r in runs]),
        "decode_tok_s": stats([steps / r["decode_s"] for r in runs]),
        "peak_rss_mib": stats([r["peak_rss_mib"] for r in runs]),
    }


def table(results: dict, targets: dict) -> str:
    lines = ["| engine | weights | load s | prefill tok/s | decode tok/s | peak RSS MiB |",
             "| --- | --- | --- | --- | --- | --- |"]
    kinds = {"lmforge": "fp32 (dequantized GGUF)", "llama.cpp": "Q4_1 (native)",
             "transformers": "fp32 (dequantized GGUF)"}
    for engine, r in results.items():
        lines.append(f"| {engine} | {kinds[engine]} | {r['load_s']['median']:.2f} | "
                     f"{r['prefill_tok_s']['median']:.0f} ({r['prefill_tok_s']['min']:.0f}-"
                     f"{r['prefill_tok_s']['max']:.0f}) | {r['decode_tok_s']['median']:.1f} "
                     f"({r['decode_tok_s']['min']:.1f}-{r['decode_tok_s']['max']:.1f}) | "
                     f"{r['peak_rss_mib']['median']:.0f} |")
    lines.append("")
    for name, (value, goal, met) in targets.items():
        lines.append(f"- {name}: {value} (target {goal}) — {'met' if met else 'NOT met'}")
    return "\n".join(lines)


def targets_of(results: dict) -> dict:
    out = {}
    lm = results.get("lmforge")
    if lm and "transformers" in results:
        ratio = lm["decode_tok_s"]["median"] / results["transformers"]["decode_tok_s"]["median"]
        out["decode lmforge / transformers"] = (f"{ratio:.2f}x", ">= 3x", ratio >= 3)
    if lm and "llama.cpp" in results:
        ratio = lm["prefill_tok_s"]["median"] / results["llama.cpp"]["prefill_tok_s"]["median"]
        out["prefill lmforge / llama.cpp"] = (f"{ratio:.2f}x", ">= 1.3x", ratio >= 1.3)
    if lm:
        out["lmforge load time"] = (f"{lm['load_s']['median']:.2f} s", "< 3 s", lm["load_s"]["median"] < 3)
    return out


def write_docs(text: str, command: str, meta: dict) -> None:
    docs = ROOT / "docs" / "benchmarks.md"
    current = docs.read_text() if docs.exists() else "# Benchmarks\n"
    start, end = "<!-- foundation:start -->", "<!-- foundation:end -->"
    section = (f"{start}\n## Foundation: load, prefill and decode on SmolLM2-135M\n\n"
               f"Command: `{command}` ({meta['date']}, {meta['machine']}; torch {meta['torch']}, transformers "
               f"{meta['transformers']}, llama-cpp-python {meta['llama_cpp']}). Medians of {meta['rounds']} "
               f"interleaved rounds (min-max in brackets), each engine in a fresh process; "
               f"{meta['prompt_tokens']}-token prefill, {meta['steps']} greedy decode steps at batch 1 after one "
               f"untimed warm-up. This 2-core machine is shared and noisy: compare ratios from the same run.\n\n"
               f"{text}\n\nRaw numbers: `bench/results/foundation.json`.\n{end}")
    if start in current:
        current = current[:current.index(start)] + section + current[current.index(end) + len(end):]
    else:
        current = current.rstrip() + "\n\n" + section + "\n"
    docs.write_text(current)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--quick", action="store_true", help="1 round, 32 decode steps")
    parser.add_argument("--worker"), parser.add_argument("--model"), parser.add_argument("--ids")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.worker:
        ids = json.loads(Path(args.ids).read_text())
        result = WORKERS[args.worker](Path(args.model), ids, args.steps)
        result["peak_rss_mib"] = peak_rss_mib()
        Path(args.out).write_text(json.dumps(result))
        return
    if args.quick:
        args.rounds, args.steps = 1, 32
    from tqdm import tqdm

    from lmforge import hub
    from lmforge.benchmark import bench_prompt
    from lmforge.tokenizer import Tokenizer

    model = hub.resolve("smollm2-135m-instruct", pull_missing=True)
    ids = bench_prompt(Tokenizer.load(model), args.prompt_tokens)
    engines = [e for e in ENGINES if available(e)]
    runs: dict[str, list[dict]] = {e: [] for e in engines}
    with tempfile.TemporaryDirectory() as tmp:
        ids_file = Path(tmp) / "ids.json"
        ids_file.write_text(json.dumps(ids))
        with tqdm(total=args.rounds * len(engines), desc="bench") as bar:
            for r in range(args.rounds):
                for engine in engines[r % len(engines):] + engines[:r % len(engines)]:
                    bar.set_postfix_str(f"round {r + 1}: {engine}")
                    result = run_worker(engine, model, ids_file, args.steps)
                    if result:
                        runs[engine].append(result)
                    bar.update()
    results = {e: summarize(r, len(ids), args.steps) for e, r in runs.items() if r}
    targets = targets_of(results)
    text = table(results, targets)
    print(text)
    meta = {"date": date.today().isoformat(), "machine": f"{os.cpu_count()} CPUs, {_cpu_model()}",
            "rounds": args.rounds, "prompt_tokens": len(ids), "steps": args.steps, "torch": _version("torch"),
            "transformers": _version("transformers"), "llama_cpp": _version("llama_cpp")}
    out = ROOT / "bench" / "results" / "foundation.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": results, "runs": runs,
                               "targets": {k: v[0] for k, v in targets.items()}}, indent=2))
    command = "python bench/bench_foundation.py" + (" --quick" if args.quick else "")
    write_docs(text, command, meta)


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except (ImportError, AttributeError):
        return "absent"


if __name__ == "__main__":
    main()

"""Serving benchmark: `lmforge serve` under 1-64 streaming clients vs transformers, llama.cpp and llama-server.

One run on SmolLM2-135M (the registry's Q4_1 GGUF), the same chat prompts, greedy, 64 new tokens at most:

- lmforge: `lmforge serve` as a subprocess on a free 127.0.0.1 port (native GGUF blocks by default;
  engine `lmforge-fp32` adds `--dtype float32`); an asyncio + httpx load generator (serving_load.py)
  streams `POST /v1/chat/completions` with C workers pulling N = max(2C, 8) requests.
- llama-server: llama.cpp's own server (`-np S -t T -tb T`, continuous batching), driven by the same
  load generator; the binary from --llama-server, $LLAMA_SERVER, the build cache or PATH.
- transformers: `generate` at batch 8 (left padding, fp32, the same GGUF dequantized), prompt ids.
- llama.cpp: llama-cpp-python completing the same prompt ids one after another (Q4_1 native).

Never two engines at once: peers each in their own process, servers one after another. With
lmforge-fp32 or llama-server among --engines the run is the native comparison of issue 26
(bench/results/serving_native.json, the `serving-native` docs section, --repeats interleaved);
otherwise the original report (bench/results/serving.json, the `serving` section). Run:

    python bench/bench_serving.py              # levels 1, 4, 16, 64; peers on 16 prompts
    python bench/bench_serving.py --threads 1  # the same on one thread per engine (shared machine)
    python bench/bench_serving.py --quick    # levels 1 and 4, 8 prompts (smoke test)
    python bench/bench_serving.py --levels 16 --engines lmforge,lmforge-fp32,llama-server --repeats 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_load import (MAX_TOKENS, REQUEST_TIMEOUT_S, SERVER_ENGINES, cpu_ticks, find_llama_server,  # noqa: E402
                          free_port, other_cores, run_level, server_command, start_server, stop_server, summarize)
from serving_native import compare_doc, compare_plot, compare_table, compare_targets, pool, same_texts  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
TARGET_CLIENTS, TARGET_RATIO, TARGET_TTFT_P99_S = 16, 3.0, 2.0

TOPICS = ["photosynthesis", "black holes", "the French Revolution", "compound interest", "vaccines",
          "plate tectonics", "the internet", "recursion", "inflation", "the water cycle", "DNA", "volcanoes",
          "the Roman Empire", "machine learning", "gravity", "climate change", "the stock market", "bees",
          "the immune system", "electric cars", "the printing press", "quantum computing", "coral reefs",
          "sleep", "the Moon landing", "supply and demand", "antibiotics", "rainbows", "the heart",
          "solar panels", "chess", "the Great Wall of China", "blockchain", "tides", "jazz", "the Renaissance",
          "earthquakes", "coffee", "public libraries", "hurricanes", "the Olympic Games", "batteries",
          "migration of birds", "democracy", "bread baking", "the speed of light", "recycling", "the brain",
          "glaciers", "the Silk Road", "opera", "wind turbines", "mushrooms", "encryption", "the Sahara",
          "penguins", "the periodic table", "meditation", "satellites", "the Amazon rainforest",
          "origami", "nuclear fusion", "the human eye", "time zones"]
TEMPLATES = ["Explain {} in two sentences.", "Write a short paragraph about {} for a ten-year-old."]
PROMPTS = [t.format(topic) for topic in TOPICS for t in TEMPLATES]  # 128 distinct, templates alternate


# -- peers, each in a fresh process ------------------------------------------------------------------

class _Stamps:
    """A logits processor that only records when each new token is about to be sampled."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def worker_transformers(model: Path, prompts: list[list[int]], stop_ids: list[int], batch: int,
                        threads: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, LogitsProcessorList

    torch.set_num_threads(threads)

    net = AutoModelForCausalLM.from_pretrained(model.parent, gguf_file=model.name, dtype=torch.float32).eval()
    pad = stop_ids[0]

    def run(group: list[list[int]], new: int) -> tuple[list[list[int]], list[float], float]:
        width = max(len(p) for p in group)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in group])  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group])
        stamps, start = _Stamps(), time.perf_counter()
        with torch.inference_mode():
            out = net.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                               eos_token_id=stop_ids, pad_token_id=pad, logits_processor=LogitsProcessorList([stamps]))
        new_ids = [_until_stop(row[width:].tolist(), stop_ids) for row in out]
        return new_ids, [t - start for t in stamps.times], time.perf_counter() - start

    run(prompts[:2], 4)  # warm-up
    records, outputs, wall = [], [], 0.0
    for i in range(0, len(prompts), batch):
        new_ids, times, seconds = run(prompts[i:i + batch], MAX_TOKENS)
        wall += seconds
        gaps = [b - a for a, b in zip(times, times[1:])]
        for ids in new_ids:  # every row of a batch sees the batch's step times
            records.append({"tokens": len(ids), "ttft": times[0], "itl": gaps[:max(len(ids) - 1, 0)]})
            outputs.append(ids)
    return {"records": records, "wall_s": wall, "outputs": outputs}


def worker_llama_cpp(model: Path, prompts: list[list[int]], stop_ids: list[int], batch: int,
                     threads: int) -> dict:
    from llama_cpp import Llama, LogitsProcessorList

    llm = Llama(model_path=str(model), n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)
    llm.create_completion(prompts[0], max_tokens=4, temperature=0)  # warm-up
    records, outputs, wall = [], [], 0.0
    for ids in prompts:  # one after another
        stamps, start = _Stamps(), time.perf_counter()
        out = llm.create_completion(ids, max_tokens=MAX_TOKENS, temperature=0, repeat_penalty=1.0,
                                    logits_processor=LogitsProcessorList([stamps]))
        wall += time.perf_counter() - start
        times = [t - start for t in stamps.times]
        tokens = out["usage"]["completion_tokens"]
        records.append({"tokens": tokens, "ttft": times[0] if times else None,
                        "itl": [b - a for a, b in zip(times, times[1:])][:max(tokens - 1, 0)]})
        outputs.append(out["choices"][0]["text"])
    return {"records": records, "wall_s": wall, "outputs": outputs}


def _until_stop(ids: list[int], stop_ids: list[int]) -> list[int]:
    for i, token in enumerate(ids):
        if token in stop_ids:
            return ids[:i]
    return ids


WORKERS = {"transformers": worker_transformers, "llama.cpp": worker_llama_cpp}
ENGINES = (*SERVER_ENGINES, *WORKERS)


def run_peer(name: str, job: Path, timeout: float) -> dict | None:
    out = job.with_suffix(f".{name}.json")
    cmd = [sys.executable, __file__, "--worker", name, "--job", str(job), "--out", str(out)]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        print(f"  {name}: stopped after {timeout:.0f} s (time cap)", file=sys.stderr)
        return None
    if result.returncode != 0:
        print(f"  {name}: failed: {result.stderr.strip().splitlines()[-3:]}", file=sys.stderr)
        return None
    return json.loads(out.read_text())


# -- HTTP servers, one at a time ---------------------------------------------------------------------

def bench_server(engine: str, model: Path, prompts: list[str], levels: list[int], deadline: float,
                 threads: int, llama_server: Path | None = None) -> dict:
    """Start one server engine, warm it up, run each client level on N = max(2C, 8) prompts, stop it."""
    cmd = server_command(engine, model, free_port(), max(levels), threads, llama_server)
    proc, base, log = start_server(cmd, threads)
    results = {}
    try:
        print(f"  {engine} up at {base}; warm-up", file=sys.stderr)
        asyncio.run(run_level(base, prompts[-2:], 1, 120))  # warm-up, untimed
        for clients in levels:
            budget = deadline - time.time()
            if budget <= 5:
                print(f"  {clients} clients: skipped (time cap)", file=sys.stderr)
                continue
            n = max(2 * clients, 8)
            before, start = cpu_ticks(proc.pid), time.perf_counter()
            results[str(clients)] = r = asyncio.run(run_level(base, prompts[:n], clients, budget))
            r["other_cores"] = other_cores(before, cpu_ticks(proc.pid), time.perf_counter() - start)
            print(f"  {engine}, {clients:>2} clients: {r['tok_s']:.1f} tok/s, TTFT p99 {_fmt(r['ttft_s']['p99'])} s, "
                  f"{r['failures']} failed{' (TRUNCATED)' if r['truncated'] else ''}, other processes busy "
                  f"{r['other_cores']:.2f} cores", file=sys.stderr)
    finally:
        stop_server(proc)
        log.unlink(missing_ok=True)
    return results


# -- report -------------------------------------------------------------------------------------------

def _fmt(value: float | None, scale: float = 1.0, digits: int = 2) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def table(lmforge: dict, peers: dict) -> str:
    lines = ["| engine | tok/s | vs transformers b8 | TTFT p50 / p95 / p99 (s) | ITL p50 / p95 / p99 (ms) | "
             "requests | failed |", "| --- | --- | --- | --- | --- | --- | --- |"]
    base = peers.get("transformers", {}).get("tok_s")
    rows = [(f"lmforge serve, {c} client{'s' if c != '1' else ''}", r) for c, r in lmforge.items()]
    rows += [(("transformers generate, batch 8" if name == "transformers" else "llama.cpp, one after another"), r)
             for name, r in peers.items()]
    for label, r in rows:
        t, i = r["ttft_s"], r["itl_s"]
        ratio = f"{r['tok_s'] / base:.2f}x" if base else "-"
        lines.append(f"| {label}{' (truncated)' if r.get('truncated') else ''} | {r['tok_s']:.1f} | {ratio} | "
                     f"{_fmt(t['p50'])} / {_fmt(t['p95'])} / {_fmt(t['p99'])} | {_fmt(i['p50'], 1e3, 0)} / "
                     f"{_fmt(i['p95'], 1e3, 0)} / {_fmt(i['p99'], 1e3, 0)} | {r['requests']} | {r['failures']} |")
    return "\n".join(lines)


def targets_of(lmforge: dict, peers: dict) -> dict:
    r, base = lmforge.get(str(TARGET_CLIENTS)), peers.get("transformers", {}).get("tok_s")
    if not r:
        return {}
    out = {}
    if base:
        ratio = r["tok_s"] / base
        out["throughput at 16 clients / transformers batch 8"] = (f"{ratio:.2f}x", f">= {TARGET_RATIO:g}x",
                                                                   ratio >= TARGET_RATIO)
    p99 = r["ttft_s"]["p99"]
    out["TTFT p99 at 16 clients"] = (f"{_fmt(p99)} s", f"< {TARGET_TTFT_P99_S:g} s",
                                     p99 is not None and p99 < TARGET_TTFT_P99_S)
    out["failed requests at 16 clients"] = (str(r["failures"]), "0", r["failures"] == 0 and not r["truncated"])
    return out


def plot(lmforge: dict, peers: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    xs = [int(c) for c in lmforge]
    ax.plot(xs, [lmforge[c]["tok_s"] for c in lmforge], "o-", label="lmforge serve (streaming clients)")
    styles = {"transformers": ("--", "transformers generate, batch 8"), "llama.cpp": (":", "llama.cpp, sequential")}
    for name, r in peers.items():
        ax.axhline(r["tok_s"], linestyle=styles[name][0], color="grey" if name == "llama.cpp" else "tab:red",
                   label=f"{styles[name][1]} ({r['tok_s']:.0f} tok/s)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("generated tokens / s")
    ax.set_ylim(bottom=0)
    ax.set_title("SmolLM2-135M, up to 64 new tokens per request, CPU")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def agreement(lm_texts: list[str], peer: dict | None, decode) -> str:
    """How many greedy completions match the peer's text exactly, on the prompts both ran."""
    if not peer or not lm_texts:
        return "-"
    theirs = [decode(o) if isinstance(o, list) else o for o in peer["outputs"]]
    pairs = list(zip(lm_texts, theirs))
    return f"{sum(a.strip() == b.strip() for a, b in pairs)}/{len(pairs)}"


def write_docs(text: str, command: str, meta: dict) -> None:
    from lmforge.benchmark import write_docs_section

    write_docs_section(ROOT / "docs" / "benchmarks.md", "serving", text)


def doc_section(table_text: str, targets: dict, meta: dict, command: str) -> str:
    goals = "\n".join(f"- {name}: **{value}** (target {goal}) — {'met' if met else 'NOT met'}"
                      for name, (value, goal, met) in targets.items())
    return (
        "## Serving: concurrent streaming clients on SmolLM2-135M\n\n"
        f"```bash\n{command}\n```\n\n"
        f"{meta['date']}, {meta['machine']}; torch {meta['torch']}, transformers {meta['transformers']}, "
        f"llama-cpp-python {meta['llama_cpp']}, httpx {meta['httpx']}. Load average before the run: "
        f"{meta['load_before']}{meta['contention']}.\n\n"
        f"Every request is one of {meta['prompts_total']} distinct chat prompts (\"Explain X in two sentences.\", "
        "\"Write a short paragraph about X for a ten-year-old.\"), rendered once by the GGUF's chat template "
        f"(default system prompt included, {meta['prompt_tokens']} prompt tokens each), greedy, "
        f"`max_tokens={MAX_TOKENS}`; tok/s counts the tokens actually generated (stops at EOS count less) "
        "over the wall time of the level. lmforge: `lmforge serve` (its default: the GGUF's Q4_1 blocks on "
        "lmforge's kernels, "
        f"`--max-num-seqs {meta['max_num_seqs']}`, defaults otherwise) on 127.0.0.1; every engine computes on "
        f"{meta['threads']} thread(s); C asyncio + httpx clients "
        "stream `POST /v1/chat/completions` and pull N = max(2C, 8) requests from one queue; TTFT is "
        "request sent -> first content chunk, ITL the gaps between content chunks, a failure any non-200, "
        f"exception or {REQUEST_TIMEOUT_S:.0f} s timeout. The load generator shares the 2 cores with the server. "
        f"Peers, each in its own process before the server starts, on the first {meta['peer_prompts']} prompts "
        "(half of the 16-client level's 32) as the same token ids: transformers `generate` at batch 8 "
        "(fp32, the same GGUF dequantized, left padding; TTFT and ITL from per-step timestamps, TTFT "
        "measured from each batch's start) and llama-cpp-python `create_completion` one prompt after another "
        "(Q4_1 native kernels, so it does less arithmetic per token than fp32 transformers).\n\n"
        f"{table_text}\n\n{goals}\n\n"
        f"Greedy outputs at 16 clients identical to transformers: {meta['agree_transformers']}; to llama.cpp: "
        f"{meta['agree_llama_cpp']} (llama.cpp computes in Q4_1, so drift there is expected).\n\n"
        "![generated tokens/s vs concurrent clients](../bench/results/serving_throughput.png)\n\n"
        "Raw numbers: `bench/results/serving.json`.")


# -- native blocks vs llama-server (issue 26) ---------------------------------------------------------

def run_native_comparison(args: argparse.Namespace, model: Path, meta: dict, t0: float) -> None:
    """lmforge native, lmforge fp32 and llama-server, one server at a time, repetitions interleaved."""
    deadline = t0 + args.max_minutes * 60
    engines = [e for e in args.engines if e in SERVER_ENGINES]
    llama = find_llama_server(args.llama_server)
    meta["llama_server"] = _llama_server_version(llama) if llama else (
        "NOT BUILT here: no llama-server binary found, so the llama-server rows and ratios are missing")
    if "llama-server" in engines and llama is None:
        print(f"llama-server: {meta['llama_server']}", file=sys.stderr)
        engines.remove("llama-server")
    runs: dict[str, list[dict]] = {e: [] for e in engines}
    for rep in range(args.repeats):
        for engine in engines:
            print(f"[{time.time() - t0:5.0f} s] repetition {rep + 1}/{args.repeats}: {engine}", file=sys.stderr)
            try:
                runs[engine].append(bench_server(engine, model, PROMPTS, args.levels, deadline, args.threads, llama))
            except RuntimeError as err:
                print(f"  {engine}: {err}", file=sys.stderr)
                meta.setdefault("server_errors", []).append(f"{engine}: {str(err)[:300]}")
    level = str(TARGET_CLIENTS if TARGET_CLIENTS in args.levels else args.levels[-1])
    pooled = {e: {c: pool([r[c] for r in rs if c in r]) for c in map(str, args.levels) if any(c in r for r in rs)}
              for e, rs in runs.items() if rs}
    ratios, goals = compare_targets(pooled, level)
    meta.update(total_s=round(time.time() - t0, 1), load_after=load_before(), same_texts=same_texts(runs, level))
    report = compare_doc(compare_table(pooled), ratios, goals, meta, args.repeats, level)
    print(report)
    RESULTS.mkdir(parents=True, exist_ok=True)
    for rs in runs.values():  # keep per-request tokens, TTFT and errors; drop the long gap lists
        for r in (lv for run in rs for lv in run.values()):
            r["per_request"] = [{k: rec[k] for k in ("tokens", "ttft", "error")} for rec in r["per_request"]]
    (RESULTS / "serving_native.json").write_text(json.dumps(
        {"meta": meta, "pooled": pooled, "ratios": ratios, "goals": {k: list(v) for k, v in goals.items()},
         "runs": runs}, indent=1))
    if pooled:
        compare_plot(pooled, level, RESULTS / "serving_native.png")
    if not args.no_docs:
        from lmforge.benchmark import write_docs_section

        write_docs_section(ROOT / "docs" / "benchmarks.md", "serving-native", report)


# -- main ---------------------------------------------------------------------------------------------

def load_before() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def wait_for_quiet(max_wait_s: float) -> str:
    """Wait (up to max_wait_s) until no other bench/bench_* process runs; say what was seen."""
    start = time.time()
    while True:
        out = subprocess.run(["pgrep", "-af", "bench/bench_"], capture_output=True, text=True).stdout
        others = [ln for ln in out.splitlines() if ln and "bench_serving.py" not in ln and "pgrep" not in ln]
        if not others:
            return "" if time.time() - start < 1 else f"; waited {time.time() - start:.0f} s for other benchmarks"
        if time.time() - start > max_wait_s:
            names = "; ".join(" ".join(o.split()[1:4]) for o in others)
            return f"; other benchmarks were running during this run ({names}), so numbers are contended"
        print(f"  waiting for other benchmarks: {len(others)} running", file=sys.stderr)
        time.sleep(30)


def parse_args() -> argparse.Namespace:
    """Command-line options (the docstring's Run lines show them in use)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="levels 1 and 4, 8 prompts for the peers")
    parser.add_argument("--levels", type=lambda v: [int(x) for x in v.split(",")], default=None,
                        help="comma-separated client counts (default 1,4,16,64; --quick 1,4)")
    parser.add_argument("--engines", type=lambda v: v.split(","), default=["lmforge", *WORKERS],
                        help=f"comma-separated, from {', '.join(ENGINES)}; lmforge-fp32 or llama-server "
                             "selects the native comparison report")
    parser.add_argument("--repeats", type=int, default=1,
                        help="interleaved repetitions of the server engines (native comparison only)")
    parser.add_argument("--llama-server", default=None, help="llama-server binary (default: $LLAMA_SERVER, "
                        "the build cache, PATH)")
    parser.add_argument("--max-minutes", type=float, default=15.0, help="hard cap on the whole run")
    parser.add_argument("--wait-quiet-minutes", type=float, default=0.0,
                        help="first wait up to this long for other bench/bench_* processes to end")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="compute threads of every engine (1 keeps a shared machine from thrashing)")
    parser.add_argument("--peer-prompts", type=int, default=16, help="prompts for the peers (2 batches of 8)")
    parser.add_argument("--no-docs", action="store_true", help="do not write docs/benchmarks.md")
    parser.add_argument("--worker"), parser.add_argument("--job"), parser.add_argument("--out")
    args = parser.parse_args()
    unknown = sorted(set(args.engines) - set(ENGINES))
    if unknown:
        parser.error(f"--engines: unknown {', '.join(unknown)}; choose from {', '.join(ENGINES)}")
    args.levels = args.levels or ([1, 4] if args.quick else [1, 4, 16, 64])
    return args


def main() -> None:
    args = parse_args()
    if args.worker:
        job = json.loads(Path(args.job).read_text())
        result = WORKERS[args.worker](Path(job["model"]), job["prompts"], job["stop_ids"], job["batch"],
                                      job["threads"])
        Path(args.out).write_text(json.dumps(result))
        return

    from lmforge import hub
    from lmforge.tokenizer import Tokenizer

    contention = wait_for_quiet(args.wait_quiet_minutes * 60)
    t0 = time.time()
    model = hub.resolve("smollm2-135m-instruct", pull_missing=True)
    tok = Tokenizer.load(model)
    rendered = [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True),
                           add_special_tokens=False) for p in PROMPTS]
    meta = {"date": date.today().isoformat(), "machine": f"{os.cpu_count()} CPUs, {_cpu_model()}",
            "torch": _version("torch"), "transformers": _version("transformers"),
            "llama_cpp": _version("llama_cpp"), "httpx": _version("httpx"), "load_before": load_before(),
            "contention": contention, "prompts_total": len(PROMPTS),
            "prompt_tokens": f"{min(map(len, rendered))}-{max(map(len, rendered))}",
            "max_num_seqs": max(args.levels), "model": str(model), "threads": args.threads,
            "command": "python bench/bench_serving.py" + "".join(f" {shlex.quote(a)}" for a in sys.argv[1:])}
    if {"lmforge-fp32", "llama-server"} & set(args.engines):
        run_native_comparison(args, model, meta, t0)
    else:
        run_serving(args, model, tok, rendered, meta, t0)


def run_serving(args: argparse.Namespace, model: Path, tok, rendered: list[list[int]], meta: dict,
                t0: float) -> None:
    """The original report: lmforge serve over the levels vs transformers and llama-cpp-python peers."""
    deadline = t0 + args.max_minutes * 60
    n_peer = 8 if args.quick else args.peer_prompts
    meta["peer_prompts"] = n_peer
    peers, raw = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        job = Path(tmp) / "job.json"
        job.write_text(json.dumps({"model": str(model), "prompts": rendered[:n_peer], "stop_ids": sorted(tok.stop_ids),
                                   "batch": 8, "threads": args.threads}))
        for name in (w for w in WORKERS if w in args.engines):
            print(f"[{time.time() - t0:5.0f} s] {name} on {n_peer} prompts", file=sys.stderr)
            raw[name] = run_peer(name, job, deadline - time.time())
            if raw[name]:
                peers[name] = summarize(raw[name]["records"], raw[name]["wall_s"])
                print(f"  {name}: {peers[name]['tok_s']:.1f} tok/s", file=sys.stderr)
    lmforge = {}
    if "lmforge" in args.engines:
        print(f"[{time.time() - t0:5.0f} s] lmforge serve, levels {args.levels}", file=sys.stderr)
        lmforge = bench_server("lmforge", model, PROMPTS, args.levels, deadline, args.threads)
    target_level = lmforge.get(str(TARGET_CLIENTS)) or lmforge.get(str(args.levels[-1]), {})
    lm_texts = target_level.get("texts", [])[:n_peer]
    meta["agree_transformers"] = agreement(lm_texts, raw.get("transformers"),
                                           lambda ids: tok.decode(ids, skip_special_tokens=True))
    meta["agree_llama_cpp"] = agreement(lm_texts, raw.get("llama.cpp"), None)
    meta["total_s"] = round(time.time() - t0, 1)
    targets = targets_of(lmforge, peers)
    table_text = table(lmforge, peers)
    print(table_text)
    for name, (value, goal, met) in targets.items():
        print(f"- {name}: {value} (target {goal}) — {'met' if met else 'NOT met'}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "serving.json").write_text(json.dumps(
        {"meta": meta, "lmforge": lmforge, "peers": peers, "targets": {k: list(v) for k, v in targets.items()},
         "peer_texts": {k: [tok.decode(o, skip_special_tokens=True) if isinstance(o, list) else o
                            for o in v["outputs"]] if v else None for k, v in raw.items()}}, indent=1))
    plot(lmforge, peers, RESULTS / "serving_throughput.png")
    if not args.no_docs:
        write_docs(doc_section(table_text, targets, meta, meta["command"]), meta["command"], meta)


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def _llama_server_version(binary: Path) -> str:
    """`llama-server --version`'s version line, e.g. 'version: 1 (abc123)'."""
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30)
    lines = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.startswith("version")]
    return lines[0] if lines else "version unknown"


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except (ImportError, AttributeError):
        return "absent"


if __name__ == "__main__":
    main()

"""Serving benchmark: `lmforge serve` under 1-64 streaming clients vs transformers and llama.cpp.

One run on SmolLM2-135M (the registry GGUF), the same chat prompts rendered once to token ids
by the model's template, greedy, 64 new tokens at most:

- lmforge: `lmforge serve` as a subprocess on a free 127.0.0.1 port; an asyncio + httpx load
  generator streams `POST /v1/chat/completions` with C workers pulling N = max(2C, 8) requests.
- transformers: `generate` at batch 8 (left padding, fp32, the same GGUF dequantized).
- llama.cpp: llama-cpp-python completing the same prompt ids one after another (Q4_1 native).

Peers run first, each in its own process, before the server starts: never two engines at once.
Run:

    python bench/bench_serving.py              # levels 1, 4, 16, 64; peers on 16 prompts
    python bench/bench_serving.py --threads 1  # the same on one thread per engine (shared machine)
    python bench/bench_serving.py --quick    # levels 1 and 4, 8 prompts (smoke test)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
MAX_TOKENS = 64
REQUEST_TIMEOUT_S = 120.0
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


def percentiles(values: list[float]) -> dict:
    """p50/p95/p99 (linear interpolation) of `values`; None when there are none."""
    if not values:
        return {"p50": None, "p95": None, "p99": None}
    import numpy as np

    p = np.percentile(np.asarray(values, dtype=float), [50, 95, 99])
    return {"p50": float(p[0]), "p95": float(p[1]), "p99": float(p[2])}


def summarize(records: list[dict], wall_s: float, **extra) -> dict:
    """Throughput and latency percentiles of per-request records {tokens, ttft, itl, error}."""
    ok = [r for r in records if not r.get("error")]
    tokens = sum(r["tokens"] for r in ok)
    return {"requests": len(records), "failures": len(records) - len(ok), "completion_tokens": tokens,
            "wall_s": wall_s, "tok_s": tokens / wall_s if wall_s > 0 else 0.0,
            "ttft_s": percentiles([r["ttft"] for r in ok if r["ttft"] is not None]),
            "itl_s": percentiles([gap for r in ok for gap in r["itl"]]),
            "errors": sorted({r["error"] for r in records if r.get("error")})[:5], **extra}


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


# -- lmforge server and load generator ----------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, max_num_seqs: int, threads: int) -> tuple[subprocess.Popen, str, Path]:
    import httpx

    port, log = free_port(), Path(tempfile.mkstemp(suffix=".serve.log")[1])
    cmd = [sys.executable, "-m", "lmforge.cli", "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
           "--served-name", "smol", "--max-num-seqs", str(max_num_seqs)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}  # torch's intra-op threads in the server
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log.open("w"), cwd=ROOT, env=env)
    base, deadline = f"http://127.0.0.1:{port}", time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return proc, base, log
        except httpx.HTTPError:
            time.sleep(0.3)
    stop_server(proc)
    raise RuntimeError(f"lmforge serve did not come up; its log:\n{log.read_text()[-2000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def one_request(client, base: str, prompt: str) -> dict:
    """Stream one chat completion; TTFT to the first content chunk, gaps between content chunks."""
    body = {"model": "smol", "messages": [{"role": "user", "content": prompt}], "max_tokens": MAX_TOKENS,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    record = {"tokens": 0, "ttft": None, "itl": [], "text": "", "error": None}
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", f"{base}/v1/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                record["error"] = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return record
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    record["tokens"] = chunk["usage"]["completion_tokens"]
                for choice in chunk["choices"]:
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        now = time.perf_counter()
                        if record["ttft"] is None:
                            record["ttft"] = now - start
                        else:
                            record["itl"].append(now - last)
                        last, record["text"] = now, record["text"] + text
    except Exception as err:  # timeouts, resets: counted as failures, named in the results
        record["error"] = f"{type(err).__name__}: {err}"[:200]
    return record


async def run_level(base: str, prompts: list[str], clients: int, budget_s: float) -> dict:
    """C workers drain a queue of prompts; stops early (marked truncated) when the time budget ends."""
    import httpx

    queue: asyncio.Queue = asyncio.Queue()
    for i, p in enumerate(prompts):
        queue.put_nowait((i, p))
    records: dict[int, dict] = {}
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)

    async def worker(client) -> None:
        while not queue.empty():
            i, prompt = queue.get_nowait()
            records[i] = await one_request(client, base, prompt)

    async def progress(start: float) -> None:
        while True:
            await asyncio.sleep(5)
            done = sum(r["tokens"] for r in records.values())
            print(f"    {clients:>2} clients: {len(records)}/{len(prompts)} requests, {done} tokens, "
                  f"{time.perf_counter() - start:.0f} s", file=sys.stderr)

    start, truncated = time.perf_counter(), False
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, limits=limits) as client:
        ticker = asyncio.create_task(progress(start))
        try:
            await asyncio.wait_for(asyncio.gather(*(worker(client) for _ in range(clients))), budget_s)
        except asyncio.TimeoutError:
            truncated = True
        finally:
            ticker.cancel()
    wall = time.perf_counter() - start
    ordered = [records[i] for i in sorted(records)]
    return summarize(ordered, wall, clients=clients, truncated=truncated, texts=[r["text"] for r in ordered])


def bench_lmforge(model: Path, prompts: list[str], levels: list[int], deadline: float, threads: int) -> dict:
    proc, base, log = start_server(model, max(levels), threads)
    results = {}
    try:
        print(f"  server up at {base}; warm-up", file=sys.stderr)
        asyncio.run(run_level(base, prompts[-2:], 1, 120))  # warm-up, untimed
        for clients in levels:
            budget = deadline - time.time()
            if budget <= 5:
                print(f"  {clients} clients: skipped (time cap)", file=sys.stderr)
                continue
            n = max(2 * clients, 8)
            results[str(clients)] = r = asyncio.run(run_level(base, prompts[:n], clients, budget))
            print(f"  {clients:>2} clients: {r['tok_s']:.1f} tok/s, TTFT p99 {_fmt(r['ttft_s']['p99'])} s, "
                  f"{r['failures']} failed{' (TRUNCATED)' if r['truncated'] else ''}", file=sys.stderr)
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
        "over the wall time of the level. lmforge: `lmforge serve` (fp32, dequantized GGUF, "
        f"`--max-num-seqs {meta['max_num_seqs']}`, defaults otherwise) on 127.0.0.1; every engine computes on "
        f"{meta['threads']} thread(s); C asyncio + httpx clients "
        "stream `POST /v1/chat/completions` and pull N = max(2C, 8) requests from one queue; TTFT is "
        "request sent -> first content chunk, ITL the gaps between content chunks, a failure any non-200, "
        f"exception or {REQUEST_TIMEOUT_S:.0f} s timeout. The load generator shares the 2 cores with the server. "
        f"Peers, each in its own process before the server starts, on the first {meta['peer_prompts']} prompts "
        "(half of the 16-client level's 32) as the same token ids: transformers `generate` at batch 8 "
        "(fp32, the same GGUF dequantized, left padding; TTFT and ITL from per-step timestamps, TTFT "
        "measured from each batch's start) and llama-cpp-python `create_completion` one prompt after another "
        "(Q4_1 native kernels, so it does less arithmetic per token than the fp32 engines).\n\n"
        f"{table_text}\n\n{goals}\n\n"
        f"Greedy outputs at 16 clients identical to transformers: {meta['agree_transformers']}; to llama.cpp: "
        f"{meta['agree_llama_cpp']} (llama.cpp computes in Q4_1, so drift there is expected).\n\n"
        "![generated tokens/s vs concurrent clients](../bench/results/serving_throughput.png)\n\n"
        "Raw numbers: `bench/results/serving.json`.")


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="levels 1 and 4, 8 prompts for the peers")
    parser.add_argument("--max-minutes", type=float, default=15.0, help="hard cap on the whole run")
    parser.add_argument("--wait-quiet-minutes", type=float, default=0.0,
                        help="first wait up to this long for other bench/bench_* processes to end")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="compute threads of every engine (1 keeps a shared machine from thrashing)")
    parser.add_argument("--peer-prompts", type=int, default=16, help="prompts for the peers (2 batches of 8)")
    parser.add_argument("--no-docs", action="store_true", help="do not write docs/benchmarks.md")
    parser.add_argument("--worker"), parser.add_argument("--job"), parser.add_argument("--out")
    args = parser.parse_args()
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
    deadline = t0 + args.max_minutes * 60
    levels = [1, 4] if args.quick else [1, 4, 16, 64]
    n_peer = 8 if args.quick else args.peer_prompts
    model = hub.resolve("smollm2-135m-instruct", pull_missing=True)
    tok = Tokenizer.load(model)
    rendered = [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True),
                           add_special_tokens=False) for p in PROMPTS]
    stop_ids = sorted(tok.stop_ids)
    meta = {"date": date.today().isoformat(), "machine": f"{os.cpu_count()} CPUs, {_cpu_model()}",
            "torch": _version("torch"), "transformers": _version("transformers"),
            "llama_cpp": _version("llama_cpp"), "httpx": _version("httpx"), "load_before": load_before(),
            "contention": contention, "prompts_total": len(PROMPTS), "peer_prompts": n_peer,
            "prompt_tokens": f"{min(map(len, rendered))}-{max(map(len, rendered))}",
            "max_num_seqs": max(levels), "model": str(model), "threads": args.threads}
    peers, raw = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        job = Path(tmp) / "job.json"
        job.write_text(json.dumps({"model": str(model), "prompts": rendered[:n_peer], "stop_ids": stop_ids,
                                   "batch": 8, "threads": args.threads}))
        for name in WORKERS:
            print(f"[{time.time() - t0:5.0f} s] {name} on {n_peer} prompts", file=sys.stderr)
            raw[name] = run_peer(name, job, deadline - time.time())
            if raw[name]:
                peers[name] = summarize(raw[name]["records"], raw[name]["wall_s"])
                print(f"  {name}: {peers[name]['tok_s']:.1f} tok/s", file=sys.stderr)
    print(f"[{time.time() - t0:5.0f} s] lmforge serve, levels {levels}", file=sys.stderr)
    lmforge = bench_lmforge(model, PROMPTS, levels, deadline, args.threads)
    target_level = lmforge.get(str(TARGET_CLIENTS)) or lmforge.get(str(levels[-1]), {})
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
    command = "python bench/bench_serving.py" + (" --quick" if args.quick else "") + \
        (f" --threads {args.threads}" if args.threads != os.cpu_count() else "") + \
        (f" --peer-prompts {args.peer_prompts}" if args.peer_prompts != 16 and not args.quick else "")
    if not args.no_docs:
        write_docs(doc_section(table_text, targets, meta, command), command, meta)


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

"""OpenAI-compatible servers as subprocesses and the asyncio + httpx streaming load generator.

Used by bench/bench_serving.py for `lmforge serve` (native GGUF blocks or `--dtype float32`) and for
llama.cpp's own `llama-server`: both are started on a free 127.0.0.1 port, waited for on GET /health
and driven by the same `run_level`.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_TOKENS = 64
REQUEST_TIMEOUT_S = 120.0
STARTUP_TIMEOUT_S = 180.0
SERVER_ENGINES = ("lmforge", "lmforge-fp32", "llama-server")
CLK_TCK = os.sysconf("SC_CLK_TCK")
LLAMA_SERVER_CACHE = Path("~/.cache/llama-server/src/vendor/llama.cpp/build/bin/llama-server").expanduser()


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


# -- servers --------------------------------------------------------------------------------------------

def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_llama_server(path: str | None) -> Path | None:
    """The llama-server binary: `path`, $LLAMA_SERVER, the build script's cache, or PATH; None if absent."""
    for candidate in (path, os.environ.get("LLAMA_SERVER"), LLAMA_SERVER_CACHE, shutil.which("llama-server")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return Path(candidate)
    return None


def server_command(engine: str, model: Path, port: int, slots: int, threads: int,
                   llama_server: Path | None) -> list[str]:
    """The command line that serves `model` on `port` with `slots` concurrent sequences."""
    if engine == "llama-server":
        if llama_server is None:
            raise ValueError("llama-server binary not found: build it with cmake from the llama.cpp source in the "
                             "llama-cpp-python sdist, then pass --llama-server PATH or set $LLAMA_SERVER")
        return [str(llama_server), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
                "-t", str(threads), "-tb", str(threads), "-np", str(slots), "-c", str(256 * slots), "--no-webui"]
    cmd = [sys.executable, "-m", "lmforge.cli", "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
           "--served-name", "smol", "--max-num-seqs", str(slots)]
    return cmd + (["--dtype", "float32"] if engine == "lmforge-fp32" else [])


def start_server(cmd: list[str], threads: int) -> tuple[subprocess.Popen, str, Path]:
    """Start `cmd` (which listens on the port after --port) and wait until GET /health answers 200."""
    import httpx

    port, log = cmd[cmd.index("--port") + 1], Path(tempfile.mkstemp(suffix=".serve.log")[1])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}  # torch's intra-op threads in lmforge serve
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    base, deadline = f"http://127.0.0.1:{port}", time.time() + STARTUP_TIMEOUT_S
    while time.time() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return proc, base, log
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    stop_server(proc)
    raise RuntimeError(f"{Path(cmd[0]).name} did not come up; its log:\n{log.read_text()[-2000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 60 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def cpu_ticks(pid: int) -> tuple[int, int]:
    """Busy clock ticks of the whole machine (steal included) and of `pid` plus this process, from /proc."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    server = sum(map(int, Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[11:13]))  # utime, stime
    mine = os.times()
    return user + nice + system + irq + softirq + steal, server + round((mine.user + mine.system) * CLK_TCK)


def other_cores(before: tuple[int, int], after: tuple[int, int], wall_s: float) -> float:
    """Cores that processes other than the server and the load generator kept busy between two cpu_ticks."""
    return max((after[0] - before[0]) - (after[1] - before[1]), 0) / CLK_TCK / max(wall_s, 1e-9)


# -- load generator -------------------------------------------------------------------------------------

async def one_request(client, base: str, prompt: str) -> dict:
    """Stream one chat completion; TTFT to the first content chunk, gaps between content chunks."""
    body = {"model": "smol", "messages": [{"role": "user", "content": prompt}], "max_tokens": MAX_TOKENS,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    record = {"tokens": 0, "prompt_tokens": None, "chunks": 0, "ttft": None, "itl": [], "text": "", "error": None}
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
                    record["prompt_tokens"] = chunk["usage"].get("prompt_tokens")
                for choice in chunk.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        now = time.perf_counter()
                        if record["ttft"] is None:
                            record["ttft"] = now - start
                        else:
                            record["itl"].append(now - last)
                        last, record["text"], record["chunks"] = now, record["text"] + text, record["chunks"] + 1
        if record["tokens"] == 0 and record["chunks"]:
            record["error"] = "no usage in the stream (completion tokens unknown)"
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
    # a fresh connection per request: reusing a pooled one that llama-server has just closed fails as
    # "Server disconnected without sending a response" (seen on 2-4 of 32 requests at 16 clients)
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=0)

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
    prompt_tokens = [r["prompt_tokens"] for r in ordered if r.get("prompt_tokens")]
    return summarize(ordered, wall, clients=clients, truncated=truncated, texts=[r["text"] for r in ordered],
                     per_request=[{k: r[k] for k in ("tokens", "ttft", "itl", "error")} for r in ordered],
                     prompt_tokens=f"{min(prompt_tokens)}-{max(prompt_tokens)}" if prompt_tokens else "-")

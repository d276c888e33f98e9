"""The report of bench/bench_serving.py's native comparison (issue 26): lmforge serve on native GGUF blocks
and with `--dtype float32` against llama.cpp's llama-server, pooled over interleaved repetitions."""

from __future__ import annotations

from pathlib import Path

from serving_load import MAX_TOKENS, REQUEST_TIMEOUT_S, summarize

NATIVE_TARGET_RATIO, NATIVE_TARGET_TTFT_P99_S = 3.0, 1.0  # issue 26: lmforge native vs llama-server
CONTENDED_CORES = 0.25  # other processes busier than this during a repetition: left out of the pooled numbers

LABELS = {"lmforge": "lmforge serve (native Q4_1 blocks)", "lmforge-fp32": "lmforge serve --dtype float32",
          "llama-server": "llama-server (llama.cpp)"}


def pool(runs: list[dict]) -> dict:
    """One engine's repetitions of a level as one summary over the uncontended ones (all when none is)."""
    clean = [r for r in runs if r.get("other_cores", 0.0) <= CONTENDED_CORES]
    used = clean or runs
    out = summarize([rec for r in used for rec in r["per_request"]], sum(r["wall_s"] for r in used),
                    clients=runs[0]["clients"], truncated=any(r["truncated"] for r in used),
                    prompt_tokens=runs[0]["prompt_tokens"])
    return {**out, "tok_s_each": [r["tok_s"] for r in runs], "contended": not clean,
            "other_cores_each": [r.get("other_cores", 0.0) for r in runs]}


def _each(r: dict) -> str:
    """tok/s of each repetition, * on the contended ones."""
    return " / ".join(f"{x:.1f}{'*' if c > CONTENDED_CORES else ''}"
                      for x, c in zip(r["tok_s_each"], r["other_cores_each"]))


def compare_table(pooled: dict) -> str:
    """A row per engine and level; tok/s over all repetitions (each one in brackets), ratio to llama-server."""
    lines = ["| engine | clients | tok/s (each repetition) | vs llama-server | TTFT p50 / p99 (s) | "
             "ITL p50 / p99 (ms) | prompt tokens | requests | failed |", "| --- " * 9 + "|"]
    for engine, levels in pooled.items():
        for c, r in levels.items():
            base = pooled.get("llama-server", {}).get(c, {}).get("tok_s")
            t, i = r["ttft_s"], r["itl_s"]
            ratio = f"{r['tok_s'] / base:.2f}x" if base else "-"
            lines.append(f"| {LABELS[engine]}{' (truncated)' if r['truncated'] else ''} | {c} | "
                         f"**{r['tok_s']:.1f}** ({_each(r)}) | "
                         f"{ratio} | {_fmt(t['p50'])} / {_fmt(t['p99'])} | "
                         f"{_fmt(i['p50'], 1e3, 0)} / {_fmt(i['p99'], 1e3, 0)} | {r['prompt_tokens']} | "
                         f"{r['requests']} | {r['failures']} |")
    return "\n".join(lines)


def ratio_of(pooled: dict, a: str, b: str, level: str) -> tuple[float, list[float]] | None:
    """tok/s of engine a over engine b at `level`: pooled, and for each interleaved repetition."""
    ra, rb = pooled.get(a, {}).get(level), pooled.get(b, {}).get(level)
    if not ra or not rb or not rb["tok_s"]:
        return None
    pairs = zip(ra["tok_s_each"], rb["tok_s_each"], ra["other_cores_each"], rb["other_cores_each"])
    return ra["tok_s"] / rb["tok_s"], [x / y for x, y, cx, cy in pairs if y and max(cx, cy) <= CONTENDED_CORES]


def compare_targets(pooled: dict, level: str) -> tuple[dict, dict]:
    """Ratios at `level` ({name: text}) and issue 26's goals ({name: (value, goal, met or None)})."""
    ratios = {}
    for a, b in (("lmforge", "llama-server"), ("lmforge-fp32", "llama-server"), ("lmforge", "lmforge-fp32")):
        r = ratio_of(pooled, a, b, level)
        if r:
            each = ", ".join(f"{x:.2f}x" for x in r[1]) or "none uncontended"
            ratios[f"{a} / {b}"] = f"{r[0]:.2f}x (repetitions: {each})"
    native, vs = pooled.get("lmforge", {}).get(level), ratio_of(pooled, "lmforge", "llama-server", level)
    judged = not any(lv.get(level, {}).get("contended") for lv in pooled.values())  # else None: not judged
    goals = {f"lmforge native / llama-server tok/s at {level} clients":
             (f"{vs[0]:.2f}x" if vs else "not measured", f">= {NATIVE_TARGET_RATIO:g}x",
              vs[0] >= NATIVE_TARGET_RATIO if vs and judged else None)}
    if native:
        p99 = native["ttft_s"]["p99"]
        goals[f"lmforge native TTFT p99 at {level} clients"] = (
            f"{_fmt(p99)} s", f"< {NATIVE_TARGET_TTFT_P99_S:g} s",
            (p99 is not None and p99 < NATIVE_TARGET_TTFT_P99_S) if judged else None)
    failed = sum(lv[level]["failures"] for lv in pooled.values() if level in lv)
    truncated = any(lv[level]["truncated"] for lv in pooled.values() if level in lv)
    goals[f"failed requests at {level} clients, all engines"] = (f"{failed}{' (truncated)' if truncated else ''}",
                                                                "0", failed == 0 and not truncated)
    return ratios, goals


def goal_lines(goals: dict) -> str:
    """One markdown bullet per goal: value, target, met / NOT met / not judged."""
    verdict = {True: "met", False: "NOT met", None: "not judged"}
    return "\n".join(f"- {name}: **{value}** (target {goal}) — {verdict[met]}"
                     for name, (value, goal, met) in goals.items())


def same_texts(runs: dict, level: str) -> dict:
    """Greedy completions identical between engine pairs at `level`, first repetition."""
    texts = {e: r[0][level]["texts"] for e, r in runs.items() if r and level in r[0]}
    names = list(texts)
    return {f"{a} = {b}": f"{sum(x.strip() == y.strip() for x, y in zip(texts[a], texts[b]))}/"
            f"{min(len(texts[a]), len(texts[b]))}" for i, a in enumerate(names) for b in names[i + 1:]}


def compare_plot(pooled: dict, level: str, path: Path) -> None:
    """Bars of tok/s per engine at `level`, a dot per repetition."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engines = [e for e in pooled if level in pooled[e]]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.bar(range(len(engines)), [pooled[e][level]["tok_s"] for e in engines], color="tab:blue", alpha=0.7)
    for x, e in enumerate(engines):
        each = pooled[e][level]["tok_s_each"]
        ax.plot([x] * len(each), each, "k.", label="one repetition" if x == 0 else None)
    ax.set_xticks(range(len(engines)), [LABELS[e].replace(" (", "\n(") for e in engines], fontsize=8)
    ax.set_ylabel("generated tokens / s")
    ax.set_title(f"SmolLM2-135M Q4_1, {level} streaming clients, 64 new tokens, CPU")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare_doc(table_text: str, ratios: dict, goals: dict, meta: dict, repeats: int, level: str) -> str:
    """The `serving-native` section of docs/benchmarks.md: command, setup, table, ratios, verdict."""
    met = [m for _, _, m in goals.values()]
    verdict = ("not judged (an engine is missing, or every repetition of one was contended)" if None in met
               else "met" if all(met) else "NOT met")
    errors = "".join(f"\n- server error: {e}" for e in meta.get("server_errors", []))
    return (
        f"## Serving at {level} clients: native GGUF blocks vs llama.cpp's llama-server (issue 26)\n\n"
        f"```bash\n{meta['command']}\n```\n\n"
        f"{meta['date']}, {meta['machine']}; torch {meta['torch']}, httpx {meta['httpx']}; llama-server: "
        f"{meta['llama_server']}. Load average (1 / 5 / 15 min) before: {meta['load_before']}, "
        f"after: {meta['load_after']}"
        f"{meta['contention']}; {meta['total_s']:.0f} s in all.\n\n"
        f"SmolLM2-135M-Instruct, the registry's Q4_1 GGUF, served three ways, one server at a time, each a fresh "
        f"process per repetition ({repeats} repetition(s), engines interleaved): `lmforge serve` by default (the "
        "GGUF blocks on lmforge's kernels, the fused paged decode step), `lmforge serve --dtype float32` "
        "(dequantized) and llama.cpp's own `llama-server -t T -tb T -np S -c 256*S --no-webui` (built with cmake "
        "from the llama.cpp source in the llama-cpp-python sdist; continuous batching; "
        f"T = {meta['threads']} threads, S = {meta['max_num_seqs']} slots = lmforge's `--max-num-seqs`). "
        "The same asyncio + httpx load generator streams `POST /v1/chat/completions` (greedy, temperature 0, "
        f"`max_tokens={MAX_TOKENS}`) with C clients pulling N = max(2C, 8) distinct chat prompts from one "
        "queue, each request on a fresh connection, after one untimed warm-up; each server applies the "
        "GGUF's chat template itself (prompt "
        "tokens as the servers report them). tok/s counts generated tokens over the level's wall time, "
        "pooled over the repetitions; TTFT is request sent -> first content chunk, a failure any non-200, "
        f"exception or {REQUEST_TIMEOUT_S:.0f} s timeout. The load generator shares the cores with the server. "
        f"A repetition during which other processes kept more than {CONTENDED_CORES:g} cores busy (the machine's "
        "busy ticks in /proc/stat, steal included, less the server's and the load generator's) is marked * and "
        "left out of the pooled numbers and the ratios.\n\n"
        f"{table_text}\n\n" + "".join(f"- {k}: {v}\n" for k, v in ratios.items()) +
        f"\n{goal_lines(goals)}{errors}\n\n**Issue 26's target (>= {NATIVE_TARGET_RATIO:g}x llama-server, TTFT p99 "
        f"< {NATIVE_TARGET_TTFT_P99_S:g} s, no failures): {verdict}.**\n\n"
        f"Greedy completions identical at {level} clients (first repetition): "
        + ", ".join(f"{k} {v}" for k, v in meta["same_texts"].items()) + ".\n\n"
        "![tok/s per engine](../bench/results/serving_native.png)\n\n"
        "Raw numbers: `bench/results/serving_native.json`.")


def _fmt(value: float | None, scale: float = 1.0, digits: int = 2) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"

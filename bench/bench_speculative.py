"""Speculative decoding benchmark: prompt lookup in lmforge and llama.cpp vs plain greedy, batch 1.

Three workloads from text that ships offline: rewriting State of the Union passages, editing
standard-library Python source, and open chat. Each (engine, workload, round) runs in a fresh
process; rounds rotate the engine order. Every engine sees the same chat-templated token ids and
decodes greedily; lmforge's speculative ids must equal its plain ids, or the run stops. Run:

    python bench/bench_speculative.py            # 3 rounds, 128 new tokens per prompt
    python bench/bench_speculative.py --quick    # 1 round, 32 new tokens; writes nothing
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import inspect
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_foundation import ROOT, machine_meta, verdict  # noqa: E402

ENGINES = ("lmforge", "lmforge ngram", "lmforge ngram k=8", "llama.cpp", "llama.cpp lookup")
PLAIN = {"lmforge ngram": "lmforge", "lmforge ngram k=8": "lmforge", "llama.cpp lookup": "llama.cpp"}
MODULES = {"lmforge": "lmforge", "llama.cpp": "llama_cpp"}
FIXED_K, LOOKUP_TOKENS, WARMUP_TOKENS = 8, 10, 8
TARGETS = {"rewrite": 2.0, "code": 2.0, "chat": 1.0}  # issue 26: lmforge ngram speedup over plain


# --- workloads: real text, chat-templated, the same ids for every engine --------------------

def sotu_passages(n: int = 3, words: int = 130) -> list[str]:
    """n passages of whole sentences (~`words` words) from the middle of speeches spread over 2000-."""
    from lmforge.data import sotu

    speeches = sotu.speeches(range(sotu.HELD_OUT_FROM, 3000))
    passages = []
    for speech in speeches[:: max(1, len(speeches) // n)][:n]:
        sentences = speech.text[len(speech.text) // 3:].split(". ")[1:]  # start at a sentence
        chosen: list[str] = []
        while sentences and sum(len(s.split()) for s in chosen) < words:
            chosen.append(sentences.pop(0))
        passages.append(". ".join(chosen).strip() + ".")
    return passages


def stdlib_excerpt(module: str, first: str, last: str) -> str:
    """The lines of a standard-library module from function `first` through function `last`."""
    mod = __import__(module)
    lines = inspect.getsourcelines(mod)[0]
    start = inspect.getsourcelines(getattr(mod, first))[1]
    body, end = inspect.getsourcelines(getattr(mod, last))
    return "".join(lines[start - 1:end - 1 + len(body)])


def workload_messages() -> dict[str, list[str]]:
    """The user messages of each workload."""
    rewrite = ("Rewrite the following passage from a State of the Union address, keeping every sentence, "
               "but replace \"we\" with \"the nation\". Output only the rewritten passage.\n\n")
    code = [("Add type hints to both functions. Output the full code.", ("textwrap", "dedent", "indent")),
            ("Rename the parameter `s` to `text` everywhere. Output the full code.", ("shlex", "split", "quote")),
            ("Rename the parameter `width` to `max_width` everywhere. Output the full code.",
             ("textwrap", "wrap", "shorten"))]
    return {
        "rewrite": [rewrite + p for p in sotu_passages()],
        "code": [f"{ask}\n\n```python\n{stdlib_excerpt(*where)}```" for ask, where in code],
        "chat": ["Write a short poem about autumn.", "What are some tips for learning a new language?",
                 "How do I make a good cup of coffee?"],
    }


def encode_workloads(tokenizer) -> dict[str, list[list[int]]]:
    """Token ids per workload: the chat template, encoded without extra special tokens."""
    return {name: [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": m}]),
                                    add_special_tokens=False) for m in messages]
            for name, messages in workload_messages().items()}


# --- workers: one engine, one workload, one round, in a fresh process ------------------------

def worker_lmforge(job: dict) -> list[dict]:
    """Plain greedy or n-gram speculative decoding; prefill timed apart, decode = total - prefill."""
    import torch

    from lmforge.benchmark import time_prefill
    from lmforge.checkpoint.load import load
    from lmforge.generation.drafts import NgramDraft
    from lmforge.generation.generate import generate_ids
    from lmforge.generation.sampling import SamplingParams
    from lmforge.generation.speculative import speculative_ids

    torch.set_num_threads(job["threads"])
    model, _ = load(job["model"])
    eos, k = set(job["eos"]), {"lmforge ngram": None, "lmforge ngram k=8": FIXED_K}.get(job["engine"], 0)

    def run(ids: list[int], n: int) -> tuple[list[int], dict]:
        params = SamplingParams(max_new_tokens=n, temperature=0)
        if k == 0:
            return generate_ids(model, [ids], params, eos)[0], {}
        out, stats = speculative_ids(model, [ids], params, NgramDraft(k=k), eos)
        return out[0], stats

    run(job["prompts"][0], WARMUP_TOKENS)  # untimed warm-up
    results = []
    for ids in job["prompts"]:
        prefill_s = time_prefill(model, ids)
        start = time.perf_counter()
        out, stats = run(ids, job["new_tokens"])
        results.append(_result(ids, out, prefill_s, time.perf_counter() - start, stats))
    return results


def worker_llama_cpp(job: dict) -> list[dict]:
    """llama.cpp greedy, plain or with LlamaPromptLookupDecoding; target forwards counted at `eval`."""
    from llama_cpp import Llama
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    lookup = job["engine"] == "llama.cpp lookup"
    draft = LlamaPromptLookupDecoding(num_pred_tokens=LOOKUP_TOKENS) if lookup else None
    # logits_all: a draft needs every row's logits, and Llama sizes its score buffer from this argument
    # alone (without it a prompt longer than n_batch overflows the buffer)
    llm = Llama(model_path=job["model"], n_ctx=2048, n_threads=job["threads"], draft_model=draft,
                logits_all=lookup, verbose=False)
    evals, eos = [0], set(job["eos"])
    plain_eval = llm.eval

    def counted_eval(tokens) -> None:
        evals[0] += 1
        plain_eval(tokens)

    llm.eval = counted_eval  # generate() calls self.eval once per target forward

    def run(ids: list[int], n: int) -> list[int]:
        llm.reset()
        out: list[int] = []
        for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
            if token in eos or len(out) >= n:
                break
            out.append(token)
        return out

    def prefill(ids: list[int]) -> float:
        llm.reset()
        start = time.perf_counter()
        plain_eval(ids)
        elapsed = time.perf_counter() - start
        llm.reset()  # so generate() runs its own prefill
        return elapsed

    run(job["prompts"][0], WARMUP_TOKENS)  # untimed warm-up
    results = []
    for ids in job["prompts"]:
        prefill_s = prefill(ids)
        evals[0] = 0
        start = time.perf_counter()
        out = run(ids, job["new_tokens"])
        total_s = time.perf_counter() - start
        stats = {"target_forwards": evals[0], "tokens": len(out),
                 "tokens_per_forward": len(out) / evals[0]} if lookup else {}
        results.append(_result(ids, out, prefill_s, total_s, stats))
    return results


def _result(ids: list[int], out: list[int], prefill_s: float, total_s: float, stats: dict) -> dict:
    """One prompt's numbers; decode time is generation time less a separately timed prefill."""
    return {"prompt_tokens": len(ids), "tokens": len(out), "ids": out, "prefill_s": prefill_s,
            "total_s": total_s, "decode_s": max(total_s - prefill_s, 1e-9), "spec": stats}


def run_worker(job: dict) -> list[dict] | None:
    """Run one job in a fresh interpreter; its per-prompt results, or None when it failed."""
    with tempfile.TemporaryDirectory() as tmp:
        job_file, out_file = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job_file.write_text(json.dumps(job))
        cmd = [sys.executable, __file__, "--worker", str(job_file), "--out", str(out_file)]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if result.returncode != 0:
            tail = result.stderr.strip().splitlines()[-1:] or ["(no stderr)"]
            print(f"\n{job['engine']} / {job['workload']}: worker failed (exit {result.returncode}): {tail[0]}",
                  file=sys.stderr)
            return None
        return json.loads(out_file.read_text())


# --- parent: rounds, exactness, summary, table, docs ----------------------------------------

def available(engine: str) -> bool:
    """Whether the engine's package is installed (a line on stderr when it is not)."""
    module = MODULES[engine.split()[0]]
    if importlib.util.find_spec(module) is not None:
        return True
    print(f"skipping {engine}: `{module}` is not installed (pip install -e .[bench])", file=sys.stderr)
    return False


def first_difference(a: list[int], b: list[int]) -> int:
    """Index of the first token where two id lists differ (the shorter length when one is a prefix)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def run_rounds(engines: list[str], prompts: dict, base_job: dict, rounds: int, decode) -> dict:
    """{workload: {engine: [per-round results]}}, engines rotated each round; exactness checked as it goes."""
    from tqdm import tqdm

    runs = {w: {e: [] for e in engines} for w in prompts}
    with tqdm(total=rounds * len(prompts) * len(engines), desc="bench") as bar:
        for r in range(rounds):
            for w, ids in prompts.items():
                order = engines[r % len(engines):] + engines[:r % len(engines)]
                got = {}
                for engine in order:
                    bar.set_postfix_str(f"round {r + 1}: {w} / {engine}")
                    load_avg = os.getloadavg()[0]
                    got[engine] = run_worker({**base_job, "engine": engine, "workload": w, "prompts": ids})
                    if got[engine] is not None:
                        runs[w][engine].append({"round": r + 1, "loadavg_1min_before": load_avg,
                                                "prompts": got[engine]})
                    bar.update()
                _check_round(w, r + 1, got, decode)
    return runs


def _check_round(workload: str, round_: int, got: dict, decode) -> None:
    """Exactness for lmforge; for llama.cpp, whether lookup kept its plain ids (not required); ids -> hash."""
    for engine, plain in PLAIN.items():
        if got.get(engine) is None or got.get(plain) is None:
            continue
        for i, (a, b) in enumerate(zip(got[plain], got[engine])):
            b["same_ids_as_plain"] = a["ids"] == b["ids"]
            if plain == "lmforge" and a["ids"] != b["ids"]:  # exact decoding: bit for bit, or the run stops
                raise SystemExit(f"EXACTNESS FAILURE: {engine} ids differ from plain lmforge greedy on {workload} "
                                 f"prompt {i}, round {round_}, first at token {first_difference(a['ids'], b['ids'])}")
    for engine, results in got.items():
        for p in results or []:
            if engine in ("lmforge", "llama.cpp"):
                p["text_head"] = decode(p["ids"])[:160]
            p["ids_sha1"] = hashlib.sha1(json.dumps(p.pop("ids")).encode()).hexdigest()[:12]


def process_stats(run: dict) -> dict:
    """One process's totals over its prompts: decode tok/s, prefill ms, acceptance, tokens/forward."""
    prompts = run["prompts"]
    tokens, decode_s = sum(p["tokens"] for p in prompts), sum(p["decode_s"] for p in prompts)
    out = {"tokens": tokens, "decode_tok_s": tokens / decode_s,
           "prefill_ms": 1000 * statistics.mean(p["prefill_s"] for p in prompts)}
    specs = [p["spec"] for p in prompts if p["spec"]]
    if specs:
        forwards = sum(s["target_forwards"] for s in specs)
        out["tokens_per_forward"] = sum(s["tokens"] for s in specs) / forwards
        out["ms_per_forward"] = 1000 * decode_s / max(1, forwards - len(specs))  # prefill forward excluded
        if "drafted" in specs[0]:
            out["acceptance_rate"] = sum(s["accepted"] for s in specs) / max(1, sum(s["drafted"] for s in specs))
    else:
        out["ms_per_forward"] = 1000 * decode_s / max(1, tokens - len(prompts))  # first token: from prefill
    return out


def med(values: list[float]) -> dict:
    """Median, min and max."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "per_round": values}


def paired(runs: dict, num: str, den: str) -> dict | None:
    """num/den decode tok/s per round (same round = adjacent processes, same machine state)."""
    by_round = {r["round"]: process_stats(r)["decode_tok_s"] for r in runs.get(den, [])}
    ratios = [process_stats(r)["decode_tok_s"] / by_round[r["round"]] for r in runs.get(num, [])
              if r["round"] in by_round]
    return med(ratios) if ratios else None


def summarize(runs: dict) -> dict:
    """{workload: {engine: {metric: median/min/max}, "speedup": {...}, "lmforge / llama.cpp lookup": ...}}."""
    out = {}
    for w, by_engine in runs.items():
        engines = {}
        for engine, rounds in by_engine.items():
            if not rounds:
                continue
            stats = [process_stats(r) for r in rounds]
            engines[engine] = {k: med([s[k] for s in stats]) for k in stats[0]}
            if engine in PLAIN:
                engines[engine]["speedup"] = paired(by_engine, engine, PLAIN[engine])
        out[w] = {"engines": engines, "lmforge ngram / llama.cpp lookup": paired(by_engine, "lmforge ngram",
                                                                                  "llama.cpp lookup")}
    return out


def _cell(stat: dict | None, fmt: str, unit: str = "") -> str:
    if not stat:
        return "-"
    return f"{stat['median']:{fmt}}{unit} ({stat['min']:{fmt}}-{stat['max']:{fmt}})"


def targets_of(summary: dict) -> dict:
    """The issue's targets: lmforge ngram (adaptive k) speedup over plain lmforge, per workload."""
    out = {}
    for w, goal in TARGETS.items():
        speedup = summary.get(w, {}).get("engines", {}).get("lmforge ngram", {}).get("speedup")
        if speedup:
            out[w] = {"value": speedup, "goal": f">= {goal:g}x", "verdict": verdict(speedup, goal, above=True)}
    return out


def table(summary: dict, targets: dict, exact: str) -> str:
    """The markdown table, then one line per workload with the targets and the head-to-head ratio."""
    lines = ["| workload | engine | new tokens (all prompts) | prefill ms | decode tok/s | speedup vs plain | acceptance | "
             "tokens / forward | ms / forward |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for w, s in summary.items():
        for engine, e in s["engines"].items():
            lines.append(f"| {w} | {engine} | {e['tokens']['median']:.0f} | {e['prefill_ms']['median']:.0f} | "
                         f"{_cell(e['decode_tok_s'], '.1f')} | {_cell(e.get('speedup'), '.2f', 'x')} | "
                         f"{_cell(e.get('acceptance_rate'), '.2f')} | {_cell(e.get('tokens_per_forward'), '.2f')} | "
                         f"{e['ms_per_forward']['median']:.1f} |")
    lines.append("")
    for w, s in summary.items():
        engines, line = s["engines"], f"- {w}:"
        if w in targets:
            t = targets[w]
            line += (f" lmforge ngram **{t['value']['median']:.2f}x** plain (per round {t['value']['min']:.3f}-"
                     f"{t['value']['max']:.2f}x; target {t['goal']}) — {t['verdict']};")
        if "lmforge ngram" in engines and "lmforge" in engines:  # speedup ~ tokens per forward / forward cost
            spec, plain = engines["lmforge ngram"], engines["lmforge"]
            line += (f" {spec['tokens_per_forward']['median']:.2f} tokens per target forward, each decode forward "
                     f"{spec['ms_per_forward']['median'] / plain['ms_per_forward']['median']:.2f}x a plain step's "
                     f"time;")
        if engines.get("llama.cpp lookup", {}).get("speedup"):
            line += f" llama.cpp lookup {engines['llama.cpp lookup']['speedup']['median']:.2f}x its plain;"
        if s["lmforge ngram / llama.cpp lookup"]:
            line += f" lmforge ngram / llama.cpp lookup tok/s {s['lmforge ngram / llama.cpp lookup']['median']:.2f}x."
        lines.append(line.rstrip(";"))
    lines.append(f"- lmforge speculative ids equal its plain greedy ids: {exact}")
    return "\n".join(lines)


def exactness(runs: dict) -> str:
    """A line on id equality: lmforge (required, checked during the run) and llama.cpp lookup (reported)."""
    lm = [p["same_ids_as_plain"] for w in runs.values() for e in ("lmforge ngram", "lmforge ngram k=8")
          for r in w.get(e, []) for p in r["prompts"] if "same_ids_as_plain" in p]
    ll = [p["same_ids_as_plain"] for w in runs.values() for r in w.get("llama.cpp lookup", [])
          for p in r["prompts"] if "same_ids_as_plain" in p]
    text = f"**{'yes' if all(lm) else 'NO'}** ({sum(lm)}/{len(lm)} prompt runs)"
    if ll:
        text += f"; llama.cpp lookup vs its plain greedy (not guaranteed there): {sum(ll)}/{len(ll)} equal"
    return text


def write_docs(text: str, meta: dict) -> None:
    """The `speculative` section of docs/benchmarks.md: command, setup, table, verdicts."""
    from lmforge.benchmark import write_docs_section

    section = (
        f"## Speculative decoding: prompt lookup at batch 1 (issue 26)\n\n```bash\n{meta['command']}\n```\n\n"
        f"{meta['date']}, {meta['machine']}; {meta['threads']} thread(s) per engine; torch {meta['torch']}, "
        f"llama-cpp-python {meta['llama_cpp']}; lmforge weights: {meta['lmforge_weights']}. Load average (1 min) "
        f"before the run: {meta['loadavg_before']:.2f}, after: {meta['loadavg_after']:.2f}.\n\n"
        f"SmolLM2-135M-Instruct (`{meta['model']}`), greedy, at most {meta['new_tokens']} new tokens per prompt "
        f"(EOS ends a reply). Three workloads of {meta['prompts_per_workload']} prompts each, from text that ships "
        f"offline: **rewrite** asks for a State of the Union passage (`lmforge.data.sotu`, speeches from 2000 on) "
        f"back with one word swapped; **code** asks for an edit of a standard-library excerpt (`textwrap.dedent`.."
        f"`indent`, `shlex.split`..`quote`, `textwrap.wrap`..`shorten`, read at run time) and the full code; "
        f"**chat** asks open questions. Every engine gets the same chat-templated ids. Engines: lmforge plain "
        f"greedy (`generate_ids`), lmforge with `NgramDraft()` (prompt lookup, adaptive k) and `NgramDraft(k="
        f"{FIXED_K})` (`speculative_ids`), llama.cpp plain greedy on the same GGUF, and llama.cpp with "
        f"`LlamaPromptLookupDecoding(num_pred_tokens={LOOKUP_TOKENS})`. Each (engine, workload, round) runs in a "
        f"fresh process after an untimed {WARMUP_TOKENS}-token warm-up; {meta['rounds']} rounds rotate the engine "
        f"order. Decode time is the generation's wall time less a separately timed prefill of the same prompt; "
        f"decode tok/s = new tokens / decode time over the workload's prompts. Speedup is per round against the "
        f"same engine's plain greedy run, median (min-max over rounds); a target is met only when every round "
        f"meets it. Acceptance = accepted / drafted tokens; tokens / forward counts every target forward, "
        f"prefill included (llama.cpp: calls to `eval`); ms / forward is decode time per decode forward (plain: "
        f"per token). The 2-core machine is shared, so read ratios, not absolute numbers.\n\n{text}\n\n"
        f"Raw numbers per round and prompt: `bench/results/speculative.json`.")
    write_docs_section(ROOT / "docs" / "benchmarks.md", "speculative", section)


def lmforge_weights(model: Path) -> str:
    """What `load()` gives lmforge today: GGUF blocks on lmforge kernels, or dequantized fp32."""
    from lmforge.checkpoint.load import load

    net, _ = load(model)
    kinds = {type(m).__name__ for m in net.modules()}
    return f"{model.suffix[1:].upper()} blocks (GGUFLinear)" if "GGUFLinear" in kinds else "fp32 (dequantized)"


def report(meta: dict, runs: dict, write: bool) -> None:
    """Print the table; with `write`, save the JSON and the docs section."""
    summary = summarize(runs)
    targets = targets_of(summary)
    text = table(summary, targets, exactness(runs))
    print(text)
    if not write:
        return
    out = ROOT / "bench" / "results" / "speculative.json"
    out.write_text(json.dumps({"meta": meta, "summary": summary, "targets": targets, "runs": runs}, indent=1))
    write_docs(text, meta)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128, help="most new tokens per prompt")
    parser.add_argument("--threads", type=int, default=2, help="compute threads for every engine")
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset of the engines")
    parser.add_argument("--quick", action="store_true", help="1 round, 32 new tokens; nothing written")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs and results alone")
    parser.add_argument("--render", metavar="JSON", help="re-make table and docs from a saved result")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        job = json.loads(Path(args.worker).read_text())
        fn = worker_lmforge if job["engine"].startswith("lmforge") else worker_llama_cpp
        Path(args.out).write_text(json.dumps(fn(job)))
        return
    if args.render:
        saved = json.loads(Path(args.render).read_text())
        return report(saved["meta"], saved["runs"], write=not args.no_write)
    if args.quick:
        args.rounds, args.new_tokens, args.no_write = 1, 32, True

    from lmforge import hub
    from lmforge.tokenizer import Tokenizer

    model = hub.resolve("smollm2-135m-instruct", pull_missing=True)
    tokenizer = Tokenizer.load(model)
    prompts = encode_workloads(tokenizer)
    engines = [e for e in args.engines.split(",") if e in ENGINES and available(e)]
    meta = machine_meta(argparse.Namespace(threads=args.threads, rounds=args.rounds, steps=args.new_tokens), 0)
    meta.update(command="python bench/bench_speculative.py" + "".join(f" {shlex.quote(a)}" for a in sys.argv[1:]),
                model=model.name, new_tokens=args.new_tokens, lmforge_weights=lmforge_weights(model),
                prompts_per_workload=len(prompts["chat"]),
                prompt_tokens={w: [len(p) for p in ids] for w, ids in prompts.items()})
    base_job = {"model": str(model), "eos": sorted(tokenizer.stop_ids), "new_tokens": args.new_tokens,
                "threads": args.threads}
    runs = run_rounds(engines, prompts, base_job, args.rounds, tokenizer.decode)
    meta["loadavg_after"] = os.getloadavg()[0]
    report(meta, runs, write=not args.no_write)


if __name__ == "__main__":
    main()

"""Speed measurements of lmforge itself: load, prefill and batch-1 decode, peak memory.

`bench/bench_foundation.py` runs these beside llama.cpp and transformers; `lmforge bench`
runs them alone.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import psutil
import torch

from lmforge.atomic import atomic_write_text


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux ru_maxrss is KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@torch.inference_mode()
def time_prefill(model, ids: list[int]) -> float:
    """Seconds to run one prompt through the model into a fresh cache."""
    from lmforge.generation.state_cache import make_cache

    cache = make_cache(model.config, 1, len(ids) + 1)  # a KV cache, or a Mamba model's recurrent state
    start = time.perf_counter()
    model(torch.tensor([ids]), cache=cache, last_only=True)
    return time.perf_counter() - start


@torch.inference_mode()
def time_decode(model, ids: list[int], steps: int) -> float:
    """Seconds for `steps` greedy decode steps at batch 1 after a prefill (EOS ignored)."""
    from lmforge.generation.generate import TokenStream
    from lmforge.generation.sampling import SamplingParams

    stream = TokenStream(model, [ids], SamplingParams(max_new_tokens=steps + 1, temperature=0, ignore_eos=True),
                         set())
    tokens = iter(stream)
    next(tokens)  # the first token comes from the prefill's logits
    start = time.perf_counter()
    for _ in tokens:
        pass
    return time.perf_counter() - start


def measure_lmforge(path: str | Path, prompt_tokens: int = 256, new_tokens: int = 128, rounds: int = 3) -> dict:
    """Median load time, prefill tok/s and decode tok/s over `rounds`, and peak RSS."""
    from lmforge.checkpoint.load import load

    loads, prefills, decodes = [], [], []
    for _ in range(rounds):
        start = time.perf_counter()
        model, tokenizer = load(path)
        loads.append(time.perf_counter() - start)
        ids = bench_prompt(tokenizer, prompt_tokens)
        prefills.append(prompt_tokens / time_prefill(model, ids))
        decodes.append(new_tokens / time_decode(model, ids, new_tokens))
    return {
        "load_s": statistics.median(loads),
        "prefill_tok_s": statistics.median(prefills),
        "decode_tok_s": statistics.median(decodes),
        "peak_rss_mib": peak_rss_mib(),
        "threads": torch.get_num_threads(),
        "cpus": psutil.cpu_count(logical=True),
    }


def bench_prompt(tokenizer, n: int) -> list[int]:
    """Exactly n token ids of ordinary English text (the same text for every engine)."""
    text = ("The history of computing is a story of people who wanted to calculate faster and more "
            "reliably than they could by hand. ") * 64
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) < n:
        raise ValueError(f"benchmark text has only {len(ids)} tokens, fewer than {n}")
    return ids[:n]


def write_docs_section(docs: Path, name: str, body: str) -> None:
    """Put `body` between the `<!-- name:start -->` / `<!-- name:end -->` markers of docs (appended
    when absent), written to a temp file and renamed so a crash never leaves half a file."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    current = docs.read_text() if docs.exists() else "# Benchmarks\n"
    section = f"{start}\n{body}\n{end}"
    if start in current and end in current:
        current = current[:current.index(start)] + section + current[current.index(end) + len(end):]
    else:
        current = current.rstrip() + "\n\n" + section + "\n"
    atomic_write_text(docs, current)

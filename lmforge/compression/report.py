"""What a compressed model costs and keeps: size on disk, held-out perplexity, decode speed.

Perplexity is measured on State of the Union speeches from 2000 on (`lmforge.data.sotu`);
calibration data comes from the earlier speeches, so the two never overlap.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lmforge.data import sotu
from lmforge.evaluation.perplexity import perplexity


def dir_bytes(path: str | Path) -> int:
    """Bytes of a checkpoint on disk: a file, or every file in a folder."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def held_out_ids(tokenizer, tokens: int) -> list[int]:
    """The first `tokens` token ids of the held-out speeches (no BOS: a plain text stream)."""
    ids = tokenizer.encode(sotu.held_out_text(max_chars=tokens * 8), add_special_tokens=False)
    if len(ids) < tokens:
        raise ValueError(f"the held-out text has only {len(ids)} tokens; ask for fewer than {tokens}")
    return ids[:tokens]


def calibration_batches(tokenizer, samples: int, seq_len: int) -> list[torch.Tensor]:
    """`samples` (1, seq_len) token batches cut from the pre-2000 speeches (disjoint from the held-out text)."""
    if samples < 1 or seq_len < 2:
        raise ValueError(f"calibration needs samples >= 1 and seq_len >= 2 (got {samples}, {seq_len})")
    ids = tokenizer.encode(sotu.calibration_text(max_chars=samples * seq_len * 8), add_special_tokens=False)
    if len(ids) < samples * seq_len:
        raise ValueError(f"calibration text has {len(ids)} tokens, fewer than {samples} x {seq_len}")
    return [torch.tensor(ids[i * seq_len:(i + 1) * seq_len])[None] for i in range(samples)]


def decode_tok_s(model, tokenizer, steps: int = 32, prompt_tokens: int = 32) -> float:
    """Greedy batch-1 decode speed after a short prompt (one untimed warm-up run first)."""
    from lmforge.benchmark import bench_prompt, time_decode

    ids = bench_prompt(tokenizer, prompt_tokens)
    time_decode(model, ids, 4)
    return steps / time_decode(model, ids, steps)


def report(model, tokenizer, path: str | Path | None, ppl_tokens: int = 4096, context: int = 512,
           decode_steps: int = 32, progress: bool = True) -> dict:
    """Size on disk (when saved), held-out perplexity and decode tok/s of `model`."""
    out: dict = {}
    if path is not None:
        out["size_mib"] = dir_bytes(path) / 2**20
    if ppl_tokens:
        result = perplexity(model, held_out_ids(tokenizer, ppl_tokens), context=context, progress=progress)
        out.update(perplexity=result.ppl, nll=result.nll, ppl_tokens=result.tokens)
    if decode_steps:
        out["decode_tok_s"] = decode_tok_s(model, tokenizer, decode_steps)
    return out


def print_report(name: str, rows: dict) -> None:
    """One line per measure, as the CLI commands print it."""
    formats = {"size_mib": "{:.1f} MiB", "perplexity": "{:.3f}", "nll": "{:.4f} nats/token",
               "ppl_tokens": "{} tokens", "decode_tok_s": "{:.1f} tok/s"}
    print(f"[{name}]")
    for key, value in rows.items():
        print(f"{key:>14}: {formats.get(key, '{}').format(value)}")

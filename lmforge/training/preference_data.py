"""Preference pairs from the Python FAQ: chosen = the FAQ's own answer, rejected = the model's answer to the
same question (greedy, then sampled), so DPO pulls the model toward the reference answers.

The split is by question and equals the SFT set's (python_faq.split, same held_out and seed): no evaluation
question is ever trained on, by SFT or by DPO. Model answers are cached per (model, question, sample,
settings) in answers-<model>.jsonl beside the output, so a rebuild generates only what is missing.
Output: <out>/train.jsonl and <out>/eval.jsonl, records {"prompt", "chosen", "rejected", "source"}.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from lmforge import hub
from lmforge.atomic import atomic_write_json, atomic_write_jsonl
from lmforge.generation.generate import generate
from lmforge.generation.sampling import SamplingParams


@dataclass
class PairBuildConfig:
    """How the rejected answers are generated and how the questions are split."""

    max_tokens: int = 96  # answer length cap (the FAQ answers are longer; DPO sees both cut to dpo.max_length)
    samples: int = 2  # answers per question: the greedy one, then samples at `temperature`
    temperature: float = 0.8
    batch_size: int = 16
    held_out: float = 0.1  # as `lmforge data python-faq`, so the two sets share their held-out questions
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_tokens < 1 or self.samples < 1 or self.batch_size < 1:
            raise ValueError(f"max_tokens, samples and batch_size must be >= 1; got {self}")


def default_pairs_dir() -> Path:
    """Where `lmforge data python-faq-pairs` writes and the dpo recipe reads (data.train=null)."""
    return hub.cache_dir() / "data" / "python-faq-pairs"


def _key(model_name: str, question: str, sample: int, cfg: PairBuildConfig) -> str:
    settings = json.dumps([model_name, question, sample, cfg.max_tokens, cfg.temperature if sample else 0.0,
                           cfg.seed])
    return hashlib.sha256(settings.encode()).hexdigest()[:24]


def _read_cache(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    cache = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        cache[row["key"]] = row["answer"]
    return cache


def model_answers(model, tokenizer, questions: list[str], model_name: str, cfg: PairBuildConfig,
                  cache_path: Path, progress: bool = True) -> dict[tuple[str, int], str]:
    """{(question, sample): answer}: sample 0 greedy, the others sampled; batched, cached after each batch
    (a killed build loses one batch at most)."""
    cache = _read_cache(cache_path)
    todo = [(q, k) for k in range(cfg.samples) for q in questions if _key(model_name, q, k, cfg) not in cache]
    prompts = {q: tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": q}],
                                                                 add_generation_prompt=True), add_special_tokens=False)
               for q in {q for q, _ in todo}}
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc=f"{model_name} answers", unit="answer", dynamic_ncols=True)
    for k in range(cfg.samples):
        group = sorted((q for q, sample in todo if sample == k), key=lambda q: len(prompts[q]))  # similar lengths
        params = SamplingParams(max_new_tokens=cfg.max_tokens, temperature=0.0 if k == 0 else cfg.temperature,
                                seed=cfg.seed * 1000 + k)
        for start in range(0, len(group), cfg.batch_size):
            batch = group[start:start + cfg.batch_size]
            for q, completion in zip(batch, generate(model, tokenizer, [prompts[q] for q in batch], params)):
                cache[_key(model_name, q, k, cfg)] = completion.text.strip()
            atomic_write_jsonl(cache_path, [{"key": key, "answer": answer} for key, answer in cache.items()])
            if bar is not None:
                bar.update(len(batch))
    if bar is not None:
        bar.close()
    return {(q, k): cache[_key(model_name, q, k, cfg)] for k in range(cfg.samples) for q in questions}


def pair_records(faq, answers: dict[tuple[str, int], str], samples: int) -> list[dict[str, str]]:
    """One record per (question, sample) whose answer is non-empty and differs from the FAQ's."""
    records = []
    for pair in faq:
        for k in range(samples):
            rejected = answers[(pair.question, k)]
            if rejected and rejected.strip() != pair.answer.strip():
                records.append({"prompt": pair.question, "chosen": pair.answer, "rejected": rejected,
                                "source": pair.source})
    return records


def build_python_faq_pairs(model, tokenizer, out: str | Path | None = None, model_name: str = "model",
                           cfg: PairBuildConfig | None = None, faq=None, progress: bool = True) -> tuple[Path, Path]:
    """Write <out>/train.jsonl and <out>/eval.jsonl of FAQ preference pairs (split by question); return them.
    `faq` defaults to python_faq.faq_pairs() (Debian's python3.11-doc)."""
    from lmforge.data.python_faq import faq_pairs, split

    cfg = cfg or PairBuildConfig()
    out = Path(out) if out is not None else default_pairs_dir()
    faq = faq_pairs() if faq is None else faq
    train_faq, eval_faq = split(faq, held_out=cfg.held_out, seed=cfg.seed)
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", model_name)
    answers = model_answers(model, tokenizer, [p.question for p in faq], model_name, cfg,
                            out / f"answers-{safe}.jsonl", progress)
    paths = out / "train.jsonl", out / "eval.jsonl"
    for path, part in zip(paths, (train_faq, eval_faq)):
        atomic_write_jsonl(path, pair_records(part, answers, cfg.samples))
    atomic_write_json(out / "build.json", {"model": model_name, **asdict(cfg)})
    return paths


def build_command(out: str | None = None, held_out: float = 0.1, seed: int = 0,
                  model: str = "smollm2-135m-instruct") -> int:
    """`lmforge data python-faq-pairs`: load the model, build (or finish) the pairs, print the counts."""
    import time

    import torch

    from lmforge.checkpoint.load import load

    torch.manual_seed(seed)
    net, tokenizer = load(hub.resolve(model, pull_missing=model in hub.REGISTRY), device="cpu", dtype=torch.float32)
    t0 = time.perf_counter()
    paths = build_python_faq_pairs(net, tokenizer, out, model, PairBuildConfig(held_out=held_out, seed=seed))
    for f in paths:
        print(f"{f}: {sum(1 for _ in open(f))} pairs")
    print(f"built in {time.perf_counter() - t0:.0f} s (model answers cached beside them)")
    return 0

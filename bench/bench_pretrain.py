"""Pretraining benchmark: lmforge's loop vs transformers' Trainer on LlamaForCausalLM, same model, same rows.

Both sides train the pretrain-llama-30m shape from random weights (transformers gets the same config
through lmforge.checkpoint.hf.hf_config: 8 layers of 384, 6 heads, 2 KV heads, vocabulary 49152, tied)
on the same packed rows: the first BATCH * (STEPS + 1) rows the pretrain recipe's mixture draws with
seed 0 (SOTU 0.4, Python docs 0.3, R manuals 0.3), plain concatenation (no document mask, which
transformers' SDPA path has no CPU form of), AdamW at a constant lr, fp32 weights, in fp32 and with bf16
autocast. Each (engine, dtype) runs in its own process with `--threads` torch threads; peak memory is
that process's peak RSS (resource.getrusage ru_maxrss). tokens/s is over the timed steps after one
warm-up step, the best of `--repeats` rounds that alternate the engines (the machine may be shared).

    python bench/bench_pretrain.py --threads 1            # batch 4 x 256 tokens, 1 warm-up + 3 timed steps
    python bench/bench_pretrain.py --steps 5 --seq 512
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LR = 1e-3
RUNS = {"lmforge fp32": ("lmforge", False), "transformers Trainer fp32": ("hf", False),
        "lmforge bf16 autocast": ("lmforge", True), "transformers Trainer bf16 autocast": ("hf", True)}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rows(batch: int, seq: int, steps: int):
    """The first batch * (steps + 1) rows of the pretrain recipe's mixture (numpy int64 arrays), and the config."""
    from lmforge import hub
    from lmforge.config import Config
    from lmforge.tokenizer import Tokenizer
    from lmforge.training.mixture import Mixture
    from lmforge.training.pretrain import build_sources
    from lmforge.training.recipe import load_recipe

    recipe = load_recipe("pretrain", [f"pretrain.seq_len={seq}"])
    tok = Tokenizer.load(hub.resolve(recipe.model))
    train_shards, _ = build_sources(recipe.pretrain, tok, hub.cache_dir() / "shards")
    mix = Mixture(train_shards, recipe.pretrain.weights, seq, batch, tok.eos_id, tok.eos_id, seed=0,
                  document_mask=False)
    return [mix.next_row()[1] for _ in range(batch * (steps + 1))], Config.from_name(recipe.pretrain.preset)


def worker_lmforge(batch: int, seq: int, steps: int, bf16: bool) -> dict:
    import torch

    from lmforge.model.transformer import build_model
    from lmforge.training.mixture import collate_tokens
    from lmforge.training.objectives import pretrain_loss
    from lmforge.training.optim import build_optimizer
    from lmforge.training.trainer import TrainConfig, _train_step, trainable_parameters

    from lmforge.allocator import keep_freed_memory

    data_rows, config = rows(batch, seq, steps)
    rss_data = peak_rss_mib()
    keep_freed_memory()  # as trainer.train does on a CPU (allocator.py)
    model = build_model(config)
    model.gradient_checkpointing = False

    class Fixed:  # the rows in order, batch by batch
        i = 0

        def next(self):
            self.i += 1
            return collate_tokens(data_rows[(self.i - 1) * batch:self.i * batch], -1, 0, document_mask=False)

    params = trainable_parameters(model)
    opt = build_optimizer(params, "adamw", LR, 0.0)
    cfg = TrainConfig(max_steps=steps + 1, micro_batch=batch, lr=LR, warmup_steps=0, decay="constant", progress=False)
    model.train()
    data = Fixed()
    out = [_train_step(model, pretrain_loss, data, opt, params, cfg, s, torch.device("cpu"),
                       torch.bfloat16 if bf16 else None) for s in range(steps + 1)]
    timed = out[1:]
    return {"tokens_per_s": sum(r["tokens"] for r in timed) / sum(r["seconds"] for r in timed),
            "losses": [r["loss"] for r in out], "rss_before_model_mib": rss_data}


def worker_hf(batch: int, seq: int, steps: int, bf16: bool) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from lmforge.checkpoint.hf import hf_config

    data_rows, config = rows(batch, seq, steps)
    rss_data = peak_rss_mib()
    cfg = {k: v for k, v in hf_config(config).items() if k not in ("architectures", "model_type", "torch_dtype")}
    model = LlamaForCausalLM(LlamaConfig(**cfg, attn_implementation="sdpa")).float()
    dataset = [{"input_ids": torch.from_numpy(r), "labels": torch.from_numpy(r)} for r in data_rows]
    times, losses = [], []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            times.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    args = TrainingArguments(output_dir="/tmp/bench_pretrain_hf", per_device_train_batch_size=batch,
                             max_steps=steps + 1, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
                             weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to=[],
                             use_cpu=True, bf16=bf16, seed=0, dataloader_num_workers=0, remove_unused_columns=False)

    def collate(items):
        return {"input_ids": torch.stack([x["input_ids"] for x in items]),
                "labels": torch.stack([x["labels"] for x in items])}

    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collate, callbacks=[Clock()])
    trainer.train()
    end = time.perf_counter()
    return {"tokens_per_s": steps * batch * seq / (end - times[1]), "losses": losses,
            "rss_before_model_mib": rss_data}


def child(name: str, args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    engine, bf16 = RUNS[name]
    result = (worker_lmforge if engine == "lmforge" else worker_hf)(args.batch, args.seq, args.steps, bf16)
    return {**result, "peak_rss_mib": peak_rss_mib()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in every run")
    parser.add_argument("--runs", nargs="*", default=list(RUNS))
    parser.add_argument("--repeats", type=int, default=2, help="rounds over the runs; the best tokens/s is kept")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "pretrain.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    rows(args.batch, args.seq, args.steps)  # build the shards once, outside the timed processes
    tries: dict[str, list[dict]] = {name: [] for name in args.runs}
    for _ in range(args.repeats):  # rounds alternate the engines, so a busy spell on the machine hits both
        for name in args.runs:
            proc = subprocess.run([sys.executable, __file__, "--child", name, "--steps", str(args.steps), "--batch",
                                   str(args.batch), "--seq", str(args.seq), "--threads", str(args.threads)],
                                  capture_output=True, text=True,
                                  env={**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"})
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            tries[name].append(json.loads(lines[-1]) if proc.returncode == 0 and lines else
                               {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:300]})
            print(name, tries[name][-1], flush=True)
    results = {}
    for name, runs in tries.items():  # the best round's tokens/s (least disturbed), the highest peak RSS
        ok = [r for r in runs if "error" not in r]
        results[name] = {**max(ok, key=lambda r: r["tokens_per_s"]), "peak_rss_mib": max(r["peak_rss_mib"] for r in ok),
                         "tokens_per_s_each": [r["tokens_per_s"] for r in ok]} if ok else runs[-1]
    _report(results, args)


def _report(results: dict, args) -> None:
    print("\n| run | tokens/s | vs transformers | peak RSS MiB | vs transformers | first loss |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        if "error" in r:
            print(f"| {name} | failed: {r['error']} | | | | |")
            continue
        base = results.get(name.replace("lmforge", "transformers Trainer"), {})
        speed = r["tokens_per_s"] / base["tokens_per_s"] if base.get("tokens_per_s") else float("nan")
        mem = r["peak_rss_mib"] / base["peak_rss_mib"] if base.get("peak_rss_mib") else float("nan")
        print(f"| {name} | {r['tokens_per_s']:.0f} | {speed:.2f}x | {r['peak_rss_mib']:.0f} | {mem:.2f}x | "
              f"{r['losses'][0]:.3f} |")
    meta = {"date": str(date.today()), "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "threads": args.threads, "steps": args.steps, "repeats": args.repeats, "seq": args.seq, "batch": args.batch}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=1))


if __name__ == "__main__":
    main()

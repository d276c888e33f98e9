"""Fine-tuning benchmark: lmforge vs transformers + PEFT Trainer, LoRA and QLoRA on SmolLM2-135M.

Every (engine, setting) runs in a fresh process, so peak RSS is its own. All see the same
records (the Python FAQ train split), the same tokens (chat template, EOS, prompt masked,
sequence 256), micro-batch 4, LoRA r=16 alpha=32 dropout 0 on all linear layers, AdamW lr 2e-4.
tokens/s counts real (non-padding) tokens over the timed steps, after one warm-up step.

    python bench/bench_finetune.py                 # 1 warm-up + 4 timed steps per run
    python bench/bench_finetune.py --steps 2       # quicker
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
SEQ, BATCH, RANK, ALPHA, DROPOUT, LR = 256, 4, 16, 32.0, 0.0, 2e-4  # dropout 0: Unsloth's setting
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RUNS = {  # name -> (engine, options)
    "lmforge LoRA": ("lmforge", {"quantize": "none", "packing": True, "ckpt": False}),
    "lmforge LoRA, grad. ckpt": ("lmforge", {"quantize": "none", "packing": True, "ckpt": True}),
    "lmforge LoRA, glibc's default allocator": ("lmforge", {"quantize": "none", "packing": True, "ckpt": False,
                                                             "env": {"LMFORGE_KEEP_FREED_MEMORY": "0"}}),
    "lmforge LoRA, no packing": ("lmforge", {"quantize": "none", "packing": False, "ckpt": False}),
    "lmforge LoRA, bf16 autocast, grad. ckpt": ("lmforge", {"quantize": "none", "packing": True, "ckpt": True,
                                                           "bf16": True}),
    "lmforge QLoRA": ("lmforge", {"quantize": "nf4", "packing": True, "ckpt": False}),
    "lmforge QLoRA, bf16 autocast, grad. ckpt": ("lmforge", {"quantize": "nf4", "packing": True, "ckpt": True,
                                                            "bf16": True}),
    "lmforge QLoRA, grad. ckpt": ("lmforge", {"quantize": "nf4", "packing": True, "ckpt": True}),
    "lmforge LoRA, bf16 autocast": ("lmforge", {"quantize": "none", "packing": True, "ckpt": False, "bf16": True}),
    "transformers+PEFT LoRA": ("hf", {"quantize": "none", "ckpt": False}),
    "transformers+PEFT LoRA, bf16 autocast": ("hf", {"quantize": "none", "ckpt": False, "bf16": True}),
    "transformers+PEFT LoRA, grad. ckpt": ("hf", {"quantize": "none", "ckpt": True}),
    "transformers+PEFT QLoRA (bitsandbytes)": ("hf", {"quantize": "nf4", "ckpt": False}),
}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _examples(model_path: Path):
    """Tokenized FAQ train records (same for every engine), and the tokenizer."""
    from lmforge.data.python_faq import faq_pairs, split, to_alpaca
    from lmforge.tokenizer import Tokenizer
    from lmforge.training.data import tokenize, validate_record

    tok = Tokenizer.load(model_path)
    train, _ = split(faq_pairs())
    return [tokenize(validate_record(to_alpaca(p), "faq"), tok, "chat", SEQ) for p in train], tok


def weight_mib(model) -> float:
    """Parameters + buffers in MiB (tied tensors once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total / 2**20


def worker_lmforge(model_path: Path, steps: int, opts: dict) -> dict:
    import torch

    from lmforge.checkpoint.load import load_model
    from lmforge.training.data import Batches, pack
    from lmforge.training.lora import LoRAConfig, apply_lora
    from lmforge.training.objectives import sft_loss
    from lmforge.training.trainer import TrainConfig, _train_step, trainable_parameters
    from lmforge.training.optim import build_optimizer

    from lmforge.allocator import keep_freed_memory

    keep_freed_memory()  # as trainer.train does on the CPU
    examples, tok = _examples(model_path)
    model = load_model(model_path, dtype=torch.float32)  # float linears (the default keeps GGUF blocks)
    apply_lora(model, LoRAConfig(rank=RANK, alpha=ALPHA, dropout=DROPOUT, target_modules=TARGETS,
                                 quantize=opts["quantize"]))
    model.gradient_checkpointing = opts["ckpt"]
    rows = pack(examples, SEQ) if opts["packing"] else [[e] for e in examples]
    data = Batches(rows, BATCH, tok.pad_id if tok.pad_id is not None else tok.eos_id, seed=0)
    params = trainable_parameters(model)
    opt = build_optimizer(params, "adamw", LR, 0.0)
    cfg = TrainConfig(max_steps=steps + 1, micro_batch=BATCH, lr=LR, warmup_steps=0, progress=False)
    model.train()
    amp = torch.bfloat16 if opts.get("bf16") else None
    rows_out = [_train_step(model, sft_loss, data, opt, params, cfg, s, torch.device("cpu"), amp)
                for s in range(steps + 1)]
    timed = rows_out[1:]
    return {"tokens_per_s": sum(r["tokens"] for r in timed) / sum(r["seconds"] for r in timed),
            "loss_first": rows_out[0]["loss"], "weight_mib": weight_mib(model)}


def worker_hf(model_path: Path, steps: int, opts: dict) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    examples, tok = _examples(model_path)
    kwargs = {"dtype": torch.float32}
    if opts["quantize"] == "nf4":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_use_double_quant=True,
                                                           bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(hf_copy(model_path), **kwargs)
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT,
                                             target_modules=TARGETS, task_type="CAUSAL_LM"))
    pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
    dataset = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]

    def collate(rows):
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), pad)
        labels = torch.full((len(rows), width), -100)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    times, tokens = [], []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            times.append(time.perf_counter())

    args = TrainingArguments(output_dir="/tmp/bench_hf_ft", per_device_train_batch_size=BATCH, max_steps=steps + 1,
                             learning_rate=LR, lr_scheduler_type="constant", logging_steps=1000, save_strategy="no",
                             report_to=[], use_cpu=True, gradient_checkpointing=opts["ckpt"], seed=0,
                             bf16=bool(opts.get("bf16")),
                             dataloader_num_workers=0, remove_unused_columns=False)
    original = collate

    def counting(rows):
        batch = original(rows)
        tokens.append(int(batch["attention_mask"].sum()))
        return batch

    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=counting, callbacks=[Clock()])
    trainer.train()
    end = time.perf_counter()
    timed_s = end - times[1]
    return {"tokens_per_s": sum(tokens[1:steps + 1]) / timed_s, "weight_mib": weight_mib(model)}


def hf_copy(model_path: Path) -> Path:
    """The GGUF's weights as a Hugging Face directory (fp32 safetensors), written once: transformers
    refuses a quantization_config for GGUF files, so both transformers runs load this copy."""
    out = Path("/tmp/bench_finetune_hf") / model_path.stem
    if not (out / "model.safetensors").is_file():
        from lmforge.checkpoint.hf import save_hf
        from lmforge.checkpoint.load import load

        net, tok = load(model_path)
        save_hf(net, out)
        tok.save_hf(out)
    return out


def child(name: str, model_path: Path, steps: int) -> dict:
    engine, opts = RUNS[name]
    import torch

    torch.manual_seed(0)
    result = (worker_lmforge if engine == "lmforge" else worker_hf)(model_path, steps, opts)
    return {**result, "peak_rss_mib": peak_rss_mib()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--runs", nargs="*", default=list(RUNS))
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "finetune.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model", help="GGUF path (default: the pulled SmolLM2-135M-Instruct)")
    args = parser.parse_args()
    from lmforge import hub

    model_path = Path(args.model) if args.model else hub.resolve("smollm2-135m-instruct", pull_missing=True)
    if args.child:
        print(json.dumps(child(args.child, model_path, args.steps)))
        return
    if any(RUNS[name][0] == "hf" for name in args.runs):
        hf_copy(model_path)
    results = {}
    for name in args.runs:
        proc = subprocess.run([sys.executable, __file__, "--child", name, "--steps", str(args.steps),
                               "--model", str(model_path)], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT), **RUNS[name][1].get("env", {})})
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        results[name] = json.loads(lines[-1]) if proc.returncode == 0 and lines else \
            {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:200]}
        print(name, results[name], flush=True)
    _report(results, args)


def _report(results: dict, args) -> None:
    base = results.get("transformers+PEFT LoRA", {})
    print("\n| run | tokens/s | vs transformers+PEFT | peak RSS MiB | vs transformers+PEFT | weights MiB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        if "error" in r:
            print(f"| {name} | failed: {r['error']} | | | | |")
            continue
        speed = r["tokens_per_s"] / base["tokens_per_s"] if base.get("tokens_per_s") else float("nan")
        mem = r["peak_rss_mib"] / base["peak_rss_mib"] if base.get("peak_rss_mib") else float("nan")
        print(f"| {name} | {r['tokens_per_s']:.0f} | {speed:.2f}x | {r['peak_rss_mib']:.0f} | {mem:.2f}x | "
              f"{r['weight_mib']:.0f} |")
    meta = {"date": str(date.today()), "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "steps": args.steps, "seq": SEQ, "batch": BATCH}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=1))


if __name__ == "__main__":
    main()

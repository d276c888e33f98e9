"""Full fine-tuning vs LoRA vs prefix tuning vs bottleneck adapters on SmolLM2-135M-Instruct.

Each method runs its packaged recipe (lmforge/training/recipes/{lora,prefix,bottleneck,full}.yaml, each
with its own learning rate) through `lmforge finetune`'s runner on the Python FAQ, with the same loop
for all: `--steps` optimizer steps of micro-batch 4, sequence 256, packing, grad. checkpointing, the
trainer's precision choice (bf16 autocast on a CPU with bf16 instructions). Every method runs in a fresh
process, so peak RSS is its own. Reported: held-out loss (per token, the FAQ eval split) after training,
beside the untouched model's; trainable parameters; tokens/s over the steps after the first; peak RSS.

    python bench/bench_adapters.py --steps 30 --threads 1
    python bench/bench_adapters.py --steps 30 --threads 1 --parallel   # all at once on a many-core machine
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from safetensors import safe_open

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("full", "lora", "prefix", "bottleneck")


def _overrides(steps: int) -> list[str]:
    return [f"train.max_steps={steps}", "train.micro_batch=4", "train.grad_accum=1", "data.max_length=256",
            "train.warmup_steps=3", f"train.eval_every={steps}", f"train.save_every={steps}", "train.progress=false",
            "device=cpu"]


def _trainable(out: Path) -> int:
    ckpt = out / "checkpoints" / json.loads((out / "checkpoints" / "index.json").read_text())["last"]
    with safe_open(str(ckpt / "trainable.safetensors"), "pt") as f:
        return sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def worker(method: str, steps: int, work: Path) -> dict:
    """One method's run (or `base`: the held-out loss of the model as loaded)."""
    from lmforge.training.finetune import run, setup
    from lmforge.training.objectives import sft_loss
    from lmforge.training.recipe import load_recipe
    from lmforge.training.trainer import autocast_dtype, evaluate

    recipe = load_recipe("lora" if method == "base" else method, _overrides(steps))
    recipe.out_dir = str(work / method)
    if method == "base":  # LoRA's B starts at zero: the model is the base model
        model, _, _, evals = setup(recipe)
        amp = autocast_dtype(recipe.train.precision, next(model.parameters()).device)
        return {"method": "base", "eval_loss": evaluate(model, sft_loss, evals, amp)}
    t0 = time.perf_counter()
    summary = run(recipe)
    rows = [json.loads(line) for line in (work / method / "metrics.jsonl").read_text().splitlines()]
    timed = rows[1:] or rows
    return {"method": method, "eval_loss": summary["final_eval_loss"], "first_loss": rows[0]["loss"],
            "last_loss": rows[-1]["loss"], "trainable_params": _trainable(work / method),
            "tokens_per_s": sum(r["tokens"] for r in timed) / sum(r["seconds"] for r in timed),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "wall_s": time.perf_counter() - t0, "lr": recipe.train.lr}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--parallel", action="store_true", help="run the methods at once (tokens/s then shares the CPU)")
    ap.add_argument("--work", default="/tmp/bench_adapters")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "adapters.json"))
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = Path(args.work)
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        print("RESULT " + json.dumps(worker(args.worker, args.steps, work)), flush=True)
        return
    methods = ["base", *args.methods.split(",")]
    procs = []
    for method in methods:  # one process per method; --parallel starts them together
        cmd = [sys.executable, __file__, "--worker", method, "--steps", str(args.steps), "--threads",
               str(args.threads), "--work", str(work)]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT))
        if not args.parallel:
            procs[-1].wait()
    results = []
    for method, proc in zip(methods, procs):
        stdout, stderr = proc.communicate()
        line = next((x for x in stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"{method} failed:\n{stderr[-3000:]}")
        results.append(json.loads(line[7:]))
        print(json.dumps(results[-1]), flush=True)
    meta = {"date": str(date.today()), "machine": platform.processor() or platform.machine(),
            "threads": args.threads, "steps": args.steps, "command": " ".join(sys.argv)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    base = results[0]["eval_loss"]
    print(f"\nheld-out loss of the model as loaded: {base:.4f}")
    print("| method | lr | held-out loss after | trainable params | tokens/s | peak RSS (MiB) |")
    print("|---|---|---|---|---|---|")
    for r in results[1:]:
        print(f"| {r['method']} | {r['lr']:g} | {r['eval_loss']:.4f} | {r['trainable_params']:,} | "
              f"{r['tokens_per_s']:.0f} | {r['peak_rss_mib']:.0f} |")


if __name__ == "__main__":
    main()

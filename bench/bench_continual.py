"""Continual learning benchmark: forgetting of task A (Python FAQ SFT) after LoRA training on task B
(R manuals SFT), without protection, with EWC and with replay, on SmolLM2-135M-Instruct.

Setup: LoRA r=16 on every linear; task A trains from scratch (a fresh adapter); each task-B run starts from
task A's adapter (continual.init_adapter), so EWC's Fisher is over the same adapter tensors. Losses are
mean token CE on the held-out splits (FAQ eval.jsonl, R manuals eval.jsonl). Forgetting = A's held-out
loss after B minus after A. Runs go through `finetune.run` (the recipe's `continual` section).

    python bench/bench_continual.py --threads 1                 # writes bench/results/continual.json
    python bench/bench_continual.py --steps-a 40 --steps-b 40   # quicker
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _recipe(out: Path, train: str, evals: str, steps: int, args, continual: dict | None = None):
    from lmforge.training.recipe import load_recipe

    overrides = [f"train.max_steps={steps}", f"train.micro_batch={args.micro_batch}", "train.grad_accum=1",
                 f"train.eval_every={steps}", f"train.save_every={steps}", "train.progress=false",
                 "train.gradient_checkpointing=false", f"data.max_length={args.max_length}", f"train.lr={args.lr}",
                 "train.warmup_steps=5",
                 f"data.train={train}", f"data.eval={evals}", f"out_dir={out}", "device=cpu"]
    overrides += [f"continual.{k}={v}" for k, v in (continual or {}).items()]
    return load_recipe("lora", overrides)


def held_out_loss(adapter: Path, data: str, args) -> float:
    """Mean token CE of the base model + adapter on a held-out JSONL."""
    import torch

    from lmforge import hub
    from lmforge.checkpoint.load import load
    from lmforge.training.adapters import load_adapter
    from lmforge.training.data import Batches, build_rows
    from lmforge.training.objectives import sft_loss
    from lmforge.training.trainer import autocast_dtype, evaluate

    model, tok = load(hub.resolve("smollm2-135m-instruct"), device="cpu", dtype=torch.float32)
    if adapter is not None:
        load_adapter(model, adapter)
    rows = build_rows(data, tok, "chat", args.max_length, packing=False)
    batches = Batches(rows, args.micro_batch, tok.pad_id if tok.pad_id is not None else tok.eos_id, shuffle=False).all()
    return evaluate(model, sft_loss, batches, autocast_dtype("auto", torch.device("cpu")))


def run_stage(name: str, recipe, args, results: dict, a_eval: str, b_eval: str) -> dict:
    """Train one stage (resumes/skips when done) and measure both held-out losses."""
    from lmforge.training.finetune import run

    if name in results.get("stages", {}):
        return results["stages"][name]
    t0 = time.perf_counter()
    run(recipe)
    adapter = Path(recipe.out_dir) / "adapter"
    row = {"train_s": round(time.perf_counter() - t0, 1), "adapter": str(adapter),
           "a_loss": held_out_loss(adapter, a_eval, args), "b_loss": held_out_loss(adapter, b_eval, args)}
    results.setdefault("stages", {})[name] = row
    print(name, row, flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps-a", type=int, default=30)
    ap.add_argument("--steps-b", type=int, default=30)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--ewc-lambda", type=float, nargs="+", default=[1e4, 1e6])
    ap.add_argument("--fisher-batches", type=int, default=8)
    ap.add_argument("--replay-fraction", type=float, default=0.25)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "lmforge" / "bench" / "continual"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "continual.json"))
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from lmforge.data.r_manuals import r_manuals_dataset
    from lmforge.training.finetune import python_faq_dataset

    work = Path(args.work)
    a_train, a_eval = map(str, python_faq_dataset(work / "data" / "python-faq"))
    b_train, b_eval = map(str, r_manuals_dataset(work / "data" / "r-manuals"))
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    results["settings"] = {k: v for k, v in vars(args).items() if k not in ("work", "out")}
    if "base" not in results:
        results["base"] = {"a_loss": held_out_loss(None, a_eval, args), "b_loss": held_out_loss(None, b_eval, args)}
    print("base", results["base"], flush=True)
    a = run_stage("A", _recipe(work / "A", a_train, a_eval, args.steps_a, args), args, results, a_eval, b_eval)
    init = {"init_adapter": a["adapter"]}
    variants = {"B plain": init}
    if args.replay_fraction > 0:  # --replay-fraction 0: EWC runs only
        variants[f"B replay {args.replay_fraction:g}"] = {**init, "replay_data": a_train,
                                                          "replay_fraction": args.replay_fraction}
    for lam in args.ewc_lambda:
        variants[f"B EWC lambda={lam:g}"] = {**init, "ewc_lambda": lam, "previous_data": a_train,
                                             "fisher_batches": args.fisher_batches,
                                             "fisher": str(work / "fisher_A.safetensors")}
    for name, continual in variants.items():
        folder = work / name.replace(" ", "_").replace("=", "")
        run_stage(name, _recipe(folder, b_train, b_eval, args.steps_b, args, continual), args, results, a_eval, b_eval)
        _write(out, results)
    summarize(results)
    _write(out, results)
    plot(results, ROOT / "docs" / "img" / "continual.png")


def summarize(results: dict) -> None:
    """Forgetting (A's held-out loss after B - after A) and B's held-out loss, relative to plain B."""
    stages, a_after_a = results["stages"], results["stages"]["A"]["a_loss"]
    plain = stages["B plain"]
    plain_forget = plain["a_loss"] - a_after_a
    lines = ["| run | A held-out loss | B held-out loss | forgetting (A loss increase) | forgetting vs plain | "
             "B loss vs plain | train s |", "|---|---|---|---|---|---|---|",
             f"| base model | {results['base']['a_loss']:.4f} | {results['base']['b_loss']:.4f} | | | | |"]
    for name, row in stages.items():
        forget = row["a_loss"] - a_after_a if name != "A" else 0.0
        row["forgetting"] = forget
        cells = ["", ""] if name in ("A", "B plain") else \
            [f"{1 - forget / plain_forget:.0%} less" if plain_forget > 0 else "n/a",
             f"{row['b_loss'] / plain['b_loss'] - 1:+.1%}"]
        lines.append(f"| {name} | {row['a_loss']:.4f} | {row['b_loss']:.4f} | {forget:+.4f} | {cells[0]} | {cells[1]} "
                     f"| {row['train_s']} |")
    results["table"] = "\n".join(lines)
    print(results["table"])


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = {k: v for k, v in results["stages"].items() if k != "A"}
    names = list(stages)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    axes[0].bar(names, [stages[n]["forgetting"] for n in names], color="tab:red")
    axes[0].set_title("forgetting: A held-out loss increase after B")
    axes[1].bar(names, [stages[n]["b_loss"] for n in names], color="tab:blue")
    axes[1].axhline(results["base"]["b_loss"], color="gray", ls="--", label="base model")
    axes[1].set_title("B held-out loss")
    axes[1].legend()
    for ax in axes:
        ax.tick_params(axis="x", rotation=20, labelsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def _write(path: Path, results: dict) -> None:
    from lmforge.atomic import atomic_write_json

    atomic_write_json(path, results)


if __name__ == "__main__":
    main()

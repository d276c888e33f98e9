"""Distillation benchmark: a 4-layer student of SmolLM2-135M-Instruct (its tokenizer, initialised from
teacher layers 0, 10, 19, 29) trained on soft targets vs the same student on hard labels only, same data,
steps and tokens; then held-out perplexity and acceptance as a speculative draft for the teacher.

Held-out: the Python FAQ held-out split (mean token CE of the answers, never trained on) and State of the
Union text from 2000 on (lmforge/data/sotu.py held_out_text; plain text, not the training domain).
Acceptance: greedy speculative decoding of the teacher on the FAQ held-out questions with the student as a
draft of 4 tokens (generation/speculative.py), accepted / drafted.

    python bench/bench_distill.py --threads 1      # writes bench/results/distill.json, docs/img/distill.png
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _recipe(out: Path, args, alpha: float, temperature: float, top_k: int):
    from lmforge.training.recipe import load_recipe

    return load_recipe("distill", [
        f"out_dir={out}", "device=cpu", f"train.max_steps={args.steps}", f"train.micro_batch={args.micro_batch}",
        "train.grad_accum=1", f"train.eval_every={args.steps}", f"train.save_every={args.steps}",
        "train.progress=false", "train.gradient_checkpointing=false", f"train.lr={args.lr}",
        f"data.max_length={args.max_length}",
        f"distill.alpha={alpha}", f"distill.temperature={temperature}", f"distill.top_k={top_k}",
        f"distill.cache_dir={Path(args.work) / 'teacher_cache'}"])


def sotu_nll(model, tok, chars: int, context: int) -> float:
    from lmforge.data.sotu import held_out_text
    from lmforge.evaluation.perplexity import perplexity

    return perplexity(model, tok.encode(held_out_text(chars)), context=context).nll


def acceptance(teacher, student, tok, records: list[dict], new_tokens: int, k: int) -> dict:
    """Greedy speculative decoding of the teacher with the student as draft: acceptance rate, tokens/forward."""
    from lmforge.generation.drafts import ModelDraft
    from lmforge.generation.sampling import SamplingParams
    from lmforge.generation.speculative import speculative_ids

    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": r["instruction"]}]),
                          add_special_tokens=False) for r in records]
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
    _, stats = speculative_ids(teacher, prompts, params, ModelDraft(student.eval(), tok, k=k), {tok.eos_id})
    return {k_: stats[k_] for k_ in ("drafted", "accepted", "acceptance_rate", "tokens_per_forward")}


def measure(name: str, student, teacher, tok, args, eval_records, faq_loss: float | None) -> dict:
    student.eval()
    row = {"faq_heldout_loss": faq_loss, "sotu_nll": sotu_nll(student, tok, args.sotu_chars, args.max_length)}
    if faq_loss is not None:
        row["faq_heldout_ppl"] = math.exp(faq_loss)
    row["sotu_ppl"] = math.exp(row["sotu_nll"])
    row.update(acceptance(teacher, student, tok, eval_records[:args.prompts], args.new_tokens, args.draft_tokens))
    print(name, row, flush=True)
    return row


def faq_eval_loss(model, tok, path: str, args) -> float:
    import torch

    from lmforge.training.data import Batches, build_rows
    from lmforge.training.objectives import sft_loss
    from lmforge.training.trainer import autocast_dtype, evaluate

    rows = build_rows(path, tok, "chat", args.max_length, packing=False)
    batches = Batches(rows, args.micro_batch, tok.pad_id if tok.pad_id is not None else tok.eos_id, shuffle=False)
    return evaluate(model, sft_loss, batches.all(), autocast_dtype("auto", torch.device("cpu")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--top-k", type=int, default=64, help="teacher top-k cache (0: teacher on the fly)")
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--draft-tokens", type=int, default=4)
    ap.add_argument("--sotu-chars", type=int, default=8000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "lmforge" / "bench" / "distill"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "distill.json"))
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from lmforge import hub
    from lmforge.checkpoint.load import load
    from lmforge.training.distill import build_student
    from lmforge.training.finetune import default_data_dir, python_faq_dataset, run
    from lmforge.training.objectives.distill import DistillConfig

    _, eval_path = python_faq_dataset(default_data_dir())
    eval_records = [json.loads(line) for line in open(eval_path)]
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    results["settings"] = {k: v for k, v in vars(args).items() if k not in ("work", "out")}
    teacher, tok = load(hub.resolve("smollm2-135m-instruct"), device="cpu", dtype=torch.float32)
    teacher.eval()
    runs = results.setdefault("runs", {})
    if "teacher" not in runs:
        runs["teacher"] = {"faq_heldout_loss": faq_eval_loss(teacher, tok, str(eval_path), args),
                           "sotu_nll": sotu_nll(teacher, tok, args.sotu_chars, args.max_length)}
    if "student init" not in runs:
        student, picks = build_student(DistillConfig(), teacher, tok, torch.device("cpu"))
        runs["student init"] = measure("student init", student, teacher, tok, args, eval_records,
                                       faq_eval_loss(student, tok, str(eval_path), args))
        runs["student init"]["teacher_layers"] = picks
        _write(out, results)
    plan = {"hard labels (alpha=0)": (0.0, 1.0, 0),
            f"distilled (alpha={args.alpha:g}, T={args.temperature:g}, top-{args.top_k})":
                (args.alpha, args.temperature, args.top_k)}
    for name, (alpha, temperature, top_k) in plan.items():
        if name in runs:
            continue
        folder = "".join(c if c.isalnum() or c in ".-" else "_" for c in name)
        recipe = _recipe(Path(args.work) / folder, args, alpha, temperature, top_k)
        t0 = time.perf_counter()
        summary = run(recipe)
        seconds = time.perf_counter() - t0
        student, _ = load(summary["student"], device="cpu", dtype=torch.float32)
        runs[name] = {**measure(name, student, teacher, tok, args, eval_records, summary["final_eval_loss"]),
                      "train_s": round(seconds, 1)}
        _write(out, results)
    results["table"] = table(runs)
    print(results["table"])
    _write(out, results)
    plot(runs, ROOT / "docs" / "img" / "distill.png")


def table(runs: dict) -> str:
    lines = ["| model | FAQ held-out loss (ppl) | SOTU held-out nll (ppl) | draft acceptance | tokens/target forward | "
             "train s |", "|---|---|---|---|---|---|"]
    for name, r in runs.items():
        acc = f"{r['acceptance_rate']:.3f}" if "acceptance_rate" in r else ""
        tpf = f"{r['tokens_per_forward']:.2f}" if "tokens_per_forward" in r else ""
        lines.append(f"| {name} | {r['faq_heldout_loss']:.4f} ({math.exp(r['faq_heldout_loss']):.1f}) | "
                     f"{r['sotu_nll']:.4f} ({math.exp(r['sotu_nll']):.1f}) | {acc} | {tpf} | {r.get('train_s', '')} |")
    return "\n".join(lines)


def plot(runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in runs if n != "teacher"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    axes[0].bar(names, [math.exp(runs[n]["faq_heldout_loss"]) for n in names], color="tab:blue")
    axes[0].axhline(math.exp(runs["teacher"]["faq_heldout_loss"]), color="gray", ls="--", label="teacher")
    axes[0].set_yscale("log")
    axes[0].set_title("FAQ held-out perplexity (log scale)")
    axes[0].legend()
    axes[1].bar(names, [runs[n]["acceptance_rate"] for n in names], color="tab:green")
    axes[1].set_title("acceptance as a 4-token draft for the teacher")
    for ax in axes:
        ax.tick_params(axis="x", rotation=15, labelsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def _write(path: Path, results: dict) -> None:
    from lmforge.atomic import atomic_write_json

    atomic_write_json(path, results)


if __name__ == "__main__":
    main()

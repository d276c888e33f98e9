"""DPO benchmark: SmolLM2-135M-Instruct with LoRA on the Python-FAQ preference pairs, measured on held-out pairs.

The pairs (`lmforge data python-faq-pairs`, built here when missing) hold the FAQ's answer as chosen and the
model's own answer as rejected; the held-out pairs' questions are never trained on. Before and after training,
on the held-out pairs: the DPO reward margin and accuracy (beta * log pi/pi_ref; both 0 before training, where
pi = pi_ref), the log-likelihood preference (how often log pi(chosen) > log pi(rejected), summed and per token),
and the KL to the reference: mean per-token KL(pi || pi_ref) over the full vocabulary at the held-out response
positions, and summed over the policy's own greedy answers to the held-out questions.

    python bench/bench_dpo.py --steps 12 --lr 5e-4 --threads 2   # what docs/benchmarks.md reports
    python bench/bench_dpo.py --steps 40 --answer-tokens 48        # longer, plus KL on the policy's own answers
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def _model():
    from lmforge import hub
    from lmforge.checkpoint.load import load

    return load(hub.resolve("smollm2-135m-instruct"), device="cpu", dtype=torch.float32)


def _pairs(model, tok, cfg, amp, limit: int = 0, stride: int = 1):
    """(train pairs, eval pairs with reference log-probs precomputed, the pairs' folder, pad id). Training
    sees fewer pairs than one epoch here, so its reference runs on the fly (no precompute)."""
    from lmforge.training.preference_data import build_python_faq_pairs, default_pairs_dir
    from lmforge.training.preferences import build_pairs, precompute_reference

    root = default_pairs_dir()
    if not (root / "train.jsonl").is_file():
        build_python_faq_pairs(model, tok, root, "smollm2-135m-instruct")
    pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
    train_pairs = build_pairs(root / "train.jsonl", tok, "chat", cfg)
    eval_pairs = build_pairs(root / "eval.jsonl", tok, "chat", cfg)[::stride][:limit or None]
    precompute_reference(model, eval_pairs, 4, pad, amp=amp, progress=True)
    return train_pairs, eval_pairs, root, pad


def _response_pass(model, batch: dict, with_reference: bool) -> tuple[torch.Tensor, float, int]:
    """Summed response log-probs per row, and the summed full-vocabulary KL(pi || pi_ref) over the response
    positions with their count (0 without the reference pass), from one policy and one reference forward."""
    from lmforge.training.data import IGNORE_INDEX
    from lmforge.training.lora import disabled_adapters
    from lmforge.training.objectives.forward import hidden_states

    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    h = hidden_states(model, batch)[:, :-1][keep]
    h_ref = None
    if with_reference:
        with disabled_adapters(model):
            h_ref = hidden_states(model, batch)[:, :-1][keep]
    targets, rows = labels[keep], keep.nonzero()[:, 0]
    per_token, kl = [], 0.0
    for s in range(0, h.shape[0], 256):
        lp = model.logits(h[s:s + 256]).float().log_softmax(-1)
        per_token.append(lp.gather(1, targets[s:s + 256, None]).squeeze(1))
        if h_ref is not None:
            lq = model.logits(h_ref[s:s + 256]).float().log_softmax(-1)
            kl += float((lp.exp() * (lp - lq)).sum())
    logps = torch.zeros(labels.shape[0]).index_add(0, rows, torch.cat(per_token))
    return logps, kl, int(keep.sum()) if with_reference else 0


def before_report(pairs, cfg) -> dict:
    """The held-out report before training, from the precomputed reference log-probs: there pi = pi_ref, so
    the DPO margins and the KL are 0 by construction and the log-likelihood preference is the reference's."""
    ll_sum = [float(p.ref_chosen > p.ref_rejected) for p in pairs]
    ll_avg = [float(p.ref_chosen / len(p.chosen_ids) > p.ref_rejected / len(p.rejected_ids)) for p in pairs]
    return {"reward_margin": 0.0, "reward_accuracy": 0.0, "loglik_pref_accuracy_sum": sum(ll_sum) / len(pairs),
            "loglik_pref_accuracy_per_token": sum(ll_avg) / len(pairs), "kl_per_token": 0.0}


@torch.no_grad()
def held_out_report(model, pairs, cfg, pad: int, trained: bool, amp) -> dict:
    """DPO reward margin/accuracy, log-likelihood preference and per-token KL to the reference on `pairs`
    (before training pi = pi_ref: margins and KL are 0 by construction, only the policy pass runs)."""
    from lmforge.training.data import IGNORE_INDEX
    from lmforge.training.preferences import collate_pairs

    model.eval()
    margins, acc, ll_sum, ll_avg, kl_sum, kl_tokens = [], [], [], [], 0.0, 0
    for start in range(0, len(pairs), 4):
        chunk = pairs[start:start + 4]
        batch = collate_pairs(chunk, pad)
        B = len(chunk)
        with _autocast(amp):
            logps, kl, n = _response_pass(model, batch, with_reference=trained)
        lengths = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(1)
        margin = cfg.beta * ((logps[:B] - batch["ref_chosen_logps"]) - (logps[B:] - batch["ref_rejected_logps"]))
        margins += margin.tolist()
        acc += (margin > 0).float().tolist()
        ll_sum += (logps[:B] > logps[B:]).float().tolist()
        ll_avg += (logps[:B] / lengths[:B] > logps[B:] / lengths[B:]).float().tolist()
        kl_sum, kl_tokens = kl_sum + kl, kl_tokens + n
    n = len(pairs)
    return {"reward_margin": sum(margins) / n, "reward_accuracy": sum(acc) / n,
            "loglik_pref_accuracy_sum": sum(ll_sum) / n, "loglik_pref_accuracy_per_token": sum(ll_avg) / n,
            "kl_per_token": kl_sum / max(1, kl_tokens)}


@torch.no_grad()
def own_answer_kl(model, tok, questions: list[str], max_tokens: int, amp) -> dict:
    """KL(pi || pi_ref) summed over the policy's own greedy answer (full vocabulary at each step), mean per
    answer and per token, and the answers themselves."""
    from lmforge.generation.generate import generate
    from lmforge.generation.sampling import SamplingParams
    from lmforge.training.preferences import PreferencePair, collate_pairs

    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True),
                          add_special_tokens=False) for q in questions]
    outs = generate(model, tok, prompts, SamplingParams(max_new_tokens=max_tokens, temperature=0.0))
    pairs = [PreferencePair(p, c.token_ids or [tok.eos_id], [tok.eos_id]) for p, c in zip(prompts, outs)]
    total, tokens = 0.0, 0
    for start in range(0, len(pairs), 4):
        B = len(pairs[start:start + 4])
        batch = {k: v[:B] if isinstance(v, torch.Tensor) and v.dim() == 2 else v  # the answer rows only
                 for k, v in collate_pairs(pairs[start:start + 4], tok.eos_id).items()}
        with _autocast(amp):
            _, kl, n = _response_pass(model, batch, with_reference=True)
        total, tokens = total + kl, tokens + n
    return {"kl_per_answer": total / len(questions), "kl_per_token": total / max(1, tokens),
            "answers": [c.text for c in outs]}


def _autocast(amp):
    from contextlib import nullcontext

    return torch.autocast("cpu", dtype=amp) if amp is not None else nullcontext()


def plot(metrics_path: Path, out: Path, before: dict, after: dict, title: str) -> None:
    """Train loss, reward margin and preference accuracy per step (running means), held-out before/after."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    steps = [r["step"] for r in rows]

    def running(key: str, k: int = 8) -> list[float]:
        vals = [r[key] for r in rows]
        return [sum(vals[max(0, i - k + 1):i + 1]) / len(vals[max(0, i - k + 1):i + 1]) for i in range(len(vals))]

    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    for ax, key, name in zip(axes, ("loss", "reward_margin", "preference_accuracy"),
                             ("DPO loss (train)", "reward margin (train)", "preference accuracy (train)")):
        ax.plot(steps, [r[key] for r in rows], alpha=0.3, label="per step")
        ax.plot(steps, running(key), label="running mean of 8")
        ax.set_xlabel("step")
        ax.set_title(name)
        ax.legend(fontsize=8)
    axes[0].axhline(0.6931, ls=":", c="grey")
    keys = ["reward_accuracy", "loglik_pref_accuracy_sum", "loglik_pref_accuracy_per_token"]
    x = range(len(keys))
    axes[3].bar([i - 0.2 for i in x], [before[k] for k in keys], 0.4, label="before")
    axes[3].bar([i + 0.2 for i in x], [after[k] for k in keys], 0.4, label="after")
    axes[3].set_xticks(list(x), ["reward acc.", "log p pref.\n(sum)", "log p pref.\n(per token)"], fontsize=8)
    axes[3].set_ylim(0, 1)
    axes[3].set_title(f"held-out pairs (margin {after['reward_margin']:.2f})")
    axes[3].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--loss", default="sigmoid")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-pairs", type=int, default=0, help="only the first N held-out pairs (0: all; smoke runs)")
    ap.add_argument("--eval-stride", type=int, default=2, help="every k-th held-out pair (2: the greedy-answer pair "
                    "of each held-out question)")
    ap.add_argument("--answer-tokens", type=int, default=0, help="greedy answers for the KL on own outputs (0: off)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench_dpo"))
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "dpo.json"))
    ap.add_argument("--plot", default=str(ROOT / "docs" / "img" / "dpo.png"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from lmforge.training.lora import LoRAConfig, apply_lora
    from lmforge.training.objectives.dpo import DPOConfig, PreferenceObjective
    from lmforge.training.preferences import PreferenceBatches
    from lmforge.training.trainer import TrainConfig, autocast_dtype, train

    model, tok = _model()
    amp = autocast_dtype(args.precision, torch.device("cpu"))
    cfg = DPOConfig(loss=args.loss, beta=args.beta, max_prompt_length=64, max_length=args.max_length)
    apply_lora(model, LoRAConfig(rank=16, alpha=32.0))
    t0 = time.perf_counter()
    train_pairs, eval_pairs, root, pad = _pairs(model, tok, cfg, amp, args.eval_pairs, args.eval_stride)
    ref_seconds = time.perf_counter() - t0
    questions = sorted({json.loads(line)["prompt"] for line in (root / "eval.jsonl").read_text().splitlines()})
    before = before_report(eval_pairs, cfg)
    print("before:", json.dumps(before), flush=True)
    tcfg = TrainConfig(max_steps=args.steps, micro_batch=args.micro_batch, grad_accum=args.grad_accum, lr=args.lr,
                       warmup_steps=max(1, args.steps // 12), eval_every=0, save_every=args.steps,
                       precision=args.precision, gradient_checkpointing=False, seed=0)
    out = Path(args.out)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    t1 = time.perf_counter()
    train(model, PreferenceObjective(cfg), PreferenceBatches(train_pairs, args.micro_batch, pad, seed=0), tcfg, out)
    train_seconds = time.perf_counter() - t1
    after = held_out_report(model, eval_pairs, cfg, pad, True, amp)
    print("after:", json.dumps(after), flush=True)
    after_own = own_answer_kl(model, tok, questions, args.answer_tokens, amp) if args.answer_tokens else {}
    result = {"date": str(date.today()), "cpu": platform.processor() or platform.machine(), "threads": args.threads,
              "precision": "bf16 autocast" if amp is not None else "fp32", "loss": args.loss, "beta": args.beta,
              "steps": args.steps, "micro_batch": args.micro_batch, "grad_accum": args.grad_accum, "lr": args.lr,
              "max_length": args.max_length, "train_pairs": len(train_pairs), "eval_pairs": len(eval_pairs),
              "eval_questions": len(questions), "reference_seconds": ref_seconds, "train_seconds": train_seconds,
              "before": before,
              "after": {**after, "own_answer": {k: v for k, v in after_own.items() if k != "answers"}},
              "answers_after": [{"question": q, "answer": a} for q, a in zip(questions, after_own.get("answers", []))]}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    plot(out / "metrics.jsonl", Path(args.plot), before, after,
         f"DPO (beta {args.beta}) + LoRA r16, SmolLM2-135M-Instruct, Python-FAQ pairs: {len(train_pairs)} train, "
         f"{len(eval_pairs)} held-out ({len(questions)} unseen questions)")
    print(f"| held-out ({len(eval_pairs)} pairs) | before | after |\n| --- | --- | --- |")
    for key in ("reward_margin", "reward_accuracy", "loglik_pref_accuracy_sum", "loglik_pref_accuracy_per_token",
                "kl_per_token"):
        print(f"| {key} | {before[key]:.4f} | {after[key]:.4f} |")
    for key in ("kl_per_answer", "kl_per_token") if after_own else ():
        print(f"| own greedy answers: {key} | 0 | {after_own[key]:.4f} |")
    print(f"reference log-probs {ref_seconds:.0f} s, training {train_seconds:.0f} s; {args.json}, {args.plot}")


if __name__ == "__main__":
    main()

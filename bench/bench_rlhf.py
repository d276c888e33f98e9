"""RLHF benchmark on SmolLM2-135M-Instruct (LoRA), bounded to minutes of CPU:

1. reward model (recipes/reward.yaml) on the Python-FAQ preference pairs (`lmforge data python-faq-pairs`:
   chosen = the FAQ's answer, rejected = SmolLM2's own), accuracy on the HELD-OUT pairs (questions never
   trained on), beside two references: the untrained head and "the longer response wins";
2. PPO (recipes/ppo.yaml) against that reward model on a fixed set of FAQ train questions (`--prompts`, so
   each iteration's mean reward is over the same prompts): mean reward and KL per iteration, the plot copied
   to docs/img/ppo.png. `--ppo-reward token_fraction` (the share of " Python" tokens in the response) or
   `--ppo-reward length` swap in a transparent scripted reward (plot docs/img/ppo_<reward>.png).

Both stages resume from their out folders (a finished stage is read back, not rerun).

    python bench/bench_rlhf.py --threads 1 --ppo-steps 12   # bench/results/rlhf.json, docs/img/ppo.png
    python bench/bench_rlhf.py --threads 1 --ppo-steps 12 --ppo-reward token_fraction
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def reward_stage(args) -> dict:
    """Train (or resume) the reward model; held-out accuracy against the two references."""
    from lmforge.training.finetune import run
    from lmforge.training.recipe import load_recipe

    out = Path(args.work) / "reward"
    if (out / "bench_result.json").is_file():  # finished before: read back
        return json.loads((out / "bench_result.json").read_text())
    recipe = load_recipe("reward", [
        f"out_dir={out}", "device=cpu", f"train.max_steps={args.reward_steps}", "train.micro_batch=4",
        "train.grad_accum=1", f"train.lr={args.reward_lr}", "train.warmup_steps=3",
        f"train.eval_every={args.reward_steps}", f"train.save_every={max(1, args.reward_steps // 3)}",
        "train.gradient_checkpointing=false", f"train.progress={args.progress}",
        f"reward.max_length={args.max_length}", "reward.max_prompt_length=100"])
    t0 = time.perf_counter()
    summary = run(recipe)
    seconds = time.perf_counter() - t0
    result = {"eval_accuracy": summary["eval_accuracy"], "eval_pairs": summary["eval_pairs"], "seconds": seconds,
              **references(recipe), "reward_model": summary["reward_model"], "steps": args.reward_steps,
              "max_length": args.max_length, "lr": args.reward_lr}
    (out / "bench_result.json").write_text(json.dumps(result, indent=1))
    return result


def references(recipe) -> dict:
    """Held-out accuracy of the untrained head (seed 0) and of 'the longer response wins' (whole responses, in
    tokens, before the cut to reward.max_length)."""
    from lmforge import hub
    from lmforge.checkpoint.load import load
    from lmforge.training.objectives.reward import RewardModel, pair_accuracy
    from lmforge.training.preference_data import default_pairs_dir
    from lmforge.training.preferences import PreferenceBatches, build_pairs, read_pairs

    decoder, tok = load(hub.resolve(recipe.model), device="cpu", dtype=torch.float32)
    pairs = build_pairs(default_pairs_dir() / "eval.jsonl", tok, "chat", recipe.reward)
    records = [r for _, r in read_pairs(default_pairs_dir() / "eval.jsonl")]  # whole responses, not cut to max_length
    longer = sum(len(tok.encode(r["chosen"])) > len(tok.encode(r["rejected"])) for r in records) / len(records)
    torch.manual_seed(recipe.train.seed)
    untrained = pair_accuracy(RewardModel(decoder), PreferenceBatches(pairs, 4, tok.eos_id, shuffle=False).all())
    return {"untrained_accuracy": untrained["accuracy"], "longer_wins_accuracy": longer}


def ppo_stage(args, reward_model: str | None) -> dict:
    """PPO (or its resume) against the reward model or the length reward; the per-iteration rows."""
    from lmforge.training.finetune import run
    from lmforge.training.recipe import load_recipe

    out = Path(args.work) / f"ppo-{args.ppo_reward}-{args.prompts}prompts"
    prompts = []
    if args.prompts:  # a fixed set of FAQ train questions: each iteration's mean is over the same prompts
        from lmforge.atomic import atomic_write_jsonl
        from lmforge.training.preference_data import default_pairs_dir
        from lmforge.training.preferences import read_pairs

        questions = list(dict.fromkeys(r["prompt"] for _, r in read_pairs(default_pairs_dir() / "train.jsonl")))
        atomic_write_jsonl(out / "prompts.jsonl", [{"prompt": q} for q in questions[:args.prompts]])
        prompts = [f"ppo.prompts={out / 'prompts.jsonl'}"]
    reward = {"model": [f"ppo.reward_model={reward_model}"],
              "length": ["ppo.reward=length", f"ppo.target_length={args.target_length}"],
              "token_fraction": ["ppo.reward=token_fraction", f"ppo.reward_token_id={token_id(args.reward_token)}"]
              }[args.ppo_reward]
    recipe = load_recipe("ppo", [
        f"out_dir={out}", "device=cpu", *reward, *prompts, f"train.max_steps={args.ppo_steps}",
        f"train.lr={args.ppo_lr}",
        f"ppo.rollout_batch={args.rollout}", f"ppo.mini_batch={args.rollout // 2}", f"ppo.ppo_epochs={args.ppo_epochs}",
        f"ppo.max_new_tokens={args.max_new_tokens}", f"ppo.kl_target={args.kl_target}",
        f"ppo.init_kl_coef={args.init_kl_coef}", "train.save_every=1",
        f"train.progress={args.progress}"])
    t0 = time.perf_counter()
    summary = run(recipe)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    img = ROOT / "docs" / "img" / ("ppo.png" if args.ppo_reward == "model" else f"ppo_{args.ppo_reward}.png")
    img.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(summary["plot"], img)
    keep = ("step", "reward", "kl", "kl_coef", "clip_frac", "entropy", "value_loss", "response_length", "seconds")
    name = args.ppo_reward if args.ppo_reward != "token_fraction" else f"share of {args.reward_token!r} tokens"
    return {"reward": name,
            "kl_target": args.kl_target, "seconds": time.perf_counter() - t0,
            "rows": [{k: r[k] for k in keep} for r in rows], "plot": str(img.relative_to(ROOT)),
            "settings": {"prompts": args.prompts or "all FAQ train questions", "steps": args.ppo_steps,
                         "lr": args.ppo_lr, "rollout": args.rollout,
                         "ppo_epochs": args.ppo_epochs, "max_new_tokens": args.max_new_tokens,
                         "init_kl_coef": args.init_kl_coef}}


def token_id(text: str) -> int:
    """The single SmolLM2 token of `text` (the token_fraction reward counts it)."""
    from lmforge import hub
    from lmforge.tokenizer import Tokenizer

    ids = Tokenizer.load(hub.resolve("smollm2-135m-instruct")).encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"--reward-token {text!r} is {len(ids)} tokens; pick one that is a single token")
    return ids[0]


def table(result: dict) -> str:
    r = result["reward_model"]
    lines = ["| reward model (held-out pairs) | accuracy |", "| --- | --- |",
             f"| trained: {r['steps']} steps, LoRA + head | {r['eval_accuracy']:.3f} ({r['eval_pairs']} pairs) |",
             f"| untrained head | {r['untrained_accuracy']:.3f} |",
             f"| the longer response wins | {r['longer_wins_accuracy']:.3f} |", ""]
    p = result["ppo"]
    rows = p["rows"]
    lines += [f"| PPO iteration ({p['reward']} reward) | mean reward | KL (nats) | beta | clip frac | entropy |",
              "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {x['step']} | {x['reward']:.3f} | {x['kl']:.3f} | {x['kl_coef']:.4f} | {x['clip_frac']:.3f} | "
              f"{x['entropy']:.3f} |" for x in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", default=None, help="run folders (default: the lmforge cache, bench/rlhf)")
    parser.add_argument("--reward-steps", type=int, default=30)
    parser.add_argument("--reward-lr", type=float, default=5e-4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--ppo-reward", choices=["model", "length", "token_fraction"], default="model")
    parser.add_argument("--reward-token", default=" Python", help="token_fraction: the token whose share is the reward")
    parser.add_argument("--target-length", type=int, default=12)
    parser.add_argument("--ppo-steps", type=int, default=15)
    parser.add_argument("--ppo-lr", type=float, default=3e-4)
    parser.add_argument("--prompts", type=int, default=8, help="fixed FAQ train questions (0: all, sampled)")
    parser.add_argument("--rollout", type=int, default=8)
    parser.add_argument("--ppo-epochs", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--kl-target", type=float, default=6.0)
    parser.add_argument("--init-kl-coef", type=float, default=0.2, help="beta at the start (0.2: trl's default)")
    parser.add_argument("--stage", choices=["all", "reward"], default="all")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.work is None:
        from lmforge import hub

        args.work = str(hub.cache_dir() / "bench" / "rlhf")
    result = {"threads": args.threads, "reward_model": reward_stage(args)}
    print(json.dumps(result["reward_model"], indent=1))
    if args.stage == "all":
        result["ppo"] = ppo_stage(args, result["reward_model"]["reward_model"])
        print(table(result))
    out = ROOT / "bench" / "results" / ("rlhf.json" if args.ppo_reward == "model" else f"rlhf_{args.ppo_reward}.json")
    out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

"""Mixture-of-Experts benchmark (issue 18): grouped expert compute vs Python loops, and MoE vs dense.

1. Layer: one MoE layer (router, E SwiGLU experts, top-k), forward + backward of the same loss on the
   same tokens, by four implementations that give the same outputs and gradients (checked):
   - grouped: lmforge.model.moe, assignments sorted by expert, one matmul chain per expert, one index_add
   - per-expert loop, gather: for each expert a mask of the assignments that picked it (torch.where),
     gather those tokens, compute, index_add (the loop in transformers' MixtralExperts)
   - per-expert loop, compute then mask: every expert on every token, times the token's gate weight
     for it (0 where not picked), summed: the seeds' naive MoE, E/k times the expert FLOPs
   - per-token loop: each token's k picks one at a time (smallest size only)
2. Training: a dense LLaMA-style model vs Mixtral-style MoE models with the same active parameters
   (k experts of width I/k where dense has width I; the router adds E*H per layer), trained from
   scratch on the same byte-level windows of State of the Union speeches (before 2000) and the Python
   3.11 docs (Debian python3.11-doc, reST sources), the same steps, batch and learning rate; held-out
   loss on speeches from 2000 on plus docs files never trained on. The MoE runs with and without the
   load-balancing loss; expert load per layer is logged by lmforge's trainer every step.

    python bench/bench_moe.py                 # full run, about 10 minutes on 2 cores; writes results
    python bench/bench_moe.py --quick         # smoke: one layer size, 3 x 12 steps; writes nothing
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lmforge.config import LLAMA_STYLE, Config  # noqa: E402
from lmforge.model.moe import MoE, dispatch, expert_swiglu, route  # noqa: E402
from moe_plots import plot_layer, plot_losses, plot_routing  # noqa: E402

DOCS = Path("/usr/share/doc/python3.11-doc/html/_sources")
SIZES = [  # (tokens, hidden, expert width, experts, top-k)
    (512, 128, 256, 8, 2),
    (2048, 256, 512, 8, 2),
    (4096, 512, 1024, 8, 2),
    (2048, 256, 128, 32, 4),  # fine-grained experts, as Qwen-MoE's 60 of width 1408
]
TARGET = 3.0  # grouped vs per-expert loop, forward + backward (issue 18)


# --- 1. the layer: grouped vs Python loops ---------------------------------------------------

def _route(layer: MoE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return route(layer.gate(x), layer.top_k, layer.normalize)


def _experts(layer: MoE) -> list:
    """Each expert as a function of its rows, on per-expert weight views (as a ModuleList of experts has)."""
    gate_up, down = layer.experts.gate_up_proj.unbind(0), layer.experts.down_proj.unbind(0)
    return [lambda x, e=e: expert_swiglu(x, gate_up[e], down[e]) for e in range(layer.n_experts)]


def grouped(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    weights, picks = _route(layer, x)
    return layer.experts(x, weights, dispatch(picks, layer.n_experts))


def loop_experts_gather(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    weights, picks = _route(layer, x)
    out = torch.zeros_like(x)
    for e, expert in enumerate(_experts(layer)):
        token, choice = torch.where(picks == e)
        if token.numel():
            out = out.index_add(0, token, expert(x[token]) * weights[token, choice, None])
    return out


def loop_experts_dense(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    weights, picks = _route(layer, x)
    gates = torch.zeros(x.shape[0], layer.n_experts).scatter(1, picks, weights)  # (N, E), 0 where not picked
    out = torch.zeros_like(x)
    for e, expert in enumerate(_experts(layer)):
        out = out + gates[:, e:e + 1] * expert(x)
    return out


def loop_tokens(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    weights, picks = _route(layer, x)
    experts, rows = _experts(layer), []
    for n in range(x.shape[0]):
        row = torch.zeros_like(x[n:n + 1])
        for j in range(layer.top_k):
            row = row + weights[n, j] * experts[int(picks[n, j])](x[n:n + 1])
        rows.append(row)
    return torch.cat(rows)


IMPLS = {"grouped": grouped, "per-expert loop, gather": loop_experts_gather,
         "per-expert loop, compute then mask": loop_experts_dense, "per-token loop": loop_tokens}


def _layer(tokens: int, hidden: int, width: int, experts: int, k: int) -> tuple[MoE, torch.Tensor, torch.Tensor]:
    config = Config(n_embd=hidden, n_head=4, intermediate_size=width, n_experts=experts, n_experts_per_tok=k)
    layer = MoE(config)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, hidden ** -0.5)
    return layer, torch.randn(tokens, hidden), torch.randn(tokens, hidden)


def fwd_bwd(impl, layer: MoE, x: torch.Tensor, probe: torch.Tensor) -> tuple[float, torch.Tensor, list]:
    """Seconds for forward + backward of (impl(x) * probe).sum(), with the output and gradients."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    start = time.perf_counter()
    y = impl(layer, x)
    (y * probe).sum().backward()
    seconds = time.perf_counter() - start
    return seconds, y.detach(), [x.grad] + [p.grad for p in layer.parameters()]


def bench_size(size: tuple, repeats: int, token_loop_max: int) -> dict:
    """Median fwd+bwd time per implementation at one size, rounds interleaved; outputs checked equal."""
    layer, x, probe = _layer(*size)
    names = [n for n in IMPLS if n != "per-token loop" or size[0] <= token_loop_max]
    _, want, want_grads = fwd_bwd(grouped, layer, x, probe)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats + 1):  # round 0 is the warm-up
        for name in names[r % len(names):] + names[:r % len(names)]:
            seconds, y, grads = fwd_bwd(IMPLS[name], layer, x, probe)
            if r == 0:
                torch.testing.assert_close(y, want, atol=1e-4, rtol=1e-4)
                for a, b in zip(grads, want_grads):
                    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
            else:
                times[name].append(seconds)
    med = {n: statistics.median(t) for n, t in times.items()}
    tokens, hidden, width, experts, k = size
    return {"tokens": tokens, "hidden": hidden, "expert_width": width, "experts": experts, "top_k": k,
            "seconds": times, "median_s": med, "speedup": {n: med[n] / med["grouped"] for n in names}}


# --- 2. training: MoE vs dense at equal active parameters ---------------------------------

def corpus(seed: int = 0) -> dict[str, dict[str, bytes]]:
    """Train and held-out text: speeches before / from 2000, docs files split 9:1 by a seeded shuffle."""
    from lmforge.data import sotu

    files = sorted(DOCS.rglob("*.txt"))
    if not files:
        raise SystemExit(f"{DOCS} is empty: install Debian's python3.11-doc (scripts/setup_data_deps.sh)")
    random.Random(seed).shuffle(files)
    held = len(files) // 10
    docs = {"train": "\n\n".join(f.read_text(errors="replace") for f in files[held:]),
            "held_out": "\n\n".join(f.read_text(errors="replace") for f in files[:held])}
    speeches = {"train": sotu.calibration_text(), "held_out": sotu.held_out_text()}
    return {split: {"sotu": speeches[split].encode(), "python-docs": docs[split].encode()}
            for split in ("train", "held_out")}


def windows(texts: dict[str, bytes], count: int, length: int, seed: int) -> list[list[int]]:
    """`count` byte windows of `length`, half from each source, at seeded random non-overlapping starts."""
    rng = random.Random(seed)
    out = []
    for i, (name, data) in enumerate(sorted(texts.items())):
        want = count // len(texts) + (i < count % len(texts))
        starts = rng.sample(range(0, len(data) - length, length), want)
        out += [list(data[s:s + length]) for s in starts]
    rng.shuffle(out)
    return out


def model_configs(args) -> dict[str, Config]:
    """Dense width I vs E experts of width I/k (top-k): the same active expert parameters per token."""
    base = dict(LLAMA_STYLE, vocab_size=256, n_layer=args.layers, n_embd=args.hidden, n_head=4,
                intermediate_size=args.width, block_size=args.seq)
    moe = dict(base, n_experts=args.experts, n_experts_per_tok=args.top_k,
               moe_intermediate_size=args.width // args.top_k)
    return {"dense": Config(name="dense", **base),
            "MoE, balancing loss": Config(name="moe-balanced", **moe, router_aux_loss_coef=args.aux_coef),
            "MoE, no balancing loss": Config(name="moe-unbalanced", **moe, router_aux_loss_coef=0.0)}


def parameters(config: Config) -> dict[str, int]:
    """Total and per-token active parameters (an MoE layer activates k of its E experts)."""
    from lmforge.model.transformer import build_model

    model = build_model(config, device="meta")
    total = sum(p.numel() for p in model.parameters())
    idle = 0
    for m in model.modules():
        if isinstance(m, MoE):
            per_expert = (m.experts.gate_up_proj.numel() + m.experts.down_proj.numel()) // m.n_experts
            idle += per_expert * (m.n_experts - m.top_k)
    return {"total": total, "active": total - idle}


def train_run(config: Config, train_rows: list, eval_rows: list, args, out_dir: Path) -> dict:
    """lmforge's trainer on the same windows and schedule; its metrics rows (eval loss, expert usage)."""
    from lmforge.model.transformer import build_model
    from lmforge.training.data import Batches, Example
    from lmforge.training.objectives import pretrain_loss
    from lmforge.training.trainer import TrainConfig, train

    torch.manual_seed(args.seed)
    model = build_model(config)
    rows = [[Example(w, w)] for w in train_rows]
    evals = Batches([[Example(w, w)] for w in eval_rows], args.batch, 0, shuffle=False).all()
    cfg = TrainConfig(max_steps=args.steps, micro_batch=args.batch, lr=args.lr, warmup_steps=max(1, args.steps // 20),
                      decay="cosine", eval_every=max(1, args.steps // args.evals), save_every=0, keep_last=1,
                      precision="fp32", gradient_checkpointing=False, seed=args.seed, progress=False)
    start = time.perf_counter()
    summary = train(model, pretrain_loss, Batches(rows, args.batch, 0, seed=args.seed), cfg, out_dir, evals)
    metrics = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {"seconds": time.perf_counter() - start, "final_eval_loss": summary["final_eval_loss"],
            "eval": [(r["step"], r["eval_loss"]) for r in metrics if "eval_loss" in r],
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in metrics),
            "metrics": metrics, "model": model}


def routing_of(model, text: bytes) -> list[list[int]]:
    """Each MoE layer's first-choice expert for every byte of `text` (the routing picture)."""
    from lmforge.model.moe import take_router_logits

    model.eval()
    with torch.no_grad():
        model(torch.tensor([list(text)]))
    return [logits.argmax(-1).tolist() for logits in take_router_logits(model)]


def balance(metrics: list[dict], experts: int) -> dict:
    """Expert load over the last tenth of the steps: each layer's largest and smallest share (ideal 1/E)."""
    rows = [r for r in metrics if r.get("expert_usage")]
    tail = rows[-max(1, len(rows) // 10):]
    layers = sorted(tail[0]["expert_usage"], key=int)
    mean = {l: [statistics.fmean(r["expert_usage"][l][e] for r in tail) for e in range(experts)] for l in layers}
    return {"ideal": 1 / experts, "max_share": {l: max(v) for l, v in mean.items()},
            "min_share": {l: min(v) for l, v in mean.items()}, "mean_share": mean}


# --- report: tables, docs ----------------------------------------------------------

def layer_table(rows: list[dict]) -> str:
    names = list(IMPLS)
    lines = ["| tokens | H | expert width | E | k | " + " | ".join(f"{n} (ms)" for n in names)
             + " | loop gather / grouped | compute-then-mask / grouped | per-token / grouped |",
             "|" + "---|" * (5 + len(names) + 3)]
    for r in rows:
        ms = [f"{r['median_s'][n] * 1e3:.1f}" if n in r["median_s"] else "-" for n in names]
        ratio = [f"{r['speedup'][n]:.2f}x" if n in r["speedup"] else "-" for n in names[1:]]
        lines.append(f"| {r['tokens']} | {r['hidden']} | {r['expert_width']} | {r['experts']} | {r['top_k']} | "
                     + " | ".join(ms) + " | " + " | ".join(ratio) + " |")
    return "\n".join(lines)


def train_table(runs: dict, params: dict) -> str:
    lines = ["| model | parameters | active per token | held-out loss (nats/byte) | tokens/s | largest expert share "
             "(per layer) |", "|---|---|---|---|---|---|"]
    for name, run in runs.items():
        shares = ", ".join(f"{v:.2f}" for v in run["balance"]["max_share"].values()) if run.get("balance") else "-"
        lines.append(f"| {name} | {params[name]['total'] / 1e6:.2f}M | {params[name]['active'] / 1e6:.2f}M | "
                     f"{run['final_eval_loss']:.4f} | {run['tokens_per_s']:.0f} | {shares} |")
    return "\n".join(lines)


def verdicts(layers: list[dict], runs: dict) -> list[str]:
    out = []
    for ref in ("per-expert loop, gather", "per-expert loop, compute then mask"):
        worst = min(r["speedup"][ref] for r in layers)
        out.append(f"grouped vs {ref}: {worst:.2f}x at the worst size, target >= {TARGET:.0f}x "
                   f"{'met' if worst >= TARGET else 'NOT met'}")
    dense, moe = runs["dense"]["final_eval_loss"], runs["MoE, balancing loss"]["final_eval_loss"]
    out.append(f"MoE (balancing loss) held-out loss {moe:.4f} vs dense {dense:.4f} at equal active parameters and "
               f"tokens: the claim that MoE reaches lower loss {'holds' if moe < dense else 'does NOT hold'} here "
               f"({(moe - dense) / dense * 100:+.1f}%, one seed per model)")
    return out


def write_docs(meta: dict, layers: list[dict], runs: dict, params: dict) -> None:
    from lmforge.benchmark import write_docs_section

    a = meta["args"]
    section = (
        f"## Mixture of Experts: grouped expert compute, and MoE vs dense at equal active parameters\n\n"
        f"```bash\n{meta['command']}\n```\n\n{meta['date']}, {meta['machine']}, {meta['threads']} threads, torch "
        f"{meta['torch']}; load average before {meta['loadavg_before']:.2f}, after {meta['loadavg_after']:.2f}.\n\n"
        f"Layer: forward + backward of one MoE layer (router + SwiGLU experts), median of {a['repeats']} "
        f"interleaved rounds after a warm-up in which every implementation's output and gradients are checked "
        f"equal to the grouped one. The implementations are described in `bench/bench_moe.py`'s docstring.\n\n"
        f"{layer_table(layers)}\n\n"
        f"Training: byte-level models ({a['layers']} layers, H={a['hidden']}, context {a['seq']}); dense SwiGLU "
        f"width {a['width']} vs {a['experts']} experts of width {a['width'] // a['top_k']}, top-{a['top_k']}; "
        f"{a['steps']} steps of {a['batch']} x {a['seq']} bytes (the same windows, order and schedule for every "
        f"model), AdamW lr {a['lr']}, fp32; balancing-loss coefficient {a['aux_coef']}. Held-out: "
        f"{a['eval_windows']} windows from speeches since 2000 and docs files never trained on.\n\n"
        f"{train_table(runs, params)}\n\n" + "\n".join(f"- {v}" for v in verdicts(layers, runs)) +
        "\n\n![held-out loss](../bench/results/moe_loss.png)\n![expert load](../bench/results/moe_expert_load.png)\n"
        "![layer time](../bench/results/moe_layer.png)\n\nRaw numbers: `bench/results/moe.json`.")
    write_docs_section(ROOT / "docs" / "benchmarks.md", "moe", section)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="one layer size, 12 training steps; writes nothing")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per layer size")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--width", type=int, default=512, help="dense SwiGLU width; each expert is width / top_k")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--aux-coef", type=float, default=0.01, help="load-balancing coefficient (Switch: 0.01)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--evals", type=int, default=10, help="held-out evaluations per run")
    p.add_argument("--eval-windows", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = p.parse_args()
    if args.quick:
        args.repeats, args.steps, args.evals, args.eval_windows = 2, 12, 2, 16
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.machine()) if Path("/proc/cpuinfo").exists() else "?"
    meta = {"date": date.today().isoformat(), "machine": f"{os.cpu_count()} CPUs, {cpu}", "threads": args.threads,
            "torch": torch.__version__, "loadavg_before": os.getloadavg()[0], "args": vars(args),
            "command": "python bench/bench_moe.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])}
    layers = []
    for size in SIZES[:1] if args.quick else SIZES:
        layers.append(bench_size(size, args.repeats, token_loop_max=512))
        print(f"layer {size}: " + ", ".join(f"{n} {t * 1e3:.1f} ms" for n, t in layers[-1]["median_s"].items()),
              flush=True)
    print("\n" + layer_table(layers) + "\n", flush=True)
    text = corpus(args.seed)
    train_rows = windows(text["train"], args.steps * args.batch, args.seq, args.seed)
    eval_rows = windows(text["held_out"], args.eval_windows, args.seq, args.seed + 1)
    configs = model_configs(args)
    params = {name: parameters(c) for name, c in configs.items()}
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, config in configs.items():
            runs[name] = train_run(config, train_rows, eval_rows, args, Path(tmp) / config.name)
            if config.n_experts:
                runs[name]["balance"] = balance(runs[name]["metrics"], config.n_experts)
            print(f"{name}: held-out {runs[name]['final_eval_loss']:.4f} nats/byte, "
                  f"{runs[name]['seconds']:.0f} s", flush=True)
    meta["loadavg_after"] = os.getloadavg()[0]
    print("\n" + train_table(runs, params) + "\n\n" + "\n".join(verdicts(layers, runs)))
    if args.quick:
        return
    out = ROOT / "bench" / "results"
    sample = text["held_out"]["sotu"][:96]
    plot_routing(sample, routing_of(runs["MoE, balancing loss"]["model"], sample), args.experts,
                 out / "moe_routing.png")
    from lmforge.training.plot import plot_expert_load

    plot_expert_load({n: r["metrics"] for n, r in runs.items() if n != "dense"}, out / "moe_expert_load.png")
    plot_losses(runs, args.batch * args.seq, out / "moe_loss.png")
    plot_layer(layers, list(IMPLS), out / "moe_layer.png")
    saved = {n: {k: v for k, v in r.items() if k != "model"} for n, r in runs.items()}
    (out / "moe.json").write_text(json.dumps({"meta": meta, "layer": layers, "parameters": params,
                                              "training": saved}, indent=1))
    write_docs(meta, layers, runs, params)
    print(f"wrote {out}/moe.json, moe_*.png and the moe section of docs/benchmarks.md")


if __name__ == "__main__":
    main()

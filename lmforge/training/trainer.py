"""The one training loop: any `objective(model, batch) -> loss`, resumable after a kill.

Setup, loop, save, cleanup, top to bottom. Each optimizer step takes `grad_accum`
micro-batches whose losses are normalised by the step's total label tokens (so 4 x 1 equals
1 x 4), clips the gradient norm, steps AdamW or 8-bit AdamW at the scheduled lr, logs
metrics (MoE models: each layer's expert usage too, plotted as expert_load.png), evaluates
every `eval_every` steps and checkpoints atomically. Resume restores the trained tensors,
optimizer, RNG and data position: the loss curve continues bit for bit.
"""

from __future__ import annotations

import json
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Literal

import torch
from torch import nn

from lmforge.allocator import keep_freed_memory
from lmforge.model.moe import dropped_fraction, expert_usage, reset_usage
from lmforge.training.checkpoints import (average_checkpoints, latest_checkpoint, read_index, restore_trained,
                                          rng_tensors, save_checkpoint)
from lmforge.training.data import Batches
from lmforge.training.objectives import Objective, count_loss_tokens
from lmforge.training.optim import build_optimizer, load_optimizer_tensors, optimizer_tensors
from lmforge.training.schedules import lr_at


@dataclass
class TrainConfig:
    """Loop settings; every field can be overridden from the CLI as `train.<field>=value`."""

    max_steps: int = 100
    micro_batch: int = 4
    grad_accum: int = 1
    lr: float = 2e-4
    warmup_steps: int = 10
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    max_grad_norm: float = 1.0
    eval_every: int = 25
    save_every: int = 25
    keep_last: int = 1  # newest checkpoints kept besides the best (>= average_last)
    average_last: int = 0  # average the trained tensors of the last k checkpoints at the end (0 = off)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    gradient_checkpointing: bool = True
    seed: int = 0
    deterministic: bool = False
    log_every: int = 1
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("max_steps", "micro_batch", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name}={getattr(self, name)} must be >= 1")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"train.precision={self.precision!r} must be auto, fp32 or bf16")


def cpu_has_bf16() -> bool:
    """Whether the CPU has bf16 matrix instructions (AVX512-BF16 or AMX), read from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on a GPU and on CPUs with bf16 instructions; fp32 on other CPUs, where torch's
    bf16 matmul has no fast kernel and is far slower than fp32 (docs/finetune.md)."""
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto" and (device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16())):
        return torch.bfloat16
    return None


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def evaluate(model: nn.Module, objective: Objective, batches: list[dict], amp: torch.dtype | None = None) -> float:
    """Mean per-token loss over every evaluation batch."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    device = next(model.parameters()).device
    for batch in batches:
        n = count_loss_tokens(batch)
        with _autocast(device, amp):
            total += float(objective(model, {**_to(batch, device), "loss_tokens": 1}))
        tokens += n
    model.train(was_training)
    return total / max(1, tokens)


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _autocast(device: torch.device, amp: torch.dtype | None):
    return torch.autocast(device.type, dtype=amp) if amp is not None else nullcontext()


class MetricsLog:
    """metrics.jsonl, one JSON object per line; on resume, lines after the checkpoint are dropped."""

    def __init__(self, path: Path, resume_step: int) -> None:
        self.path = path
        kept = []
        if path.exists() and resume_step > 0:
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
                if row.get("step", 0) <= resume_step:
                    kept.append(line)
        path.write_text("".join(line + "\n" for line in kept))
        self.file = open(path, "a", encoding="utf-8")

    def write(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def train(model: nn.Module, objective: Objective, data: Batches, cfg: TrainConfig, out_dir: str | Path,
          eval_batches: list[dict] | None = None, row_hook: Callable[[dict], None] | None = None) -> dict:
    """Run (or resume) training into `out_dir`; return a summary (steps, losses, paths). `row_hook(row)` may add
    fields to each step's metrics row (pretraining's MFU, training/mfu.py)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_root = out_dir / "checkpoints"
    device = next(model.parameters()).device
    amp = autocast_dtype(cfg.precision, device)
    if device.type == "cpu":
        keep_freed_memory()  # reuse freed activations instead of fresh zero-filled pages (allocator.py)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model.gradient_checkpointing = cfg.gradient_checkpointing
    params = trainable_parameters(model)
    if not params:
        raise ValueError("the model has no trainable parameters; apply an adapter or unfreeze it")
    names = list(params)
    opt = build_optimizer(params, cfg.optimizer, cfg.lr, cfg.weight_decay)
    start = _resume(ckpt_root, params, names, opt, data)
    metrics = MetricsLog(out_dir / "metrics.jsonl", start)
    (out_dir / "train_config.json").write_text(json.dumps(asdict(cfg), indent=1))
    bar = _progress(cfg, start)
    model.train()
    eval_loss = None
    try:
        for step in range(start, cfg.max_steps):
            row = _train_step(model, objective, data, opt, params, cfg, step, device, amp)
            if row_hook is not None:
                row_hook(row)
            last = step + 1 == cfg.max_steps
            if eval_batches and ((cfg.eval_every and (step + 1) % cfg.eval_every == 0) or last):
                eval_loss = row["eval_loss"] = evaluate(model, objective, eval_batches, amp)
                row.update(objective_metrics(objective, "eval_"))
            if (step + 1) % cfg.log_every == 0 or last or "eval_loss" in row:
                metrics.write(row)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}",
                                **({"mfu": f"{row['mfu']:.1%}"} if "mfu" in row else {}))
            if (cfg.save_every and (step + 1) % cfg.save_every == 0) or last or "eval_loss" in row:
                state = {"data": data.state(), "python_rng": _py_rng_state(), "train": asdict(cfg)}
                save_checkpoint(ckpt_root, step + 1, params, {**optimizer_tensors(opt, names), **rng_tensors()},
                                state, row.get("eval_loss"), keep=max(cfg.keep_last, cfg.average_last))
    finally:
        metrics.close()
        if bar is not None:
            bar.close()
    return _finish(out_dir, ckpt_root, cfg, eval_loss)


def _train_step(model, objective, data: Batches, opt, params, cfg: TrainConfig, step: int, device, amp) -> dict:
    """One optimizer step over `grad_accum` micro-batches; returns its metrics row."""
    t0 = time.perf_counter()
    moe = bool(getattr(getattr(model, "config", None), "n_experts", 0))
    if moe:
        reset_usage(model)  # count this step's forwards only, not the last evaluation's
    micro = [data.next() for _ in range(cfg.grad_accum)]
    loss_tokens = sum(count_loss_tokens(b) for b in micro)
    lr = lr_at(step, cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.decay, cfg.min_lr_ratio)
    for group in opt.param_groups:
        group["lr"] = lr
    loss = 0.0
    objective_metrics(objective)  # drop what calls outside this step recorded
    for batch in micro:
        with _autocast(device, amp):
            part = objective(model, {**_to(batch, device), "loss_tokens": max(1, loss_tokens)})
        part.backward()
        loss += float(part.detach())
    grad_norm = float(torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)) \
        if cfg.max_grad_norm else 0.0
    opt.step()
    opt.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - t0
    tokens = sum(int(b["num_tokens"]) for b in micro)  # real tokens, padding not counted
    row = {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
           "loss_tokens": loss_tokens, "tokens_per_s": tokens / seconds, "seconds": seconds,
           **objective_metrics(objective)}
    return {**row, **_expert_metrics(model)} if moe else row


def objective_metrics(objective: Objective, prefix: str = "") -> dict[str, float]:
    """Extra floats an objective reports through its optional `take_metrics()` (DPO's reward margin and
    preference accuracy, objectives/dpo.py) since it was last asked, for the metrics row."""
    take = getattr(objective, "take_metrics", None)
    return {f"{prefix}{k}": v for k, v in take().items()} if take is not None else {}


def _expert_metrics(model) -> dict:
    """MoE: per layer the fraction of this step's token assignments each expert got, and the share
    the capacity dropped (when a capacity factor is set)."""
    row = {"expert_usage": {layer: [round(f, 5) for f in fractions]
                            for layer, fractions in expert_usage(model).items()}}
    if model.config.capacity_factor is not None:
        row["expert_dropped"] = dropped_fraction(model)
    return row


def _resume(root: Path, params, names, opt, data: Batches) -> int:
    """Restore the last checkpoint if there is one; return the step to start from."""
    ckpt = latest_checkpoint(root)
    if ckpt is None:
        return 0
    load_optimizer_tensors(opt, names, restore_trained(ckpt, params))
    random.setstate(_py_rng_from(ckpt.state["python_rng"]))
    data.load_state(ckpt.state["data"])
    return int(ckpt.state["step"])


def _py_rng_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _py_rng_from(state: list) -> tuple:
    return (state[0], tuple(state[1]), state[2])


def _progress(cfg: TrainConfig, start: int):
    if not cfg.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=cfg.max_steps, initial=start, desc="train", unit="step", dynamic_ncols=True)


def _finish(out_dir: Path, ckpt_root: Path, cfg: TrainConfig, eval_loss: float | None) -> dict:
    """Summary, the averaged tensors (if asked) and the loss-curve PNG."""
    index = read_index(ckpt_root)
    summary = {"out_dir": str(out_dir), "last": str(ckpt_root / index["last"]) if index.get("last") else None,
               "best": str(ckpt_root / index["best"]) if index.get("best") else None,
               "best_eval_loss": index.get("best_loss"), "final_eval_loss": eval_loss}
    if cfg.average_last > 1:
        paths = [ckpt_root / h for h in index.get("history", [])][-cfg.average_last:]
        summary["averaged"] = average_checkpoints(paths)
        summary["averaged_from"] = [str(p) for p in paths]
    from lmforge.training.plot import plot_expert_load, plot_metrics, read_metrics

    summary["plot"] = plot_metrics(out_dir / "metrics.jsonl", out_dir / "loss.png")
    expert_plot = plot_expert_load({"": read_metrics(out_dir / "metrics.jsonl")}, out_dir / "expert_load.png")
    if expert_plot:
        summary["expert_plot"] = expert_plot
    return summary

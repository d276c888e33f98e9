"""Training plots as PNGs from metrics.jsonl (matplotlib, headless): loss curve, expert load."""

from __future__ import annotations

import json
from pathlib import Path

from lmforge.atomic import atomic_write


def _pyplot():
    """matplotlib's pyplot on the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def read_metrics(metrics: Path) -> list[dict]:
    """The rows of a metrics.jsonl file."""
    return [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]


def _save(plt, fig, out: Path) -> str:
    fig.tight_layout()
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return str(out)


def plot_metrics(metrics: Path, out: Path) -> str | None:
    """Train loss per step and eval loss at its steps; None when matplotlib is not installed."""
    plt = _pyplot()
    rows = read_metrics(metrics)
    if plt is None or not rows:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train", lw=1)
    evals = [r for r in rows if "eval_loss" in r]
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(plt, fig, out)


def plot_expert_load(runs: dict[str, list[dict]], out: Path) -> str | None:
    """Per run (a row of panels) and MoE layer (a column), each expert's share of the token
    assignments per step, stacked; a balanced router gives even bands. None without MoE rows."""
    plt = _pyplot()
    runs = {name: [r for r in rows if r.get("expert_usage")] for name, rows in runs.items()}
    runs = {name: rows for name, rows in runs.items() if rows}
    if plt is None or not runs:
        return None
    layers = sorted({layer for rows in runs.values() for r in rows for layer in r["expert_usage"]}, key=int)
    fig, axes = plt.subplots(len(runs), len(layers), figsize=(3.2 * len(layers), 2.6 * len(runs)), dpi=100,
                             squeeze=False, sharey=True)
    for i, (name, rows) in enumerate(runs.items()):
        for j, layer in enumerate(layers):
            ax = axes[i][j]
            kept = [r for r in rows if layer in r["expert_usage"]]
            shares = list(zip(*(r["expert_usage"][layer] for r in kept)))  # per expert, per step
            ax.stackplot([r["step"] for r in kept], shares, lw=0)
            ax.set_ylim(0, 1)
            ax.set_title(f"{name + ', ' if name else ''}layer {layer}", fontsize=9)
            ax.set_xlabel("step", fontsize=8)
        axes[i][0].set_ylabel("share of tokens per expert", fontsize=8)
    return _save(plt, fig, out)


def plot_ppo(rows: list[dict], out: Path) -> str | None:
    """PPO (training/ppo.py): mean reward, the KL to the reference with its target, the policy's clip
    fraction and entropy, and the value loss, per iteration; None without rows or matplotlib."""
    plt = _pyplot()
    if plt is None or not rows:
        return None
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.2), dpi=100)
    axes[0].plot(steps, [r["reward"] for r in rows], lw=1)
    axes[0].set_ylabel("mean reward (score)")
    axes[1].plot(steps, [r["kl"] for r in rows], lw=1, label="KL(policy || reference)")
    if rows[-1].get("kl_target") is not None:
        axes[1].axhline(rows[-1]["kl_target"], color="r", ls="--", lw=1, label="target")
    axes[1].set_ylabel("nats per response")
    axes[1].legend(fontsize=8)
    axes[2].plot(steps, [r["clip_frac"] for r in rows], lw=1, label="clip fraction")
    axes[2].plot(steps, [r["entropy"] for r in rows], lw=1, label="entropy (nats/token)")
    axes[2].legend(fontsize=8)
    axes[3].plot(steps, [r["value_loss"] for r in rows], lw=1)
    axes[3].set_ylabel("value loss")
    for ax in axes:
        ax.set_xlabel("PPO iteration")
        ax.grid(alpha=0.3)
    return _save(plt, fig, out)

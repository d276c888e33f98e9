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

"""Plots of bench/bench_moe.py: held-out loss curves, layer times, the routing of a trained model."""

from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(runs: dict, tokens_per_step: int, path: Path) -> None:
    """Held-out loss of every run against training tokens, one figure."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=110)
    for name, run in runs.items():
        ax.plot([s * tokens_per_step / 1e6 for s, _ in run["eval"]], [l for _, l in run["eval"]], "o-", ms=3,
                label=name)
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("held-out loss (nats/byte)")
    ax.set_title("MoE vs dense at equal active parameters")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_layer(rows: list[dict], impls: list[str], path: Path) -> None:
    """Forward + backward time per implementation and layer size, log scale."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.2, 3.8), dpi=110)
    width = 0.8 / len(impls)
    for i, name in enumerate(impls):
        xs = [j + i * width for j, r in enumerate(rows) if name in r["median_s"]]
        ax.bar(xs, [r["median_s"][name] * 1e3 for r in rows if name in r["median_s"]], width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))])
    ax.set_xticklabels([f"N={r['tokens']} H={r['hidden']}\nI={r['expert_width']} E={r['experts']} k={r['top_k']}"
                        for r in rows], fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("forward + backward (ms)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_routing(text: bytes, picks: list[list[int]], experts: int, path: Path) -> None:
    """Rows: MoE layers; columns: the bytes of a held-out line; colour: the router's first choice."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(min(14, 0.18 * len(text) + 1), 0.45 * len(picks) + 1.2), dpi=110)
    ax.imshow(picks, cmap="tab10" if experts <= 10 else "tab20", vmin=0, vmax=max(9, experts - 1), aspect="auto")
    for j, b in enumerate(text):
        ax.text(j, -0.75, chr(b) if 32 < b < 127 else "·", ha="center", va="bottom", fontsize=7, family="monospace")
    ax.set_yticks(range(len(picks)))
    ax.set_yticklabels([f"layer {i}" for i in range(len(picks))], fontsize=8)
    ax.set_xticks([])
    ax.set_ylim(len(picks) - 0.5, -1.5)
    ax.set_title(f"first-choice expert per byte (colour = one of {experts} experts)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

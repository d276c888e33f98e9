"""Draw docs/img/rope_scaling.png and docs/img/alibi.png: what each long-context kind does to the
RoPE frequencies, and the ALiBi bias per head. Usage: .venv/bin/python scripts/plot_positions.py"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from lmforge.config import Config  # noqa: E402
from lmforge.model.alibi import alibi_slopes  # noqa: E402
from lmforge.model.rope import inv_frequencies  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "docs" / "img"


def rope_plot() -> Path:
    """Wavelength (positions per turn) of every frequency pair, for a head of 64 and factor 4."""
    base = dict(head_dim=64, n_embd=256, n_head=4, rope_theta=10000.0, rope_factor=4.0,
                rope_original_max_position=2048, block_size=8192)
    fig, ax = plt.subplots(figsize=(7, 4))
    for kind, extra in [("none", {}), ("linear", {}), ("ntk", {}), ("dynamic", {"seq_len": 8192}),
                        ("yarn", {}), ("llama3", {})]:
        config = Config(**base, rope_scaling=kind)
        inv = inv_frequencies(config, config.rope_theta, extra.get("seq_len"))
        label = kind + (" (at 8192 tokens)" if extra else "")
        ax.plot(range(len(inv)), (2 * torch.pi / inv).numpy(), label=label)
    ax.axhline(2048, color="grey", ls=":", lw=1)
    ax.text(0, 2300, "original context (2048)", color="grey", fontsize=8)
    ax.set(yscale="log", xlabel="frequency pair i (of head_dim / 2)", ylabel="wavelength (positions per turn)",
           title="RoPE scaling kinds stretching a 2k context 4x")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = OUT / "rope_scaling.png"
    fig.savefig(path, dpi=120)
    return path


def alibi_plot() -> Path:
    """The bias a query at position 31 adds to each earlier key, per head (8 heads)."""
    slopes = alibi_slopes(8)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    keys = torch.arange(32)
    for h, m in enumerate(slopes.tolist()):
        ax.plot(keys.numpy(), (m * (keys - 31)).numpy(), label=f"head {h}: m = {m:.3g}")
    ax.set(xlabel="key position (query at 31)", ylabel="bias added to the score", title="ALiBi, 8 heads")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = OUT / "alibi.png"
    fig.savefig(path, dpi=120)
    return path


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    print(rope_plot(), alibi_plot())

"""Draw docs/img/sparse_patterns.png (each sparse pattern's mask) and docs/img/sparse_tiles.png (the tiles
the block-sparse kernel computes). Usage: .venv/bin/python scripts/plot_sparse_masks.py"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from lmforge.model.masks import attention_mask  # noqa: E402
from lmforge.model.sparse import build_plan  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "docs" / "img"
PATTERNS = {  # name -> spec, at 64 tokens
    "window 8": {"window": 8},
    "window 4, dilation 3": {"window": 4, "dilation": 3},
    "strided: window 8 + stride 8": {"window": 8, "stride": 8},
    "block 16": {"block": 16},
    "window 8 + 4 global": {"window": 8, "global_tokens": 4},
    "BigBird: window 8 + 4 global\n+ 1 random block of 8": {"window": 8, "global_tokens": 4, "random_blocks": 1,
                                                            "random_block_size": 8},
}


def patterns_plot(tokens: int = 64) -> Path:
    """One panel per pattern: query position down, key position across, dark where a query sees a key."""
    pos = torch.arange(tokens)[None]
    fig, axes = plt.subplots(2, 3, figsize=(10, 7))
    for ax, (name, spec) in zip(axes.flat, PATTERNS.items()):
        ax.imshow(attention_mask(pos, pos, None, pattern=spec)[0, 0].numpy(), cmap="Greys", interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set(xlabel="key position", ylabel="query position")
    fig.suptitle(f"Sparse attention patterns over {tokens} tokens (causal; dark = attended)")
    fig.tight_layout()
    path = OUT / "sparse_patterns.png"
    fig.savefig(path, dpi=120)
    return path


def tiles_plot(tokens: int = 2048, block: int = 64) -> Path:
    """The (query block, key block) tiles computed for window 256 + 16 global tokens; the rest are skipped."""
    pos = torch.arange(tokens)[None]
    plan = build_plan({"window": 256, "global_tokens": 16}, pos, pos, block=block)
    n, width = plan.index.shape
    used = (~plan.hidden[0]).view(n, block, width, block).any(3).any(1)  # (nQ, M): slot holds a visible key
    grid = torch.zeros(n, n)
    for qb in range(n):
        grid[qb, plan.index[qb][used[qb]]] = 1
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.imshow(grid.numpy(), cmap="Greys", interpolation="nearest")
    ax.set(xlabel=f"key block ({block} tokens)", ylabel=f"query block ({block} tokens)",
           title=f"Tiles computed at {tokens} tokens: {plan.tiles} of {n * (n + 1) // 2} causal")
    fig.tight_layout()
    path = OUT / "sparse_tiles.png"
    fig.savefig(path, dpi=120)
    return path


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    for made in (patterns_plot(), tiles_plot()):
        print(made)

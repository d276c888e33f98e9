"""Draw docs/img/moe_routing.png: how one MoE layer routes 12 tokens to 4 experts (top-2, capacity 1.0).

Left: the router's probabilities per token (rows) and expert (columns), the top-2 picks framed.
Right: the same picks as lmforge groups them (sorted by expert, first picks before second picks),
each expert's capacity as a line; picks past it are dropped. Computed by lmforge.model.moe itself.

    python scripts/plot_moe_routing.py
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from lmforge.model.moe import dispatch, expert_capacity, route  # noqa: E402

TOKENS, EXPERTS, K, FACTOR = 12, 4, 2, 1.0
OUT = Path(__file__).resolve().parent.parent / "docs" / "img" / "moe_routing.png"


def main() -> None:
    torch.manual_seed(3)
    logits = torch.randn(TOKENS, EXPERTS) * 1.5 + torch.tensor([1.0, 0.3, 0.0, -0.6])  # expert 0 popular
    probs = logits.softmax(-1)
    weights, picks = route(logits, K, normalize=True)
    cap = expert_capacity(TOKENS, K, EXPERTS, FACTOR)
    plan = dispatch(picks, EXPERTS, cap)
    kept = set(zip(plan.token.tolist(), plan.choice.tolist()))
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.6), dpi=110, gridspec_kw={"width_ratios": [1, 1.6]})
    left.imshow(probs, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    for n in range(TOKENS):
        for j in range(K):
            e = int(picks[n, j])
            color = "black" if (n, j) in kept else "red"
            left.add_patch(Rectangle((e - 0.5, n - 0.5), 1, 1, fill=False, lw=2.2 - j, ec=color))
            left.text(e, n, f"{float(weights[n, j]):.2f}", ha="center", va="center", fontsize=7)
    left.set_xticks(range(EXPERTS), [f"E{e}" for e in range(EXPERTS)])
    left.set_yticks(range(TOKENS), [f"t{n}" for n in range(TOKENS)], fontsize=7)
    left.set_title("router softmax; framed: top-2 (thick = 1st pick),\nnumbers: renormalised weights, red: dropped",
                   fontsize=8)
    routed = plan.routed.tolist()
    x = 0
    for e in range(EXPERTS):
        mine = sorted(((j, n) for n in range(TOKENS) for j in range(K) if int(picks[n, j]) == e))
        for slot, (j, n) in enumerate(mine):
            dropped = slot >= cap
            right.add_patch(Rectangle((x + slot, e - 0.4), 0.95, 0.8, color="tomato" if dropped else
                                      ("steelblue" if j == 0 else "lightsteelblue")))
            right.text(x + slot + 0.47, e, f"t{n}", ha="center", va="center", fontsize=7)
        right.plot([x + cap - 0.02] * 2, [e - 0.5, e + 0.5], "k--", lw=1)
        right.text(-0.4, e, f"E{e}: {routed[e]} routed, {min(routed[e], cap)} computed", ha="right", va="center",
                   fontsize=8)
    right.set_xlim(-0.2, max(routed) + 0.5)
    right.set_ylim(EXPERTS - 0.5, -0.5)
    right.axis("off")
    right.set_title(f"grouped by expert (dark: 1st picks, light: 2nd picks, red: dropped)\n"
                    f"dashed: capacity ceil({FACTOR} x {TOKENS} tokens x {K} / {EXPERTS} experts) = {cap}", fontsize=8)
    fig.tight_layout()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()

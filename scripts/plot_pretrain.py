"""Plot a pretraining run's metrics.jsonl: training and held-out loss against tokens seen (docs/img/pretrain_loss.png).

    python scripts/plot_pretrain.py runs/pretrain/metrics.jsonl docs/img/pretrain_loss.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(metrics: str, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics).read_text().splitlines() if line.strip()]
    tokens, seen = [], 0
    for r in rows:
        seen += r["tokens"]
        tokens.append(seen / 1000)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax.plot(tokens, [r["loss"] for r in rows], label="training loss", alpha=0.6)
    held = [(t, r["eval_loss"]) for t, r in zip(tokens, rows) if "eval_loss" in r]
    ax.plot(*zip(*held), "o-", label="held-out loss")
    ax.set_xlabel("thousand tokens seen")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.legend()
    ax.set_title("pretrain-llama-30m from scratch")
    ax2.plot([r["step"] for r in rows], [r["tokens_per_s"] for r in rows], label="tokens/s")
    ax2.set_xlabel("step")
    ax2.set_ylabel("tokens/s")
    twin = ax2.twinx()
    twin.plot([r["step"] for r in rows], [100 * r["mfu"] for r in rows], color="tab:red", alpha=0.5, label="MFU %")
    twin.set_ylabel("MFU (%)")
    ax2.set_title("throughput (shared 2-core CPU)")
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

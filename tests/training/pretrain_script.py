"""A tiny deterministic pretraining run through the pretrain runner; the kill-and-resume test starts it."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import byte_tokenizer  # noqa: E402

from lmforge.training import pretrain  # noqa: E402
from lmforge.training.recipe import from_dict  # noqa: E402

TEXT = ("Four score and seven years ago our fathers brought forth on this continent a new nation. "
        "def area(r):\n    return 3.14159 * r * r\n")


def tiny_recipe(root: Path, out: Path, steps: int, **train) -> object:
    """A recipe training tiny-llama from scratch on two small text sources with the byte tokenizer."""
    if not (root / "tok" / "tokenizer.json").is_file():
        byte_tokenizer().save_hf(root / "tok")
        (root / "speech.txt").write_text(TEXT * 6)
        (root / "code.jsonl").write_text("".join(f'{{"text": "x{i} = {i} * {i}\\nprint(x{i})"}}\n' for i in range(40)))
    return from_dict({
        "model": str(root / "tok"), "out_dir": str(out), "device": "cpu", "objective": "pretrain", "adapter": "full",
        "pretrain": {"sources": {"speech": str(root / "speech.txt"), "code": str(root / "code.jsonl")},
                     "weights": {"speech": 0.7, "code": 0.3}, "shard_dir": str(root / "shards"), "seq_len": 32,
                     "held_out": 0.1, "eval_rows": 4, "preset": "tiny-llama", "vocab_size": 260},
        "train": {"max_steps": steps, "micro_batch": 4, "lr": 1e-2, "warmup_steps": 3, "save_every": 2,
                  "eval_every": 5, "deterministic": True, "progress": False, "precision": "fp32",
                  "gradient_checkpointing": False, **train}})


def main(out: Path, steps: int, delay: float) -> None:
    torch.set_num_threads(1)
    loss = pretrain.pretrain_loss

    def slow_loss(model, batch):
        time.sleep(delay)
        return loss(model, batch)

    pretrain.pretrain_loss = slow_loss
    pretrain.run(tiny_recipe(out.parent, out, steps))


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]))

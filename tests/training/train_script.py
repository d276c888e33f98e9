"""A tiny deterministic LoRA run, resumable; the kill-and-resume test starts it as a subprocess."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import QA, VOCAB, byte_tokenizer, write_jsonl  # noqa: E402

from lmforge.config import Config  # noqa: E402
from lmforge.model.transformer import build_model  # noqa: E402
from lmforge.training.data import Batches, build_rows  # noqa: E402
from lmforge.training.lora import LoRAConfig, apply_lora  # noqa: E402
from lmforge.training.objectives import sft_loss  # noqa: E402
from lmforge.training.trainer import TrainConfig, train  # noqa: E402


def main(out: Path, steps: int, delay: float) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    tok = byte_tokenizer()
    out.parent.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(out.parent / "data.jsonl", [{"instruction": q, "output": a} for q, a in QA])
    model = build_model(Config.from_name("tiny-llama", vocab_size=VOCAB, block_size=512))
    apply_lora(model, LoRAConfig(rank=4, dropout=0.1, dora=True))
    rows = build_rows(data, tok, "alpaca", 256, packing=False)
    cfg = TrainConfig(max_steps=steps, micro_batch=2, grad_accum=2, lr=1e-2, warmup_steps=3, save_every=2,
                      eval_every=5, deterministic=True, progress=False, optimizer="adamw8bit")

    def slow_sft(model, batch):
        time.sleep(delay)
        return sft_loss(model, batch)

    train(model, slow_sft, Batches(rows, 2, tok.pad_id, seed=0), cfg, out, eval_batches=Batches(rows[:4], 2, 258).all())


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]))

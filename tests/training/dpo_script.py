"""A tiny deterministic DPO run with LoRA, resumable; test_dpo starts it as a subprocess and kills it."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import QA, VOCAB, byte_tokenizer, write_jsonl  # noqa: E402

from lmforge.config import Config  # noqa: E402
from lmforge.model.transformer import build_model  # noqa: E402
from lmforge.training.lora import LoRAConfig, apply_lora  # noqa: E402
from lmforge.training.objectives.dpo import DPOConfig, PreferenceObjective  # noqa: E402
from lmforge.training.preferences import PreferenceBatches, build_pairs, precompute_reference  # noqa: E402
from lmforge.training.trainer import TrainConfig, train  # noqa: E402


def main(out: Path, steps: int, delay: float) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    tok = byte_tokenizer()
    out.parent.mkdir(parents=True, exist_ok=True)
    records = [{"prompt": q, "chosen": a, "rejected": QA[(i + 3) % len(QA)][1] + " maybe"}
               for i, (q, a) in enumerate(QA)]
    data = write_jsonl(out.parent / "pairs.jsonl", records[:8])
    model = build_model(Config.from_name("tiny-llama", vocab_size=VOCAB, block_size=128))
    apply_lora(model, LoRAConfig(rank=4))
    cfg = DPOConfig(beta=0.5, max_prompt_length=48, max_length=64)
    pairs = build_pairs(data, tok, "chat", cfg)
    precompute_reference(model, pairs, 4, tok.pad_id)
    train_cfg = TrainConfig(max_steps=steps, micro_batch=2, grad_accum=2, lr=1e-2, warmup_steps=2, save_every=2,
                            eval_every=7, deterministic=True, progress=False, precision="fp32")
    objective = PreferenceObjective(cfg)

    def slow(model, batch):
        time.sleep(delay)
        return objective(model, batch)

    slow.take_metrics = objective.take_metrics
    train(model, slow, PreferenceBatches(pairs, 2, tok.pad_id, seed=0), train_cfg, out,
          eval_batches=PreferenceBatches(pairs, 4, tok.pad_id, shuffle=False).all())


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]))

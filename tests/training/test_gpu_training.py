"""On a CUDA device: LoRA and QLoRA train under bf16 autocast, adapters stay fp32, resume works."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.config import Config
from lmforge.model.transformer import build_model
from lmforge.training.data import Batches, build_rows
from lmforge.training.lora import LoRAConfig, adapter_state, apply_lora
from lmforge.training.objectives import sft_loss
from lmforge.training.trainer import TrainConfig, autocast_dtype, train

from .conftest import VOCAB

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_bf16_training_on_cuda(tokenizer, alpaca_file, tmp_path, quantize) -> None:
    device = torch.device("cuda")
    assert autocast_dtype("auto", device) == torch.bfloat16
    model = build_model(Config.from_name("tiny-llama", vocab_size=VOCAB, block_size=512), device=device)
    apply_lora(model, LoRAConfig(rank=8, quantize=quantize, dora=quantize == "none"))
    rows = build_rows(alpaca_file, tokenizer, "alpaca", 256, packing=True)
    cfg = TrainConfig(max_steps=30, micro_batch=2, lr=1e-2, warmup_steps=2, eval_every=10, save_every=10,
                      progress=False)
    evals = Batches(rows, 2, tokenizer.pad_id).all()
    train(model, sft_loss, Batches(rows, 2, tokenizer.pad_id), cfg, tmp_path / "run", eval_batches=evals)
    rows_out = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows_out[-1]["eval_loss"] < rows_out[9]["eval_loss"] < rows_out[0]["loss"]  # falls under bf16
    assert all(p.dtype == torch.float32 and p.device.type == "cuda" for p in adapter_state(model).values())
    cfg.max_steps = 35  # resume from step 30 on the GPU
    train(model, sft_loss, Batches(rows, 2, tokenizer.pad_id), cfg, tmp_path / "run", eval_batches=evals)
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 36))

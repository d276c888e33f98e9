"""The serving engine runs MoE models (through the PyTorch forward): outputs equal generate's."""

from __future__ import annotations

import torch

from lmforge.config import Config
from lmforge.model.transformer import build_model
from lmforge.serving.engine import Engine, EngineConfig

from .test_engine import ByteTokenizer, _alone, _prompts, _run_with_arrivals


def test_moe_engine_equals_generate_with_arrivals_and_prefix_reuse():
    model = build_model(Config.from_name("tiny-qwen-moe")).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(10)  # confident routing that differs from token to token
    prompts = _prompts(5, seed=1, shared_prefix=list(range(1, 40)))
    engine = Engine(model, ByteTokenizer(), EngineConfig(block_size=16, num_blocks=256, prefix_caching=True))
    assert _run_with_arrivals(engine, prompts, 12) == _alone(model, prompts, 12)

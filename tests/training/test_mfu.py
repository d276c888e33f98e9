"""MFU: PaLM's FLOP count checked against a hand count of the tiny model's matmuls; the peak is measured."""

from __future__ import annotations

import torch

from lmforge.config import Config
from lmforge.model.transformer import build_model
from lmforge.training.mfu import flop_params, flops_per_token, measure_peak, mfu, peak_flops


def test_flops_per_token_is_6n_plus_attention() -> None:
    cfg = Config.from_name("tiny-llama")  # 2 layers, d=64, 4 heads (16), 2 kv heads, ffn 128, vocab 256, tied
    d, kv, ffn, vocab, L = 64, 2 * 16, 128, 256, 2
    per_layer = d * d + 2 * d * kv + d * d + 3 * d * ffn + 2 * d  # q, k, v, o, gate/up/down, two norms
    n = L * per_layer + d + vocab * d  # + final norm + the (tied) lm_head matmul
    model = build_model(cfg)
    assert flop_params(model) == n
    assert flops_per_token(model, 128) == 6 * n + 12 * L * 4 * 16 * 128
    assert flops_per_token(model, 128, attention=False) == 6 * n
    untied = build_model(Config.from_name("tiny-llama", tie_embeddings=False))
    assert flop_params(untied) == n  # the input embedding is a lookup, not a matmul


def test_peak_is_measured_once_and_mfu_is_a_fraction() -> None:
    peak = measure_peak(torch.float32, n=256, repeats=2)
    assert peak > 1e8 and measure_peak(torch.float32, n=256, repeats=2) == peak  # cached
    value, source = peak_flops(torch.device("cpu"), torch.float32)
    assert value > 1e8 and "measured" in source
    assert mfu(1000.0, 6e6, 1.2e10) == 0.5

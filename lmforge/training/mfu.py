"""Model FLOPs utilization: the share of the hardware's peak matmul rate that training turns into model FLOPs.

MFU = flops_per_token * tokens/s / peak FLOP/s, with PaLM's count (Chowdhery et al. 2022, appendix B):
6N FLOPs per token for the forward and backward matmuls of N parameters, plus 12 L H Q T for attention
(L layers, H heads of size Q, context T). Here N is the non-embedding parameters plus the lm_head
(vocab x n_embd, a matmul even when tied to the embedding; the embedding lookup is not). Recomputation
from gradient checkpointing is not counted (that would be hardware FLOPs utilization).
Peak FLOP/s: a GPU's datasheet dense rate, or on a CPU a matmul micro-benchmark run once per process in
the run's dtype and thread count.
"""

from __future__ import annotations

import time

import torch
from torch import nn

# dense (no sparsity) datasheet peaks in FLOP/s; fp32 is the non-tensor-core rate
GPU_PEAK = {
    "H100": {torch.bfloat16: 989.4e12, torch.float16: 989.4e12, torch.float32: 66.9e12},  # SXM5
    "H200": {torch.bfloat16: 989.4e12, torch.float16: 989.4e12, torch.float32: 66.9e12},
    "A100": {torch.bfloat16: 312e12, torch.float16: 312e12, torch.float32: 19.5e12},
    "L4": {torch.bfloat16: 121e12, torch.float16: 121e12, torch.float32: 30.3e12},
}
_MEASURED: dict[tuple, float] = {}


def flop_params(model: nn.Module) -> int:
    """N of 6N: every parameter but the input embedding, plus the lm_head matmul (counted when tied too)."""
    cfg = model.config
    total = sum(p.numel() for p in model.parameters())  # a tied head is the embedding, counted once
    return total if cfg.tie_embeddings else total - cfg.vocab_size * cfg.n_embd


def flops_per_token(model: nn.Module, seq_len: int, attention: bool = True) -> float:
    """6N + 12 L H Q T training FLOPs per token (PaLM, appendix B)."""
    cfg = model.config
    attn = 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * seq_len if attention else 0
    return 6.0 * flop_params(model) + attn


def measure_peak(dtype: torch.dtype = torch.float32, n: int = 1024, repeats: int = 5) -> float:
    """Best FLOP/s of an (n x n) @ (n x n) matmul on this CPU in `dtype` at torch's thread count."""
    key = (dtype, n, torch.get_num_threads())
    if key not in _MEASURED:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        a @ b  # warm up (oneDNN picks its kernel)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
        _MEASURED[key] = 2 * n ** 3 / best
    return _MEASURED[key]


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """(peak FLOP/s, where it came from): the datasheet for a known GPU, else a measured matmul."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for gpu, table in GPU_PEAK.items():
            if gpu in name and dtype in table:
                return table[dtype], f"{gpu} datasheet ({dtype})"
    return measure_peak(dtype), f"measured {dtype} matmul, {torch.get_num_threads()} threads"


def mfu(tokens_per_s: float, flops_token: float, peak: float) -> float:
    """Model FLOPs utilization, a fraction of 1."""
    return flops_token * tokens_per_s / peak


def mfu_hook(model: nn.Module, seq_len: int, device: torch.device, dtype: torch.dtype):
    """A trainer row hook that adds `mfu` (and the FLOP count and peak it used) to each step's metrics."""
    per_token = flops_per_token(model, seq_len)
    peak, _ = peak_flops(device, dtype)

    def hook(row: dict) -> None:
        row["mfu"] = mfu(row["tokens_per_s"], per_token, peak)

    hook.flops_per_token, hook.peak = per_token, peak  # type: ignore[attr-defined]
    return hook

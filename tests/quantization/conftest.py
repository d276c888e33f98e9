"""Quantization tests: one intra-op thread (tiny tensors), and LLM-like activations for GPTQ/AWQ."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """These tensors are tiny: intra-op threads only add synchronisation (100x slower on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def activation_source():
    """A factory of activation samplers (see `_activation_source`)."""
    return _activation_source


def _activation_source(K: int, rank: int = 32, noise: float = 0.3, outliers: int = 4, gain: float = 20.0):
    """Rows like an LLM layer's inputs: correlated (low rank plus noise), a few channels 20x larger."""
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(rank, K, generator=g) / rank ** 0.5
    scale = torch.exp(0.5 * torch.randn(K, generator=g))
    scale[torch.randperm(K, generator=g)[:outliers]] *= gain

    def sample(n: int, seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return (torch.randn(n, rank, generator=gen) @ basis + noise * torch.randn(n, K, generator=gen)) * scale

    return sample


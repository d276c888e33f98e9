"""Shared fixtures: deterministic seeds and dtype, and the real models when they are pulled."""

from __future__ import annotations

import random

import pytest
import torch

from lmforge import hub


@pytest.fixture(autouse=True)
def _reset_seed_and_dtype():
    random.seed(0)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float32)
    yield


def _real(name: str):
    path = hub.find_cached(name)
    if path is None:
        pytest.skip(f"real model {name} is not pulled; run `lmforge pull {name}`")
    return path


@pytest.fixture
def two_threads():
    """Two compute threads: decode attention cuts keys into parts by thread count (attention.h), so
    tests of how parts merge pin it to run the same on any machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smollm2_gguf():
    """Path of the real SmolLM2-135M-Instruct GGUF (tests using it are marked real_model)."""
    return _real("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def gemma3_gguf():
    """Path of the real Gemma 3 270M GGUF (tests using it are marked real_model)."""
    return _real("gemma3-270m")

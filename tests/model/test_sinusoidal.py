"""Sinusoidal positions equal the original Transformer's table (DistilBERT's builder as the reference)
and a model with them is position-aware without learned position weights."""

from __future__ import annotations

import pytest
import torch

from lmforge.config import Config
from lmforge.generation.kv_cache import KVCache
from lmforge.model.sinusoidal import sinusoidal_positions
from lmforge.model.transformer import build_model


@pytest.mark.parametrize("dim", [64, 30])
def test_table_equals_the_papers(dim):
    distilbert = pytest.importorskip("transformers.models.distilbert.modeling_distilbert")
    want = torch.empty(100, dim)
    distilbert.create_sinusoidal_embeddings(100, dim, want)
    torch.testing.assert_close(sinusoidal_positions(torch.arange(100), dim), want, atol=1e-6, rtol=1e-5)


def test_formula_at_one_position():
    pe = sinusoidal_positions(torch.tensor([7]), 8)[0]
    i = torch.arange(4, dtype=torch.float64)
    angle = 7 / 10000 ** (2 * i / 8)
    torch.testing.assert_close(pe[0::2], angle.sin().float())
    torch.testing.assert_close(pe[1::2], angle.cos().float())


def test_model_adds_them_and_decodes_over_the_cache():
    torch.manual_seed(0)
    model = build_model(Config.from_name("tiny-sinusoidal")).eval()
    assert not any("position" in name for name, _ in model.named_parameters())
    ids = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        x = model.embed(ids, torch.arange(10)[None])
        torch.testing.assert_close(x - model.model.embed_tokens(ids), sinusoidal_positions(torch.arange(10), 64)[None])
        full = model(ids)
        cache = KVCache(model.config, 1, 16)
        steps = [model(ids[:, :6], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(6, 10)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)

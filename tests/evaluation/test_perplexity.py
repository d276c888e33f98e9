"""Perplexity: windows cover every target once; the value equals a direct computation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import Config
from lmforge.evaluation.perplexity import perplexity, windows
from lmforge.model.transformer import build_model


@pytest.mark.parametrize("n,context,stride", [(100, 16, 16), (100, 16, 5), (17, 16, 8), (2, 16, 4), (50, 64, 8)])
def test_windows_score_every_target_once(n, context, stride):
    scored = []
    for start, end, first in windows(n, context, stride):
        assert 0 <= start < end <= n - 1 and end - start <= context
        scored += list(range(start + first + 1, end + 1))  # target positions
    assert scored == list(range(1, n))


def test_bad_stride_and_short_stream():
    with pytest.raises(ValueError, match="stride"):
        windows(10, 4, 5)
    with pytest.raises(ValueError, match="2 tokens"):
        windows(1, 4, 4)


def test_equals_direct_nll_when_one_window():
    model = build_model(Config.from_name("tiny-llama")).eval()
    ids = torch.randint(0, 256, (40,))
    logits = model(ids[None, :-1])[0]
    expected = F.cross_entropy(logits, ids[1:]).item()
    result = perplexity(model, ids, context=64)
    assert result.tokens == 39
    assert result.nll == pytest.approx(expected, rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(expected), rel=1e-5)


def test_overlapping_windows_give_more_context():
    """A per-token NLL computed by hand from each window's scored part equals the function's."""
    model = build_model(Config.from_name("tiny-llama")).eval()
    ids = torch.randint(0, 256, (60,))
    total = 0.0
    for start, end, first in windows(60, 16, 4):
        logits = model(ids[None, start:end])[0, first:]
        total += F.cross_entropy(logits, ids[start + 1 + first:end + 1], reduction="sum").item()
    assert perplexity(model, ids, context=16, stride=4).nll == pytest.approx(total / 59, rel=1e-5)

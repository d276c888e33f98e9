"""Replay: the share of old rows per batch, determinism, exact resume, and continual options through the
SFT runner's hook (apply_continual)."""

from __future__ import annotations

import pytest
import torch

from lmforge.training.continual import ContinualConfig, apply_continual
from lmforge.training.data import Batches, Example
from lmforge.training.replay import ReplayBatches


def _rows(n: int, start: int) -> list[list[Example]]:
    return [[Example([start + i, 1, 2], [-100, 1, 2])] for i in range(n)]


def _origins(batch) -> list[str]:
    return ["old" if int(i) >= 1000 else "new" for i in batch["input_ids"][:, 0]]


@pytest.mark.parametrize("fraction,micro", [(0.25, 4), (0.5, 4), (0.3, 5), (0.1, 4)])
def test_fraction_of_old_rows(fraction, micro):
    data = ReplayBatches(_rows(37, 0), _rows(11, 1000), micro, pad_id=0, fraction=fraction, seed=3)
    counts = []
    for _ in range(40):
        batch = data.next()
        assert batch["input_ids"].shape[0] == micro
        counts.append(_origins(batch).count("old"))
        assert counts[-1] == batch["replayed"]
    assert abs(sum(counts) / (40 * micro) - fraction) <= 1 / (40 * micro)
    assert max(counts) - min(counts) <= 1  # spread evenly, not in bursts


def test_deterministic_and_resumable():
    def make():
        return ReplayBatches(_rows(13, 0), _rows(7, 1000), 4, pad_id=0, fraction=0.25, seed=5)

    a, b = make(), make()
    first = [a.next()["input_ids"] for _ in range(10)]
    assert all(torch.equal(x, b.next()["input_ids"]) for x in first)
    state = a.state()
    rest = [a.next()["input_ids"] for _ in range(10)]
    c = make()
    c.load_state(state)
    assert all(torch.equal(x, c.next()["input_ids"]) for x in rest)
    # every new row comes once per epoch of the new task
    d = make()
    seen = [int(i) for _ in range(5) for i in d.next()["input_ids"][:, 0] if int(i) < 1000]
    assert sorted(seen[:13]) == list(range(13))


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="replay_data"):
        ContinualConfig(replay_fraction=0.2)
    with pytest.raises(ValueError, match="previous_data"):
        ContinualConfig(ewc_lambda=1.0)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        ReplayBatches(_rows(3, 0), _rows(3, 1000), 4, 0, fraction=1.0)


def test_apply_continual_replays_previous_task(tokenizer, alpaca_file):
    from lmforge.training.data import build_rows
    from lmforge.training.objectives.sft import sft_loss

    rows = build_rows(alpaca_file, tokenizer, "chat", 64, False)
    data = Batches(rows, 4, tokenizer.pad_id)
    off = apply_continual(ContinualConfig(), None, tokenizer, data, sft_loss, "chat", 64, False)
    assert off == (data, sft_loss)
    cfg = ContinualConfig(replay_data=str(alpaca_file), replay_fraction=0.5)
    mixed, objective = apply_continual(cfg, None, tokenizer, data, sft_loss, "chat", 64, False)
    assert isinstance(mixed, ReplayBatches) and objective is sft_loss and mixed.next()["replayed"] == 2

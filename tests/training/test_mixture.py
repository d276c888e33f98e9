"""The data mixture: proportions match the weights, deterministic by seed, resumes the identical sequence;
rows restart positions and seq_ids after each EOS."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lmforge.training.mixture import Mixture, collate_tokens
from lmforge.training.shards import build_shard

EOS, PAD = 257, 258


@pytest.fixture
def shards(tokenizer, tmp_path):
    out = {}
    for name, word in (("a", "alpha"), ("b", "beta"), ("c", "gamma")):
        src = tmp_path / f"{name}.jsonl"
        src.write_text("".join(json.dumps({"text": f"{word} {i} " * (i % 5 + 1)}) + "\n" for i in range(60)))
        out[name] = build_shard(name, [src], tokenizer, tmp_path / "shards")
    return out


def _mixture(shards, seed=0, weights=None, micro_batch=4):
    weights = weights or {"a": 0.5, "b": 0.3, "c": 0.2}
    return Mixture(shards, weights, 16, micro_batch, EOS, PAD, seed=seed)


def test_proportions_match_the_weights(shards) -> None:
    mix = _mixture(shards)
    n = 20_000
    counts = np.bincount([mix.source_of(k) for k in range(n)], minlength=3) / n
    # binomial standard error at n=20000 is <= 0.0036; 4 sigma
    np.testing.assert_allclose(counts, [0.5, 0.3, 0.2], atol=0.015)
    unnormalised = _mixture(shards, weights={"a": 2, "b": 1, "c": 1})
    counts = np.bincount([unnormalised.source_of(k) for k in range(n)], minlength=3) / n
    np.testing.assert_allclose(counts, [0.5, 0.25, 0.25], atol=0.015)


def _rows(mix, k):
    return [(s, r.tolist()) for s, r in (mix.next_row() for _ in range(k))]


def test_deterministic_by_seed(shards) -> None:
    assert _rows(_mixture(shards, seed=3), 300) == _rows(_mixture(shards, seed=3), 300)
    assert _rows(_mixture(shards, seed=3), 300) != _rows(_mixture(shards, seed=4), 300)


def test_rows_come_from_their_source_and_cycle_through_epochs(shards) -> None:
    mix = _mixture(shards)
    seen = {s: [] for s in range(3)}
    for s, r in _rows(mix, 2000):
        seen[s].append(tuple(r))
    for s, name in enumerate("abc"):
        sh = shards[name]
        all_rows = {tuple(sh.tokens[i * 16:(i + 1) * 16].tolist()) for i in range(mix.rows[s])}
        assert set(seen[s]) == all_rows  # every row read, and only this source's
        for epoch in range(2):  # each epoch reads a permutation of the rows, a different one each time
            order = [mix._row_index(s, epoch * mix.rows[s] + i) for i in range(mix.rows[s])]
            assert sorted(order) == list(range(mix.rows[s])) and order != list(range(mix.rows[s]))
    assert all(e > 1 for e in mix.epochs().values())


def test_state_resumes_the_identical_sequence(shards) -> None:
    ref = _mixture(shards, seed=7)
    expected = [ref.next() for _ in range(40)]
    mix = _mixture(shards, seed=7)
    for _ in range(17):
        mix.next()
    state = json.loads(json.dumps(mix.state()))  # as the checkpoint stores it
    resumed = _mixture(shards, seed=7)
    resumed.load_state(state)
    for want in expected[17:]:
        got = resumed.next()
        assert set(got) == set(want)
        for key, value in want.items():
            assert torch.equal(got[key], value) if isinstance(value, torch.Tensor) else got[key] == value


def test_positions_and_seq_ids_restart_after_eos() -> None:
    r = np.array([5, 6, EOS, 7, 8, 9, EOS, 4])
    batch = collate_tokens([r, np.array([1, 2, 3, 4, 5, 6, 7, 8])], EOS, PAD, document_mask=True)
    assert batch["seq_ids"][0].tolist() == [0, 0, 0, 1, 1, 1, 1, 2]
    assert batch["positions"][0].tolist() == [0, 1, 2, 0, 1, 2, 3, 0]
    assert batch["seq_ids"][1].tolist() == [0] * 8 and batch["positions"][1].tolist() == list(range(8))
    assert torch.equal(batch["labels"], batch["input_ids"]) and batch["num_tokens"] == 16
    plain = collate_tokens([r], EOS, PAD, document_mask=False)
    assert "seq_ids" not in plain and plain["positions"][0].tolist() == list(range(8))
    short = collate_tokens([r, np.array([1, 2, 3])], EOS, PAD, document_mask=False)
    assert short["labels"][1].tolist() == [1, 2, 3] + [-100] * 5 and short["valid"][1].sum() == 3


def test_bad_weights_are_clear_errors(shards) -> None:
    with pytest.raises(ValueError, match="give one weight per source"):
        _mixture(shards, weights={"a": 1.0, "b": 1.0})
    with pytest.raises(ValueError, match="must be positive"):
        _mixture(shards, weights={"a": 1.0, "b": 0, "c": 1.0})
    mix = _mixture(shards)
    with pytest.raises(ValueError, match="same sources"):
        mix.load_state({"draws": 3, "read": {"a": 1, "z": 2}})

"""Token shards: exact round trip, dtype by vocabulary, atomic writes, rebuilt only when sources change,
clear errors naming file:line, held-out split by hash."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from lmforge.training import shards as shards_mod
from lmforge.training.shards import build_shard, is_held_out, open_shard, row, row_count, token_dtype

DOCS = ["The union is strong.", "Python has classes.\nThey bundle data.", "R is for statistics. " * 40]


def _write(path, docs):
    path.write_text("".join(json.dumps({"text": d, "source": f"doc{i}"}) + "\n" for i, d in enumerate(docs)))
    return path


def test_round_trip_equals_encode_plus_eos(tokenizer, tmp_path) -> None:
    src = _write(tmp_path / "a.jsonl", DOCS[:2])
    txt = tmp_path / "b.txt"
    txt.write_text(DOCS[2])
    shard = build_shard("mix", [src, txt], tokenizer, tmp_path / "shards")
    expected = [t for d in DOCS for t in tokenizer.encode(d, add_special_tokens=False) + [tokenizer.eos_id]]
    assert shard.tokens.dtype == np.uint16 and isinstance(shard.tokens, np.memmap)
    assert shard.tokens.tolist() == expected
    assert shard.index["num_docs"] == 3 and shard.index["num_tokens"] == len(expected)
    assert (tmp_path / "shards" / "mix.train.bin").stat().st_size == 2 * len(expected)
    # contiguous rows over the stream: a long document spans rows, the tail shorter than a row is dropped
    assert row_count(shard, 64) == len(expected) // 64
    assert np.concatenate([row(shard, i, 64) for i in range(row_count(shard, 64))]).tolist() == \
        expected[:64 * (len(expected) // 64)]


class _BigVocab:
    """A tokenizer stand-in with 70,000 ids: shards need uint32."""

    vocab_size, eos_id = 70_000, 69_999

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [65_536 + ord(c) % 1000 for c in text]


def test_dtype_by_vocabulary(tmp_path) -> None:
    assert token_dtype(65_535) == np.uint16 and token_dtype(65_536) == np.uint32
    shard = build_shard("big", [_write(tmp_path / "a.jsonl", ["abc"])], _BigVocab(), tmp_path)
    assert shard.tokens.dtype == np.uint32 and shard.tokens.tolist() == [65_536 + 97, 65_536 + 98, 65_536 + 99, 69_999]


def test_rebuilt_only_when_sources_change(tokenizer, tmp_path) -> None:
    src = _write(tmp_path / "a.jsonl", DOCS[:2])
    first = build_shard("s", [src], tokenizer, tmp_path / "out")
    bin_mtime = first.path.stat().st_mtime_ns
    again = build_shard("s", [src], tokenizer, tmp_path / "out")
    assert again.path.stat().st_mtime_ns == bin_mtime and again.index["key"] == first.index["key"]
    _write(src, DOCS)  # the source changed (size and mtime): rebuilt
    os.utime(src, ns=(bin_mtime + 10**9, bin_mtime + 10**9))
    changed = build_shard("s", [src], tokenizer, tmp_path / "out")
    assert changed.index["key"] != first.index["key"] and changed.index["num_docs"] == 3


def test_writes_are_atomic(tokenizer, tmp_path, monkeypatch) -> None:
    src = _write(tmp_path / "a.jsonl", DOCS)
    out = tmp_path / "out"
    calls = []
    real = shards_mod.atomic_write_json

    def crash(path, obj):  # killed after the .bin, before the index
        calls.append(path)
        raise KeyboardInterrupt

    monkeypatch.setattr(shards_mod, "atomic_write_json", crash)
    with pytest.raises(KeyboardInterrupt):
        build_shard("s", [src], tokenizer, out)
    assert open_shard(out / "s.train.bin") is None  # no index: not a shard, rebuilt next time
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.setattr(shards_mod, "atomic_write_json", real)
    assert build_shard("s", [src], tokenizer, out).index["num_docs"] == 3


@pytest.mark.parametrize("lines, message", [
    (['{"text": "ok"}', '{"body": "no text"}'], "a.jsonl:2: a pretraining record needs a 'text' field"),
    (['{"text": "ok"}', '', '{"text": "   "}'], "a.jsonl:3: field 'text' must be a non-empty string"),
    (['{"text": 5}'], "a.jsonl:1: field 'text' must be a non-empty string"),
    (['{"text": "ok"', ], "a.jsonl:1: not valid JSON"),
])
def test_bad_records_name_file_and_line(tokenizer, tmp_path, lines, message) -> None:
    src = tmp_path / "a.jsonl"
    src.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=message):
        build_shard("s", [src], tokenizer, tmp_path / "out")


def test_bad_sources_are_clear_errors(tokenizer, tmp_path) -> None:
    with pytest.raises(ValueError, match="missing.jsonl: no such file"):
        build_shard("s", [tmp_path / "missing.jsonl"], tokenizer, tmp_path)
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="empty.txt: empty text file"):
        build_shard("s", [tmp_path / "empty.txt"], tokenizer, tmp_path)
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match="must be .jsonl"):
        build_shard("s", [tmp_path / "x.csv"], tokenizer, tmp_path)


def test_held_out_split_by_hash_is_disjoint_and_stable(tokenizer, tmp_path) -> None:
    docs = [f"document number {i} about the union" for i in range(400)]
    src = _write(tmp_path / "a.jsonl", docs)
    train = build_shard("s", [src], tokenizer, tmp_path, "train", held_out=0.1)
    held = build_shard("s", [src], tokenizer, tmp_path, "heldout", held_out=0.1)
    assert train.num_docs + held.num_docs == 400 and 20 <= held.num_docs <= 60
    expected = [t for d in docs if is_held_out(d, 0.1) for t in tokenizer.encode(d, add_special_tokens=False) + [257]]
    assert held.tokens.tolist() == expected
    assert is_held_out(docs[0], 0.1) == is_held_out(docs[0], 0.1) and not is_held_out(docs[0], 0.0)

"""SFT data: validation with line numbers, templates, EOS, prompt masking, packing, batches."""

from __future__ import annotations

import re

import pytest
import torch

from lmforge.training.data import (ALPACA_NO_INPUT, IGNORE_INDEX, Batches, build_rows, collate, pack, read_records,
                                   tokenize)

from .conftest import write_jsonl


@pytest.mark.parametrize("record,field", [
    ({"instruction": "q", "input": ""}, "output"),
    ({"instruction": 3, "output": "a"}, "instruction"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}, "messages[1]"),
    ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}, "messages"),
    ({"text": "hello"}, "messages"),
])
def test_malformed_record_names_line_and_field(tmp_path, record, field) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "ok", "output": "fine"}, record])
    with pytest.raises(ValueError, match="d.jsonl:2: .*" + re.escape(f"'{field}'")):
        read_records(path)


def test_bad_json_names_line(tmp_path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "ok", "output": "fine"}, "{not json"])
    with pytest.raises(ValueError, match="d.jsonl:2: not valid JSON"):
        read_records(path)


def test_alpaca_template_masks_prompt_and_appends_eos(tokenizer) -> None:
    ex = tokenize({"instruction": "Add 1+1", "input": "", "output": "2"}, tokenizer, "alpaca", 512)
    prompt = ALPACA_NO_INPUT.format(instruction="Add 1+1")
    n = len(tokenizer.encode(prompt))
    assert ex.input_ids[-1] == tokenizer.eos_id and ex.labels[-1] == tokenizer.eos_id
    assert ex.labels[:n] == [IGNORE_INDEX] * n
    assert tokenizer.decode(ex.input_ids[n:-1]) == "2" and ex.labels[n:] == ex.input_ids[n:]
    assert tokenizer.decode(ex.input_ids[:n]) == prompt


def test_chat_template_and_chat_records(tokenizer) -> None:
    record = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                           {"role": "assistant", "content": "Hello"}]}
    ex = tokenize(record, tokenizer, "chat", 512)
    answer = [i for i, label in zip(ex.input_ids, ex.labels) if label != IGNORE_INDEX]
    assert tokenizer.decode(answer) == "Hello<|im_end|>"
    assert tokenizer.decode(ex.input_ids).endswith("<|im_start|>assistant\nHello<|im_end|>")
    with pytest.raises(ValueError, match="template=chat"):
        tokenize(record, tokenizer, "alpaca", 512)


def test_packing_keeps_examples_apart(tokenizer, alpaca_file) -> None:
    rows = build_rows(alpaca_file, tokenizer, "alpaca", 600, packing=True)
    assert len(rows) < 10 and sum(len(r) for r in rows) == 10
    assert all(sum(len(e.input_ids) for e in row) <= 600 for row in rows)
    batch = collate(rows[:2], tokenizer.pad_id)
    first = rows[0]
    n0 = len(first[0].input_ids)
    assert batch["positions"][0, n0] == 0 and batch["seq_ids"][0, n0] == 1  # second example restarts
    assert batch["num_tokens"] == sum(len(e.input_ids) for row in rows[:2] for e in row)


def test_batches_are_deterministic_and_resumable(tokenizer, alpaca_file) -> None:
    rows = build_rows(alpaca_file, tokenizer, "alpaca", 256, packing=False)
    a = Batches(rows, 3, tokenizer.pad_id, seed=1)
    seen = [a.next()["input_ids"] for _ in range(5)]  # crosses an epoch (4 batches per epoch)
    b = Batches(rows, 3, tokenizer.pad_id, seed=1)
    for _ in range(2):
        b.next()
    c = Batches(rows, 3, tokenizer.pad_id, seed=1)
    c.load_state(b.state())
    for want in seen[2:]:
        assert torch.equal(c.next()["input_ids"], want)


def test_pack_first_fit() -> None:
    from lmforge.training.data import Example
    exs = [Example([1] * n, [1] * n) for n in (6, 5, 4, 3)]
    assert [[len(e.input_ids) for e in r] for r in pack(exs, 9)] == [[6, 3], [5, 4]]

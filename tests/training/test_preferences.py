"""Preference records: bad input names file:line and field, tokenization masks the prompt and cuts the
responses, pairs collate chosen-first, batches resume by position, and the FAQ pair builder splits by question."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.config import Config
from lmforge.data.python_faq import FAQPair
from lmforge.model.transformer import build_model
from lmforge.training.objectives.dpo import DPOConfig
from lmforge.training.preference_data import PairBuildConfig, build_python_faq_pairs
from lmforge.training.preferences import (PreferenceBatches, PreferencePair, build_pairs, collate_pairs,
                                          read_pairs)

from .conftest import VOCAB, write_jsonl

GOOD = {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"}


@pytest.mark.parametrize("record,message", [
    ({"chosen": "4", "rejected": "5"}, "missing field 'prompt'"),
    ({"prompt": "q", "rejected": "5"}, "missing field 'chosen'"),
    ({"prompt": "q", "chosen": "4", "rejected": None}, "missing field 'rejected'"),
    ({"prompt": "  ", "chosen": "4", "rejected": "5"}, "field 'prompt' must be a non-empty string"),
    ({"prompt": "q", "chosen": "", "rejected": "5"}, "field 'chosen' must be a non-empty string"),
    ({"prompt": "q", "chosen": "4", "rejected": 5}, "field 'rejected' must be a non-empty string"),
    ({"prompt": "q", "chosen": "same", "rejected": "same "}, "field 'rejected' equals 'chosen'"),
    (["q", "4", "5"], "must be a JSON object"),
    ("{not json", "not valid JSON"),
])
def test_bad_records_name_file_line_and_field(tmp_path, record, message) -> None:
    path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD, record])
    with pytest.raises(ValueError, match=message) as err:
        read_pairs(path)
    assert f"{path}:2:" in str(err.value)


def test_missing_and_empty_files(tmp_path) -> None:
    with pytest.raises(ValueError, match="python-faq-pairs"):
        read_pairs(tmp_path / "none.jsonl")
    with pytest.raises(ValueError, match="no preference records"):
        read_pairs(write_jsonl(tmp_path / "empty.jsonl", []))


def test_long_prompt_is_refused_with_its_line(tmp_path, tokenizer) -> None:
    path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD, {**GOOD, "prompt": "x" * 80}])
    with pytest.raises(ValueError, match=r"pairs.jsonl:2: field 'prompt' is \d+ tokens.*max_prompt_length=64"):
        build_pairs(path, tokenizer, "chat", DPOConfig(max_prompt_length=64, max_length=96))


def test_tokenize_renders_chat_prompt_appends_eos_and_cuts_responses(tmp_path, tokenizer) -> None:
    path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD, {"prompt": "Hi", "chosen": "a" * 50, "rejected": "b" * 50}])
    short, long = build_pairs(path, tokenizer, "chat", DPOConfig(max_prompt_length=32, max_length=48))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True)
    assert short.prompt_ids == tokenizer.encode(prompt, add_special_tokens=False)
    assert short.chosen_ids == tokenizer.encode("4") + [tokenizer.eos_id]
    assert short.rejected_ids == tokenizer.encode("5") + [tokenizer.eos_id]
    assert len(long.prompt_ids) + len(long.chosen_ids) == 48 and tokenizer.eos_id not in long.chosen_ids
    same = write_jsonl(tmp_path / "same.jsonl", [{"prompt": "Hi", "chosen": "a" * 50 + "x", "rejected": "a" * 50}])
    with pytest.raises(ValueError, match="same.jsonl:1: fields 'chosen' and 'rejected' are the same"):
        build_pairs(same, tokenizer, "chat", DPOConfig(max_prompt_length=32, max_length=48))


def test_collate_puts_chosen_rows_first_and_masks_prompts() -> None:
    pairs = [PreferencePair([1, 2], [3, 4, 5], [6]), PreferencePair([7], [8], [9, 10])]
    batch = collate_pairs(pairs, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [7, 8, 0, 0, 0], [1, 2, 6, 0, 0], [7, 9, 10, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 3, 4, 5], [-100, 8, -100, -100, -100],
                                        [-100, -100, 6, -100, -100], [-100, 9, 10, -100, -100]]
    assert batch["pairs"] == batch["loss_units"] == 2 and batch["num_tokens"] == 13
    assert batch["valid"].sum() == 13 and "ref_chosen_logps" not in batch
    pairs[0].ref_chosen, pairs[0].ref_rejected, pairs[1].ref_chosen, pairs[1].ref_rejected = -1.0, -2.0, -3.0, -4.0
    batch = collate_pairs(pairs, pad_id=0)
    assert batch["ref_chosen_logps"].tolist() == [-1.0, -3.0] and batch["ref_rejected_logps"].tolist() == [-2.0, -4.0]


def test_batches_resume_at_the_same_position() -> None:
    pairs = [PreferencePair([i], [i + 100], [i + 200]) for i in range(7)]
    a = PreferenceBatches(pairs, 2, pad_id=0, seed=3)
    for _ in range(5):
        a.next()
    b = PreferenceBatches(pairs, 2, pad_id=0, seed=3)
    b.load_state(json.loads(json.dumps(a.state())))
    for _ in range(6):
        assert torch.equal(a.next()["input_ids"], b.next()["input_ids"])
    assert [x["pairs"] for x in a.all()] == [2, 2, 2, 1]


def test_faq_pair_builder_splits_by_question_and_caches_answers(tmp_path, tokenizer) -> None:
    torch.manual_seed(0)
    model = build_model(Config.from_name("tiny-llama", vocab_size=VOCAB, block_size=128)).eval()
    faq = [FAQPair(f"Question {i}?", f"Answer number {i}.", "FAQ", f"faq.html#q{i}") for i in range(6)]
    cfg = PairBuildConfig(max_tokens=4, samples=2, batch_size=4, held_out=0.34)
    train, held = build_python_faq_pairs(model, tokenizer, tmp_path, "tiny", cfg, faq=faq, progress=False)
    train_pairs, eval_pairs = ([json.loads(line) for line in p.read_text().splitlines()] for p in (train, held))
    assert {r["prompt"] for r in train_pairs}.isdisjoint({r["prompt"] for r in eval_pairs})
    assert len({r["prompt"] for r in eval_pairs}) == 2 and len(train_pairs) + len(eval_pairs) <= 12
    for r in train_pairs + eval_pairs:
        assert r["chosen"] == f"Answer number {r['prompt'].split()[1][:-1]}." and r["rejected"] != r["chosen"]
    read_pairs(train)  # what the builder writes is valid preference data
    cache = (tmp_path / "answers-tiny.jsonl").read_text()
    assert len(cache.splitlines()) == 12
    from lmforge.training import preference_data

    def no_generation(*args, **kwargs):
        raise AssertionError("cached answers were generated again")

    original, preference_data.generate = preference_data.generate, no_generation
    try:
        again = build_python_faq_pairs(model, tokenizer, tmp_path, "tiny", cfg, faq=faq, progress=False)
    finally:
        preference_data.generate = original
    assert again[0].read_text() == train.read_text()

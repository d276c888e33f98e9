"""Training fixtures: a byte-level tokenizer with ChatML tokens and a tiny LLaMA-style model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers

from lmforge.chat_template import ChatTemplate
from lmforge.tokenizer import Tokenizer

CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
VOCAB = 260  # 256 bytes + 3 special tokens, rounded up


def byte_tokenizer() -> Tokenizer:
    """Every byte is a token (ids 0..255); <|im_start|>=256, <|im_end|>=257 (EOS), <pad>=258."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    backend = Backend(models.BPE(vocab, [], fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<|im_start|>", "<|im_end|>", "<pad>"])
    return Tokenizer(backend, ChatTemplate(CHATML), bos_id=None, eos_id=257, pad_id=258)


@pytest.fixture
def tokenizer() -> Tokenizer:
    return byte_tokenizer()


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


QA = [("What is 2+2?", "4"), ("Name a colour.", "Blue."), ("Capital of France?", "Paris."),
      ("Opposite of hot?", "Cold."), ("Say hi.", "Hi!"), ("First letter?", "A."),
      ("Is water wet?", "Yes."), ("Count to 3.", "1 2 3"), ("Sky colour?", "Blue."), ("Ice is?", "Cold.")]


@pytest.fixture
def alpaca_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", [{"instruction": q, "input": "", "output": a} for q, a in QA])

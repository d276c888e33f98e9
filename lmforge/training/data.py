"""SFT data: JSONL records -> template -> tokens with a prompt mask -> (packed) rows -> batches.

A record is Alpaca (`instruction`, optional `input`, `output`) or chat (`messages`, the last
one the assistant's). The prompt is the Alpaca template or the model's chat template; the
response gets EOS appended; prompt labels are -100 so the loss covers the response only.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from lmforge.data.io import jsonl_records

IGNORE_INDEX = -100  # torch cross_entropy's ignore_index

# Stanford Alpaca's templates (github.com/tatsu-lab/stanford_alpaca, train.py)
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ROLES = ("system", "user", "assistant")


@dataclass
class Example:
    """One tokenized record: ids and labels of equal length (prompt labels are IGNORE_INDEX)."""

    input_ids: list[int]
    labels: list[int]


def _check_str(record: dict, key: str, where: str, required: bool = True) -> str:
    value = record.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and key != "input" and not value.strip()):
        raise ValueError(f"{where}: field '{key}' must be a non-empty string, got {value!r:.60}")
    return value


def validate_record(record: object, where: str) -> dict:
    """The record normalised to {'messages': [...]} or Alpaca keys; ValueError names line and field."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or len(messages) < 2:
            raise ValueError(f"{where}: field 'messages' must be a list of at least 2 messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise ValueError(f"{where}: field 'messages[{i}]' needs role in {ROLES} and string content")
        if messages[-1]["role"] != "assistant":
            raise ValueError(f"{where}: field 'messages' must end with the assistant's reply (the trained part)")
        return {"messages": messages}
    if "instruction" not in record and "output" not in record:
        raise ValueError(f"{where}: expected Alpaca fields (instruction, input, output) or 'messages'; "
                         f"got keys {sorted(record)}")
    return {"instruction": _check_str(record, "instruction", where),
            "input": _check_str(record, "input", where, required=False),
            "output": _check_str(record, "output", where)}


def read_records(path: str | Path) -> list[dict]:
    """All records of a JSONL file, each validated; errors carry `file:line`."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file {path} not found; build the default set with `lmforge data python-faq`")
    records = [validate_record(obj, where) for where, obj in jsonl_records(path)]
    if not records:
        raise ValueError(f"{path} holds no records")
    return records


def render(record: dict, template: Literal["alpaca", "chat"], tokenizer) -> tuple[str, str]:
    """(prompt text, response text) of a validated record under a template."""
    if "messages" in record:
        messages = record["messages"]
    elif template == "chat":
        user = record["instruction"] + (f"\n\n{record['input']}" if record["input"] else "")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
    else:
        fmt = ALPACA_WITH_INPUT if record["input"] else ALPACA_NO_INPUT
        return fmt.format(**record), record["output"]
    if template == "alpaca":
        raise ValueError("chat records ('messages') need template=chat")
    return tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True), messages[-1]["content"]


def tokenize(record: dict, tokenizer, template: str, max_length: int) -> Example:
    """Prompt + response + EOS, cut to max_length; labels mask the prompt."""
    prompt, response = render(record, template, tokenizer)
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=template == "alpaca")
    if tokenizer.eos_id is None:
        raise ValueError("the tokenizer has no EOS token; SFT appends EOS to every response")
    response_ids = tokenizer.encode(response, add_special_tokens=False) + [tokenizer.eos_id]
    ids = (prompt_ids + response_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_length]
    return Example(ids, labels)


def pack(examples: list[Example], max_length: int) -> list[list[Example]]:
    """Greedy first-fit into rows of at most max_length tokens (order kept within a row)."""
    rows: list[list[Example]] = []
    room: list[int] = []
    for ex in examples:
        n = len(ex.input_ids)
        slot = next((i for i, r in enumerate(room) if r >= n), None)
        if slot is None:
            rows.append([ex])
            room.append(max_length - n)
        else:
            rows[slot].append(ex)
            room[slot] -= n
    return rows


def collate(rows: list[list[Example]], pad_id: int) -> dict:
    """Right-padded (B, T) input_ids, labels, positions (restart per packed example), seq_ids; `valid`
    (False at padding) when a row is padded."""
    width = max(sum(len(e.input_ids) for e in row) for row in rows)
    B = len(rows)
    ids = torch.full((B, width), pad_id, dtype=torch.long)
    labels = torch.full((B, width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.arange(width).repeat(B, 1)
    seq_ids = torch.full((B, width), -1, dtype=torch.long)
    for b, row in enumerate(rows):
        t = 0
        for k, ex in enumerate(row):
            n = len(ex.input_ids)
            ids[b, t:t + n] = torch.tensor(ex.input_ids)
            labels[b, t:t + n] = torch.tensor(ex.labels)
            positions[b, t:t + n] = torch.arange(n)
            seq_ids[b, t:t + n] = k
            t += n
    batch = {"input_ids": ids, "labels": labels, "positions": positions,
             "num_tokens": sum(len(e.input_ids) for row in rows for e in row)}
    if any(len(row) > 1 for row in rows):
        batch["seq_ids"] = seq_ids  # packed: attention stays inside each example
    if bool((seq_ids < 0).any()):
        batch["valid"] = seq_ids >= 0  # padded: MoE balancing statistics skip the padding
    return batch


class Batches:
    """Deterministic micro-batches: rows shuffled per epoch from (seed, epoch); resumable by position.
    `collate` turns picked rows into a batch (preferences.PreferenceBatches swaps in the pair collate)."""

    collate = staticmethod(collate)

    def __init__(self, rows: list[list[Example]], micro_batch: int, pad_id: int, seed: int = 0,
                 shuffle: bool = True) -> None:
        if not rows:
            raise ValueError("no training rows; is the data file empty or max_length too small?")
        self.rows, self.micro_batch, self.pad_id, self.seed, self.shuffle = rows, micro_batch, pad_id, seed, shuffle
        self.epoch, self.index = 0, 0  # position: next micro-batch is `index` of `epoch`

    def __len__(self) -> int:
        return -(-len(self.rows) // self.micro_batch)

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.rows)))
        if self.shuffle:
            random.Random(self.seed * 100_003 + epoch).shuffle(order)
        return order

    def next(self) -> dict[str, torch.Tensor]:
        """The next micro-batch, rolling into the next epoch at the end."""
        if self.index >= len(self):
            self.epoch, self.index = self.epoch + 1, 0
        order = self._order(self.epoch)
        picked = order[self.index * self.micro_batch:(self.index + 1) * self.micro_batch]
        self.index += 1
        return self.collate([self.rows[i] for i in picked], self.pad_id)

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])

    def all(self) -> list[dict[str, torch.Tensor]]:
        """Every micro-batch once in file order (evaluation)."""
        return [self.collate(self.rows[i:i + self.micro_batch], self.pad_id)
                for i in range(0, len(self.rows), self.micro_batch)]


def build_rows(path: str | Path, tokenizer, template: str, max_length: int, packing: bool) -> list[list[Example]]:
    """Read, validate, tokenize and (optionally) pack a JSONL file into rows."""
    if template not in ("alpaca", "chat"):
        raise ValueError(f"template={template!r} must be 'alpaca' or 'chat'")
    examples = [tokenize(r, tokenizer, template, max_length) for r in read_records(path)]
    examples = [e for e in examples if any(label != IGNORE_INDEX for label in e.labels)]
    if packing:
        return pack(examples, max_length)
    return [[e] for e in examples]

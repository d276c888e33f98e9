"""Preference data: JSONL {"prompt", "chosen", "rejected"} records (trl's standard format) -> tokenized
pairs -> micro-batches of 2B rows, the B chosen rows first, then the B rejected ones (one forward, as trl).

The prompt is rendered as a user message through the model's chat template (data.render, as SFT does;
template=alpaca uses Alpaca's prompt); each response gets EOS appended; labels are IGNORE_INDEX on the
prompt. Truncation: a prompt over `max_prompt_length` tokens is refused with a ValueError naming
file:line (cutting it would change the question); a response is cut so that prompt + response fit
`max_length` (its EOS is then lost).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.data.io import jsonl_records
from lmforge.training.data import IGNORE_INDEX, Batches, render
from lmforge.training.objectives.dpo import DPOConfig, reference_logps

FIELDS = ("prompt", "chosen", "rejected")


@dataclass
class PreferencePair:
    """One tokenized record; `ref_*` are the reference's summed response log-probs once precomputed."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    ref_chosen: float | None = None
    ref_rejected: float | None = None


def validate_pair(record: object, where: str) -> dict[str, str]:
    """The record's three fields; ValueError naming `where` (file:line) and the field otherwise."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a preference record must be a JSON object with {list(FIELDS)}, "
                         f"got {type(record).__name__}")
    for key in FIELDS:
        if key not in record or record[key] is None:
            raise ValueError(f"{where}: missing field '{key}'; a record is "
                             '{"prompt": ..., "chosen": ..., "rejected": ...}')
        if not isinstance(record[key], str) or not record[key].strip():
            raise ValueError(f"{where}: field '{key}' must be a non-empty string, got {record[key]!r:.60}")
    if record["chosen"].strip() == record["rejected"].strip():
        raise ValueError(f"{where}: field 'rejected' equals 'chosen'; a pair needs two different responses")
    return {key: record[key] for key in FIELDS}


def read_pairs(path: str | Path) -> list[tuple[str, dict[str, str]]]:
    """(file:line, record) for every record of a JSONL file, each validated."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"preference file {path} not found; build the default set with "
                         "`lmforge data python-faq-pairs`")
    records = [(where, validate_pair(obj, where)) for where, obj in jsonl_records(path)]
    if not records:
        raise ValueError(f"{path} holds no preference records")
    return records


def tokenize_pair(record: dict[str, str], tokenizer, template: str, cfg: DPOConfig, where: str) -> PreferencePair:
    """Prompt ids and the two responses (+ EOS), cut to fit cfg.max_length; a long prompt is refused."""
    prompt, _ = render({"instruction": record["prompt"], "input": "", "output": record["chosen"]}, template,
                       tokenizer)
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=template == "alpaca")
    if len(prompt_ids) > cfg.max_prompt_length:
        raise ValueError(f"{where}: field 'prompt' is {len(prompt_ids)} tokens after the template, over "
                         f"dpo.max_prompt_length={cfg.max_prompt_length}; shorten it or raise dpo.max_prompt_length")
    if tokenizer.eos_id is None:
        raise ValueError("the tokenizer has no EOS token; preference pairs append EOS to every response")
    room = cfg.max_length - len(prompt_ids)
    chosen = (tokenizer.encode(record["chosen"], add_special_tokens=False) + [tokenizer.eos_id])[:room]
    rejected = (tokenizer.encode(record["rejected"], add_special_tokens=False) + [tokenizer.eos_id])[:room]
    if chosen == rejected:
        raise ValueError(f"{where}: fields 'chosen' and 'rejected' are the same in their first {room} tokens "
                         f"(dpo.max_length={cfg.max_length}); raise dpo.max_length or drop the record")
    return PreferencePair(prompt_ids, chosen, rejected)


def build_pairs(path: str | Path, tokenizer, template: str, cfg: DPOConfig) -> list[PreferencePair]:
    """Read, validate and tokenize a preference JSONL file."""
    if template not in ("alpaca", "chat"):
        raise ValueError(f"template={template!r} must be 'alpaca' or 'chat'")
    return [tokenize_pair(record, tokenizer, template, cfg, where) for where, record in read_pairs(path)]


def collate_pairs(pairs: list[PreferencePair], pad_id: int) -> dict:
    """(2B, T) right-padded input_ids, labels (prompt masked), positions; rows 0..B-1 chosen, B..2B-1
    rejected; `pairs` = `loss_units` = B (the loss is a mean over pairs); precomputed reference log-probs
    as `ref_chosen_logps`/`ref_rejected_logps` (B,) when every pair has them."""
    rows = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    width = max(len(prompt) + len(response) for prompt, response in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    valid = torch.zeros((len(rows), width), dtype=torch.bool)
    for r, (prompt, response) in enumerate(rows):
        n = len(prompt) + len(response)
        ids[r, :n] = torch.tensor(prompt + response)
        labels[r, len(prompt):n] = torch.tensor(response)
        valid[r, :n] = True
    batch = {"input_ids": ids, "labels": labels, "positions": torch.arange(width).repeat(len(rows), 1),
             "num_tokens": int(valid.sum()), "pairs": len(pairs), "loss_units": len(pairs)}
    if not bool(valid.all()):
        batch["valid"] = valid  # padded: MoE balancing statistics skip the padding
    if all(p.ref_chosen is not None for p in pairs):
        batch["ref_chosen_logps"] = torch.tensor([p.ref_chosen for p in pairs], dtype=torch.float32)
        batch["ref_rejected_logps"] = torch.tensor([p.ref_rejected for p in pairs], dtype=torch.float32)
    return batch


class PreferenceBatches(Batches):
    """data.Batches over preference pairs: the same next()/state()/load_state()/all(), so the shared
    trainer's resume restores the data position exactly."""

    collate = staticmethod(collate_pairs)


@torch.no_grad()
def precompute_reference(model, pairs: list[PreferencePair], micro_batch: int, pad_id: int, reference=None,
                         amp: torch.dtype | None = None, progress: bool = False) -> None:
    """Fill each pair's reference log-probs once (DPO's pi_ref never changes), so training runs no
    reference forward; `reference` as in objectives.dpo.reference_logps, under the training autocast."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    starts = range(0, len(pairs), micro_batch)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="reference log-probs", unit="batch", dynamic_ncols=True)
    for start in starts:
        chunk = pairs[start:start + micro_batch]
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                 for k, v in collate_pairs([PreferencePair(p.prompt_ids, p.chosen_ids, p.rejected_ids)
                                            for p in chunk], pad_id).items()}
        with torch.autocast(device.type, dtype=amp) if amp is not None else nullcontext():
            logps = reference_logps(model, batch, reference).float().tolist()
        for p, chosen, rejected in zip(chunk, logps[:len(chunk)], logps[len(chunk):]):
            p.ref_chosen, p.ref_rejected = chosen, rejected
    model.train(was_training)

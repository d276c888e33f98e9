"""T5's span-corruption pretraining objective: drop random spans of the input, each replaced by one
sentinel token, and train the decoder to emit the dropped spans after their sentinels.

Raffel et al. 2020, https://arxiv.org/abs/1910.10683, section 3.1.4 ("Unsupervised objectives")
and 3.3.2 (noise density 0.15, mean span length 3, the defaults here); spans are laid out as
t5.data.preprocessors.random_spans_noise_mask does: non-noise first, then alternating noise and
non-noise segments, each segment length a random composition of its total.
`span_corruption_loss` is the `objective(model, batch) -> loss` of the shared loop.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from lmforge.training.data import IGNORE_INDEX

NOISE_DENSITY, MEAN_SPAN = 0.15, 3.0  # Raffel et al. 2020, section 3.3.2


def _segments(total: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` positive lengths summing to `total`, uniformly over the compositions (count <= total)."""
    cuts = torch.randperm(total - 1, generator=generator)[: count - 1] + 1
    edges = torch.cat([torch.tensor([0]), cuts.sort().values, torch.tensor([total])])
    return edges.diff()


def noise_mask(length: int, generator: torch.Generator, density: float = NOISE_DENSITY,
               mean_span: float = MEAN_SPAN) -> torch.Tensor:
    """bool (length,): round(density * length) noise tokens (1 .. length - 1) in about
    noise / mean_span spans, the sequence starting with a non-noise token."""
    if length < 2:
        raise ValueError(f"length={length}: span corruption needs at least 2 tokens (one kept, one dropped)")
    if not 0 < density < 1 or mean_span < 1:
        raise ValueError(f"density={density} must be in (0, 1) and mean_span={mean_span} >= 1")
    n_noise = min(max(round(length * density), 1), length - 1)
    n_spans = max(1, min(round(n_noise / mean_span), n_noise, length - n_noise))
    noise = _segments(n_noise, n_spans, generator)
    keep = _segments(length - n_noise, n_spans, generator)
    flags = torch.stack([torch.zeros(n_spans, dtype=torch.bool), torch.ones(n_spans, dtype=torch.bool)], 1)
    lengths = torch.stack([keep, noise], 1)  # (n_spans, 2): keep then noise
    return flags.flatten().repeat_interleave(lengths.flatten())


def corrupt(tokens: Sequence[int], mask: torch.Tensor, sentinel_ids: Sequence[int],
            eos_id: int) -> tuple[list[int], list[int]]:
    """(inputs, targets): each noise span of `tokens` becomes the next sentinel in the inputs, and the
    targets are each sentinel followed by the span it stands for; both end with eos_id."""
    starts = int((mask & ~torch.cat([torch.tensor([False]), mask[:-1]])).sum())
    if starts > len(sentinel_ids):
        raise ValueError(f"{starts} noise spans but {len(sentinel_ids)} sentinel ids; pass more sentinels "
                         "(T5's tokenizer has 100: <extra_id_0> ... <extra_id_99>)")
    inputs: list[int] = []
    targets: list[int] = []
    span = -1
    for i, (token, noisy) in enumerate(zip(tokens, mask.tolist())):
        if not noisy:
            inputs.append(int(token))
            continue
        if i == 0 or not mask[i - 1]:
            span += 1
            inputs.append(sentinel_ids[span])
            targets.append(sentinel_ids[span])
        targets.append(int(token))
    return inputs + [eos_id], targets + [eos_id]


def collate(pairs: Sequence[tuple[list[int], list[int]]], pad_id: int, decoder_start_id: int) -> dict:
    """A batch of (inputs, targets): input_ids and attention_mask (B, S) right-padded, labels (B, T)
    with IGNORE_INDEX at padding, decoder_input_ids the labels shifted right behind decoder_start_id
    (as transformers' T5 builds them from labels)."""
    S, T = max(len(p[0]) for p in pairs), max(len(p[1]) for p in pairs)
    ids = torch.full((len(pairs), S), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), T), IGNORE_INDEX, dtype=torch.long)
    for row, (inputs, targets) in enumerate(pairs):
        ids[row, : len(inputs)] = torch.tensor(inputs)
        labels[row, : len(targets)] = torch.tensor(targets)
    decoder = torch.cat([torch.full((len(pairs), 1), decoder_start_id), labels[:, :-1]], 1)
    decoder = decoder.masked_fill(decoder == IGNORE_INDEX, pad_id)
    mask = torch.zeros_like(ids)
    for row, (inputs, _) in enumerate(pairs):
        mask[row, : len(inputs)] = 1
    # label_shift 0: labels sit on their own decoder positions (the trainer's count_loss_tokens reads it)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "decoder_input_ids": decoder, "label_shift": 0}


def span_corruption_loss(model, batch: dict) -> torch.Tensor:
    """Cross-entropy of the targets (teacher forcing), mean over the step's target tokens."""
    logits = model(batch["input_ids"], batch["decoder_input_ids"], batch["attention_mask"]).float()
    labels = batch["labels"]
    total = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return total / batch.get("loss_tokens", max(1, int((labels != IGNORE_INDEX).sum())))

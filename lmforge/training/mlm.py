"""Masked-language-model pretraining for encoders (BERT): choose 15% of the real tokens, replace 80%
of those with [MASK], 10% with a random token, leave 10% unchanged, and predict the chosen ones.

Devlin et al. 2019, https://arxiv.org/abs/1810.04805, section 3.1 ("Task #1: Masked LM") and
appendix A.1; the count per sequence is round(15% of its tokens), at least one, as BERT's
create_pretraining_data.py picks it. Masking happens in the data (`MaskedBatches` wraps the shared
`Batches`), seeded by (seed, epoch, micro-batch), so the trainer knows every micro-batch's label
count before the step (it normalises by the step's total) and a resumed run masks exactly as the
killed one would have. `mlm_loss` is the `objective(model, batch) -> loss` of the shared loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmforge.model.encoder import key_mask
from lmforge.training.data import IGNORE_INDEX, Batches

MASK_PROB = 0.15  # share of real tokens chosen for prediction
MASK_SHARE, RANDOM_SHARE = 0.8, 0.1  # of the chosen: -> [MASK], -> a random token; the rest stay


def choose(maskable: torch.Tensor, generator: torch.Generator, prob: float = MASK_PROB) -> torch.Tensor:
    """bool (B, T): round(prob * n) of each row's n maskable tokens (at least 1 when n > 0), uniformly."""
    counts = maskable.sum(1)
    k = torch.where(counts > 0, (counts * prob).round().clamp(min=1), 0)  # (B,)
    noise = torch.rand(maskable.shape, generator=generator).masked_fill(~maskable, 2.0)  # others rank last
    rank = noise.argsort(1).argsort(1)
    return rank < k[:, None]


def mask_tokens(input_ids: torch.Tensor, maskable: torch.Tensor, mask_id: int, vocab_size: int,
                generator: torch.Generator, prob: float = MASK_PROB) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) for masked-LM: chosen tokens get [MASK] (80%), a random id (10%) or stay (10%);
    labels hold the original id at chosen tokens and IGNORE_INDEX elsewhere.

    Args:
        input_ids: (B, T) token ids.
        maskable: bool (B, T), True at real tokens that may be chosen (not padding, [CLS], [SEP]).
    """
    chosen = choose(maskable, generator, prob)
    action = torch.rand(input_ids.shape, generator=generator)
    random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator)
    inputs = torch.where(chosen & (action < MASK_SHARE), mask_id, input_ids)
    inputs = torch.where(chosen & (action >= MASK_SHARE) & (action < MASK_SHARE + RANDOM_SHARE), random_ids, inputs)
    labels = torch.where(chosen, input_ids, IGNORE_INDEX)
    return inputs, labels


class MaskedBatches:
    """The shared `Batches`, each micro-batch masked for MLM with a generator seeded by its place in the
    run; same `next` / `state` / `load_state` / `all` as Batches, so `train` takes it unchanged."""

    def __init__(self, batches: Batches, mask_id: int, vocab_size: int, special_ids: tuple[int, ...] = (),
                 seed: int = 0, prob: float = MASK_PROB) -> None:
        if not 0 <= mask_id < vocab_size:
            raise ValueError(f"mask_id={mask_id} is not a token of the {vocab_size}-token vocabulary")
        if not 0 < prob < 1:
            raise ValueError(f"prob={prob} must be in (0, 1); BERT chooses 0.15 of the tokens")
        self.batches, self.mask_id, self.vocab_size, self.prob = batches, mask_id, vocab_size, prob
        self.special = torch.tensor(sorted(set(special_ids) | {batches.pad_id}), dtype=torch.long)
        self.seed = seed

    def __len__(self) -> int:
        return len(self.batches)

    def _mask(self, batch: dict, *key: int) -> dict:
        """The batch with masked inputs, MLM labels and label_shift 0 (labels sit on their own tokens)."""
        ids = batch["input_ids"]
        real = batch["valid"] if "valid" in batch else torch.ones_like(ids, dtype=torch.bool)
        maskable = real & ~torch.isin(ids, self.special)
        generator = torch.Generator().manual_seed(hash((self.seed, *key)) & 0x7FFF_FFFF_FFFF_FFFF)  # ints hash alike in every run
        inputs, labels = mask_tokens(ids, maskable, self.mask_id, self.vocab_size, generator, self.prob)
        return {**batch, "input_ids": inputs, "labels": labels, "label_shift": 0}

    def next(self) -> dict:
        batch = self.batches.next()
        return self._mask(batch, 0, self.batches.epoch, self.batches.index)  # (epoch, index) after next: unique

    def state(self) -> dict[str, int]:
        return self.batches.state()

    def load_state(self, state: dict[str, int]) -> None:
        self.batches.load_state(state)

    def all(self) -> list[dict]:
        """Every micro-batch once, masked the same way on every call (evaluation)."""
        return [self._mask(batch, 1, i) for i, batch in enumerate(self.batches.all())]


def attention_mask(batch: dict) -> torch.Tensor | None:
    """bool (B, 1, T | 1, T) for the encoder: packed examples see only themselves (padding sees padding,
    so no row is left without a key), padded rows see real tokens; None when neither."""
    if "seq_ids" in batch:
        seq = batch["seq_ids"]  # (B, T), -1 at padding
        return (seq[:, :, None] == seq[:, None, :])[:, None]
    return key_mask(batch.get("valid"))


def mlm_loss(model, batch: dict) -> torch.Tensor:
    """Cross-entropy of the chosen tokens' original ids, mean over the step's chosen tokens."""
    hidden = model.hidden_states(batch["input_ids"], attention_mask(batch), batch.get("token_type_ids"),
                                 batch.get("positions"))
    labels = batch["labels"]
    keep = labels != IGNORE_INDEX
    logits = model.mlm_logits(hidden[keep]).float()  # (chosen, vocab): only the chosen rows meet the head
    total = F.cross_entropy(logits, labels[keep], reduction="sum")
    return total / batch.get("loss_tokens", max(1, int(keep.sum())))

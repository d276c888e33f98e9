"""Speculative decoding in the engine: per-sequence drafts, verified inside the ordinary batched step.

Before a step, each decoding sequence with a draft proposes up to k tokens (`propose`); the scheduler
gives it 1 + k tokens (its last token, then the drafts) and the model runner returns a logits row for
each. `verify` then accepts a prefix of the drafts with the exact rules of
lmforge.generation.speculative (argmax match when greedy, rejection sampling otherwise), so every
emitted token has the target's distribution; the engine keeps the accepted keys/values and frees the
blocks that only held rejected ones (BlockManager.trim).
"""

from __future__ import annotations

from typing import Callable

import torch

from lmforge.generation.drafts import Draft, check_compatible
from lmforge.generation.sampling import token_probabilities
from lmforge.generation.speculative import DraftLength, SpecStats, target_logits, verify_greedy, verify_sampled
from lmforge.serving.sequence import Sequence, Status


class Speculation:
    """The engine's drafts: one per sequence from `make_draft`, and the acceptance counts of all of them."""

    def __init__(self, make_draft: Callable[[], Draft], model, tokenizer) -> None:
        check_compatible(make_draft(), model, tokenizer)  # refuse another vocabulary before any request
        self.make_draft, self.context = make_draft, model.config.block_size
        self.stats = SpecStats()

    def attach(self, seq: Sequence) -> None:
        seq.draft = self.make_draft()
        seq.draft_length = DraftLength(getattr(seq.draft, "k", None))

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence]) -> None:
        """Fill `draft_ids` of every running sequence that decodes next, leaving room for the bonus token."""
        for seq in seqs:
            seq.draft_ids, seq.draft_probs = [], None
            if seq.draft is None or seq.status is not Status.RUNNING or seq.in_prefill:
                continue
            room = min(seq.max_new - len(seq.output_ids), self.context - seq.num_tokens) - 1
            k = min(seq.draft_length.k, room)
            if k > 0:
                proposal = seq.draft.propose(seq.all_ids, k, seq.params, seq.generator)
                seq.draft_ids, seq.draft_probs = list(proposal.tokens[:k]), proposal.probs

    @torch.inference_mode()
    def verify(self, seq: Sequence, logits: torch.Tensor) -> list[int]:
        """The tokens `seq` emits this step (accepted drafts, then a resampled or bonus token), from its
        1 + k logits rows; updates the draft's length and the counts."""
        drafts = seq.draft_ids
        rows = target_logits(logits, seq.all_ids, drafts, seq.params)
        if seq.params.greedy:
            accepted, token = verify_greedy(rows, drafts)
        else:
            q = seq.draft_probs[:len(drafts)] if seq.draft_probs is not None else None
            accepted, token = verify_sampled(token_probabilities(rows, seq.params), drafts, q, seq.generator)
        seq.draft.rollback(seq.num_tokens + accepted)
        seq.draft_length.update(len(drafts), accepted)
        self.stats.drafted += len(drafts)
        self.stats.accepted += accepted
        self.stats.target_forwards += 1
        self.stats.tokens += accepted + 1
        return [*drafts[:accepted], token]

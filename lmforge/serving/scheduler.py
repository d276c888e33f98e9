"""Continuous batching: which sequences run in the next step, and how many tokens each.

Every step, running sequences decode one token each, prefills (chunked when long) fill the
rest of the token budget, and waiting requests join as soon as there are slots and blocks.
When blocks run out, the newest running sequence is preempted: its blocks are freed and it
is recomputed later (vLLM's recompute preemption).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from lmforge.serving.block_manager import BlockManager
from lmforge.serving.sequence import Sequence, Status


@dataclass
class SchedulerConfig:
    """Limits of one engine step."""

    max_num_seqs: int = 64  # sequences running at once
    max_num_batched_tokens: int = 512  # tokens computed per step (prefill chunks + decodes)

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")


@dataclass
class Batch:
    """One step's work: each sequence computes `num_tokens[i]` tokens from its num_computed on."""

    seqs: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write block copies to do first

    def add(self, seq: Sequence, n: int) -> None:
        self.seqs.append(seq)
        self.num_tokens.append(n)

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    """Owns the waiting queue and running list; `schedule()` plans a step, `finish()` retires."""

    def __init__(self, config: SchedulerConfig, blocks: BlockManager) -> None:
        self.config, self.blocks = config, blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Batch:
        batch, budget = Batch(), self.config.max_num_batched_tokens
        for seq in list(self.running):  # oldest first: decodes, then unfinished prefills
            if seq.status is not Status.RUNNING or budget <= 0:
                continue
            if seq.in_prefill:
                n = min(seq.num_tokens - seq.num_computed, budget)
            else:  # a decode: its last token, then any draft tokens it verifies (as many as the budget takes)
                del seq.draft_ids[budget - 1:]
                n = 1 + len(seq.draft_ids)
            if self._reserve(seq, n, batch):
                batch.add(seq, n)
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if not seq.block_table:
                seq.num_computed = seq.num_prefix_hit = self.blocks.match_prefix(seq)
            n = min(seq.num_tokens - seq.num_computed, budget)
            if not self.blocks.ensure(seq, seq.num_computed + n):
                self.blocks.free_seq(seq)  # give back prefix blocks while it waits
                break  # running sequences will free blocks
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.add(seq, n)
            budget -= n
        return batch

    def _reserve(self, seq: Sequence, n: int, batch: Batch) -> bool:
        """Make room for `n` new tokens of a running `seq`, preempting newer ones if needed."""
        while not self.blocks.ensure(seq, seq.num_computed + n):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        copy = self.blocks.writable_last_block(seq)
        if copy:
            batch.copies.append(copy)
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Free `seq`'s blocks and queue it first; it is recomputed from its tokens later."""
        self.running.remove(seq)
        self.blocks.free_seq(seq)
        seq.draft_ids, seq.draft_probs = [], None
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence, reason: str) -> None:
        """Retire `seq` (done or aborted) and return its blocks."""
        seq.status, seq.finish_reason = Status.FINISHED, reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free_seq(seq)

"""A request as the engine sees it: token ids, sampling parameters, cache blocks, timing."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch

from lmforge.generation.sampling import SamplingParams

_ids = itertools.count()


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One generation stream. `num_computed` counts tokens whose keys/values are in the cache.

    When num_computed < num_tokens - 1 the next step is (part of) a prefill; at num_tokens - 1
    it is a decode step. A preempted sequence drops its cache and recomputes from 0.
    """

    prompt_ids: list[int]
    params: SamplingParams
    seq_id: int = field(default_factory=lambda: next(_ids))
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # chained hashes of the full blocks
    num_computed: int = 0
    num_prefix_hit: int = 0  # prompt tokens found in the prefix cache
    finish_reason: str | None = None
    max_new: int = 0  # output tokens allowed (max_new_tokens, clipped to the context)
    text: str = ""  # final text, filled when the sequence finishes
    arrival: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    last_token_at: float | None = None
    generator: torch.Generator | None = None
    eos_ids: frozenset[int] = frozenset()
    children: list["Sequence"] = field(default_factory=list)  # parallel samples forked after the prefill
    draft: Any = None  # speculative decoding: this sequence's Draft (lmforge.generation.drafts), or None
    draft_length: Any = None  # its DraftLength (fixed or adaptive k)
    draft_ids: list[int] = field(default_factory=list)  # tokens proposed for this step, verified by it
    draft_probs: torch.Tensor | None = None  # (len(draft_ids), V) the draft's q rows, None when one-hot
    grammar: Any = None  # constrained decoding: a GrammarState (lmforge.generation.constrained), or None
    adapter: str | None = None  # multi-LoRA serving: the LoRA adapter this request runs with (None: the base)

    def __post_init__(self) -> None:
        if self.params.seed is not None and self.generator is None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def in_prefill(self) -> bool:
        return self.num_computed < self.num_tokens - 1

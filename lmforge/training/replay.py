"""Experience replay (Rolnick et al. 2019, https://arxiv.org/abs/1811.11682): each micro-batch of the new
task carries a fixed fraction of rows drawn from the previous task's data, so its gradient keeps seeing
the old distribution.

`ReplayBatches` has Batches' interface (next, state, load_state, all), so the shared loop resumes it
exactly. Old rows per micro-batch follow a running count: after j batches exactly floor(j * fraction *
micro_batch) old rows were drawn, so fractions that are not a multiple of 1/micro_batch hold on average.
"""

from __future__ import annotations

import math
import random

import torch

from lmforge.training.data import Example, collate


class RowStream:
    """Endless row indices of one data set, shuffled per epoch from (seed, epoch); resumable by position."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch, self.index = n, seed, 0, 0

    def take(self, k: int) -> list[int]:
        out = []
        for _ in range(k):
            if self.index >= self.n:
                self.epoch, self.index = self.epoch + 1, 0
            order = list(range(self.n))
            random.Random(self.seed * 100_003 + self.epoch).shuffle(order)
            out.append(order[self.index])
            self.index += 1
        return out


class ReplayBatches:
    """Micro-batches of `micro_batch` rows, about `fraction` of them replayed from `old_rows`."""

    def __init__(self, new_rows: list[list[Example]], old_rows: list[list[Example]], micro_batch: int, pad_id: int,
                 fraction: float, seed: int = 0) -> None:
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"continual.replay_fraction={fraction} must lie in [0, 1)")
        if not new_rows or (fraction > 0 and not old_rows):
            raise ValueError("replay needs rows of the new task and, with replay_fraction > 0, of the old one; "
                             "check data.train and continual.replay_data")
        self.new_rows, self.old_rows, self.micro_batch, self.pad_id = new_rows, old_rows, micro_batch, pad_id
        self.fraction, self.count = fraction, 0
        self.new = RowStream(len(new_rows), seed)
        self.old = RowStream(max(1, len(old_rows)), seed + 1)

    def __len__(self) -> int:
        return -(-len(self.new_rows) // self.micro_batch)

    def old_count(self, j: int) -> int:
        """Old rows in micro-batch j: the running total's step, floor((j+1) f m) - floor(j f m)."""
        per = self.fraction * self.micro_batch
        return math.floor((j + 1) * per + 1e-9) - math.floor(j * per + 1e-9)

    def next(self) -> dict[str, torch.Tensor]:
        n_old = self.old_count(self.count)
        self.count += 1
        rows = [self.new_rows[i] for i in self.new.take(self.micro_batch - n_old)]
        rows += [self.old_rows[i] for i in self.old.take(n_old)]
        batch = collate(rows, self.pad_id)
        batch["replayed"] = n_old
        return batch

    def state(self) -> dict:
        return {"count": self.count, "new": [self.new.epoch, self.new.index], "old": [self.old.epoch, self.old.index]}

    def load_state(self, state: dict) -> None:
        self.count = int(state["count"])
        (self.new.epoch, self.new.index), (self.old.epoch, self.old.index) = state["new"], state["old"]

    def all(self) -> list[dict[str, torch.Tensor]]:
        """Every new-task row once in file order (evaluation)."""
        return [collate(self.new_rows[i:i + self.micro_batch], self.pad_id)
                for i in range(0, len(self.new_rows), self.micro_batch)]

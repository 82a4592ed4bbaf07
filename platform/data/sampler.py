"""The task-balanced sampler: batches with the same number of samples of every task (the paper's balanced
batches, Sec. 4.1), steps per pass, and collation into tensors."""

from __future__ import annotations

import collections
import logging
import math
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

log = logging.getLogger(__name__)


@dataclass
class BalancedBatcher:
    """Assemble batches with exactly ``per_task`` samples of every task (the paper's task-balanced sampler).

    Rows arrive in whatever order the upstream shuffle produces. Each task keeps a buffer of its recent samples;
    a batch takes ``per_task`` fresh samples per task when there are enough and otherwise tops up by re-drawing
    buffered ones, so rare tasks are oversampled exactly as a class-balanced sampler would, and every fresh sample
    is used. ``max_pending`` bounds the fresh samples held per task, so memory stays bounded on unbalanced data.
    """

    tasks: Sequence[str]
    per_task: int = 2
    max_pending: int = 64
    reservoir: int = 32
    seed: int = 0
    _fresh: dict[str, collections.deque] = field(init=False, repr=False)
    _seen: dict[str, collections.deque] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("BalancedBatcher needs at least one task")
        if self.per_task < 1:
            raise ValueError("per_task must be >= 1")
        self._rng = random.Random(self.seed)
        self._fresh = {t: collections.deque() for t in self.tasks}
        self._seen = {t: collections.deque(maxlen=self.reservoir) for t in self.tasks}
        self.fresh_used = 0
        self.redrawn = 0
        self._held: collections.deque = collections.deque()  # complete batches beyond a pass's fixed count
        self._warned_missing = False
        self._lenient = False  # set by fixed_batches: fill a never-seen task's places instead of raising

    def _ready(self) -> bool:
        # Every task must have been seen at least once; at least one task must have a full set of fresh samples.
        have = [len(self._fresh[t]) + len(self._seen[t]) for t in self.tasks]
        return min(have) > 0 and max(len(self._fresh[t]) for t in self.tasks) >= self.per_task

    def _take(self, task: str) -> list[dict]:
        picked = []
        for _ in range(self.per_task):
            if self._fresh[task]:
                row = self._fresh[task].popleft()
                self._seen[task].append(row)
                self.fresh_used += 1
            else:
                row = self._rng.choice(self._seen[task])
                self.redrawn += 1
            picked.append(row)
        return picked

    def add(self, row: dict) -> Iterator[list[dict]]:
        """Offer one row (a dict with a ``task`` key); yields any batches (lists of rows) that became complete."""
        task = row["task"]
        if task not in self._fresh:
            return  # a task outside the training set (e.g. held out for zero-shot evaluation)
        self._fresh[task].append(row)
        if self._lenient and len(self._fresh[task]) > self.max_pending and not self._ready():
            yield self._fill_batch()  # fixed_batches: a task this worker never saw must not stall the others
            return
        if len(self._fresh[task]) > 8 * self.max_pending:
            missing = [t for t in self.tasks if not self._fresh[t] and not self._seen[t]]
            raise ValueError(
                f"no sample of task(s) {missing} among the first {8 * self.max_pending} samples of {task!r}; "
                "remove them from the training tasks or check that the dataset contains them"
            )
        while self._ready() and (
            min(len(self._fresh[t]) for t in self.tasks) >= self.per_task
            or max(len(self._fresh[t]) for t in self.tasks) >= self.max_pending
        ):
            batch = [r for t in self.tasks for r in self._take(t)]
            self._rng.shuffle(batch)
            yield batch

    def flush(self) -> Iterator[list[dict]]:
        """At the end of a pass: batches until no fresh sample is left (other tasks topped up by re-drawing), so every
        sample of the pass is used once. Needs every task to have been seen at least once."""
        if any(not self._fresh[t] and not self._seen[t] for t in self.tasks):
            for t in self.tasks:
                self._fresh[t].clear()
            return
        while any(self._fresh[t] for t in self.tasks):
            batch = [r for t in self.tasks for r in self._take(t)]
            self._rng.shuffle(batch)
            yield batch

    def batches(self, rows: Iterable[dict]) -> Iterator[list[dict]]:
        """Balanced batches from one pass over a stream of rows (rows of unknown tasks are ignored)."""
        for row in rows:
            yield from self.add(row)
        yield from self.flush()

    def fixed_batches(self, rows: Iterable[dict], num_batches: int) -> Iterator[list[dict]]:
        """Exactly ``num_batches`` balanced batches from one pass over ``rows``, whatever the pass contains.

        Data-parallel workers must take the same number of steps per pass: DDP blocks a worker in its gradient
        all-reduce until every worker arrives, and Ray Data's streaming split starts a new pass only once every worker
        asks for one, so a worker whose part of the data gives fewer batches would wait for the next pass while the
        others wait for its gradients (a hang). Batches are built as rows arrive; batches beyond ``num_batches`` are
        kept for the next pass, and once ``num_batches`` were yielded the rest of the pass is kept as fresh samples
        (at most ``max_pending`` per task; older ones move to the re-draw reservoir). A pass that ends short is topped
        up by re-drawing seen samples; a task this worker has never seen is replaced by samples of the others (logged
        once), so a rare task missing from one worker's part cannot stall the run.
        """
        if num_batches < 1:
            raise ValueError("num_batches must be >= 1")
        self._lenient = True
        produced = 0
        while self._held and produced < num_batches:
            yield self._held.popleft()
            produced += 1
        for row in rows:
            if produced >= num_batches:
                self._stash(row)
                continue
            for batch in self.add(row):
                if produced < num_batches:
                    yield batch
                    produced += 1
                else:
                    self._held.append(batch)
        if produced < num_batches and not any(self._fresh[t] or self._seen[t] for t in self.tasks):
            raise ValueError(
                "this worker received no training sample in a whole pass; the dataset has fewer samples "
                "than workers, or every sample was damaged (see the skipped-sample warnings)"
            )
        while produced < num_batches:
            yield self._fill_batch()
            produced += 1

    def _stash(self, row: dict) -> None:
        task = row["task"]
        if task not in self._fresh:
            return
        fresh = self._fresh[task]
        fresh.append(row)
        if len(fresh) > self.max_pending:
            self._seen[task].append(fresh.popleft())

    def _fill_batch(self) -> list[dict]:
        missing = [t for t in self.tasks if not self._fresh[t] and not self._seen[t]]
        if missing and not self._warned_missing:
            self._warned_missing = True
            log.warning(
                "no sample of task(s) %s reached this worker yet; their places in the batch are filled with "
                "samples of the other tasks",
                missing,
            )
        pool = [r for t in self.tasks for r in self._seen[t]] + [r for t in self.tasks for r in self._fresh[t]]
        batch = []
        for task in self.tasks:
            if task in missing:
                batch.extend(self._rng.choice(pool) for _ in range(self.per_task))
                self.redrawn += self.per_task
            else:
                batch.extend(self._take(task))
        self._rng.shuffle(batch)
        return batch


def batches_per_pass(samples_per_task: dict[str, int], tasks: Sequence[str], per_task: int, workers: int) -> int:
    """Steps per pass that every data-parallel worker takes (:meth:`BalancedBatcher.fixed_batches`): enough batches
    to use each worker's expected share of the most common task once, as the single-process sampler would."""
    largest = max((samples_per_task.get(t, 0) for t in tasks), default=0)
    return max(1, math.ceil(math.ceil(largest / max(1, workers)) / per_task))


def collate(rows: Sequence[dict]) -> dict:
    """Rows with float32 (3, H, W) ``lq``/``gt`` arrays -> a dict of stacked tensors plus per-sample metadata lists."""
    batch = {
        "lq": torch.from_numpy(np.stack([r["lq"] for r in rows])),
        "gt": torch.from_numpy(np.stack([r["gt"] for r in rows])),
    }
    for key in rows[0]:
        if key not in batch:
            batch[key] = [r[key] for r in rows]
    return batch

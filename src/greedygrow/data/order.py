"""The training order: each step's samples as a function of (seed, global position) alone, so
a resumed run, or one on another number of processes, reads the same samples."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from greedygrow.data.split import mix_seed


class StepSampler(Sampler[list[int]]):
    """This rank's indices for each step from `start`: global position p = step·B + j reads
    index perm_e[p mod N], perm_e a permutation seeded by (seed, epoch e = p // N)."""

    def __init__(
        self, n: int, global_batch: int, rank: int, world: int, seed: int, start: int
    ) -> None:
        self.n, self.b, self.seed = n, global_batch, seed
        self.local = global_batch // world
        self.offset = rank * self.local
        self.start = start
        self._perm: tuple[int, torch.Tensor] | None = None

    def _permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 2))
        return torch.randperm(self.n, generator=g)

    def _index(self, p: int) -> int:
        epoch = p // self.n
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, self._permutation(epoch))
        return int(self._perm[1][p % self.n])

    def indices_read(self, stop: int) -> np.ndarray:
        """The distinct indices this rank reads in steps [start, stop), sorted."""
        seen = np.zeros(self.n, dtype=bool)
        first, last = self.start * self.b, stop * self.b  # global positions [first, last)
        for epoch in range(first // self.n, -(-last // self.n)):
            lo, hi = max(first, epoch * self.n), min(last, (epoch + 1) * self.n)
            steps = np.arange(lo // self.b, -(-hi // self.b), dtype=np.int64)
            p = (steps[:, None] * self.b + self.offset + np.arange(self.local)).ravel()
            p = p[(p >= lo) & (p < hi)]
            seen[self._permutation(epoch).numpy()[p - epoch * self.n]] = True
            if seen.all():
                break
        return np.flatnonzero(seen)

    def __iter__(self) -> Iterator[list[int]]:
        for s in itertools.count(self.start):
            base = s * self.b + self.offset
            yield [self._index(base + j) for j in range(self.local)]


class TextRows(Dataset):
    """`dataset`'s items with "text_row": the row of item i's caption in a text table,
    `rows[i]` (an item the table lacks, row −1, is an error, never another caption)."""

    def __init__(self, dataset: Dataset, rows: np.ndarray) -> None:
        self.dataset, self.rows = dataset, rows
        self.collate_fn = getattr(dataset, "collate_fn", None)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any] | None:
        if (row := int(self.rows[i])) < 0:
            raise IndexError(f"item {i} has no row in the text table (built for other steps)")
        item = self.dataset[i]
        return None if item is None else {**item, "text_row": row}


def step_batches(
    dataset: Dataset | IterableDataset,
    global_batch: int,
    rank: int,
    world: int,
    seed: int,
    start: int,
    workers: int = 0,
    pin_memory: bool = False,
) -> Iterator[dict]:
    """Endless batches of this rank's share of each step from `start`: `StepSampler` order
    (a batch that decodes to nothing is passed over), or a stream seeded by the step."""
    kw = {"num_workers": workers, "pin_memory": pin_memory, "persistent_workers": workers > 0}
    if isinstance(dataset, IterableDataset):
        if hasattr(dataset, "set_epoch"):  # webdataset: a fresh stream seeded by the step
            dataset.set_epoch(start)
        return iter(DataLoader(dataset, batch_size=global_batch // world, **kw))
    sampler = StepSampler(len(dataset), global_batch, rank, world, seed, start)
    collate = getattr(dataset, "collate_fn", None)  # drops images that fail to decode
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, **kw)
    return (batch for batch in loader if batch is not None)

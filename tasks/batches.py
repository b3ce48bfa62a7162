"""Training rows in one shuffled order, held in memory or streamed from Parquet a bounded buffer at a time.

Each epoch draws, from (seed, epoch), an order of the row groups (blocks) and then, for each run of
blocks holding at least `shuffle_rows` rows, an order of that run's rows. Rows held in memory and
rows streamed from their files follow that same order, so they give the same batches: whether the
rows fit in memory decides how fast training is, never the model it trains.
"""

from collections.abc import Iterator

import numpy as np
import torch

from featuresum.tasks import storage
from featuresum.tasks.data import NUM_FEATURES, SHARD_ROWS, derive_seed
from featuresum.tasks.settings import TrainConfig

Plan = list[tuple[list[int], torch.Tensor]]
Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]


def epoch_plan(blocks: list[int], shuffle_rows: int, seed: int, epoch: int) -> Plan:
    """The epoch's runs of blocks (indices into `blocks`, the blocks' row counts), each with an order of its rows."""
    generator = torch.Generator().manual_seed(derive_seed(seed, "shuffle", epoch))
    plan, run, rows = [], [], 0
    for block in torch.randperm(len(blocks), generator=generator).tolist():
        run.append(block)
        rows += blocks[block]
        if rows >= shuffle_rows:
            plan.append((run, torch.randperm(rows, generator=generator)))
            run, rows = [], 0
    if run:
        plan.append((run, torch.randperm(rows, generator=generator)))
    return plan


class InMemory:
    """Rows held as tensors, with blocks of SHARD_ROWS rows unless the row groups they were read from are given."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, blocks: list[int] | None = None):
        self.x, self.y = x, y
        self.blocks = blocks or [min(SHARD_ROWS, len(x) - start) for start in range(0, len(x), SHARD_ROWS)]
        self.starts = torch.tensor([0, *self.blocks]).cumsum(0)

    def __len__(self) -> int:
        return len(self.x)

    def batches(self, config: TrainConfig, epoch: int) -> Batches:
        """The epoch's batches, gathered from the rows in memory."""
        runs = []
        for run, order in epoch_plan(self.blocks, config.shuffle_rows, config.seed, epoch):
            runs.append(torch.cat([torch.arange(self.starts[b], self.starts[b + 1]) for b in run])[order])
        index = torch.cat(runs).to(self.x.device) if runs else torch.empty(0, dtype=torch.int64)
        for start in range(0, len(index), config.batch_size):
            rows = index[start : start + config.batch_size]
            yield self.x[rows], self.y[rows]

    def feature_chunks(self) -> Iterator[torch.Tensor]:
        """The features block by block (as streamed rows give them), for figures over every training row."""
        for block in range(len(self.blocks)):
            yield self.x[self.starts[block] : self.starts[block + 1]]


class Streamed:
    """Rows read from the row groups of Parquet files when an epoch needs them; `device` receives each batch."""

    def __init__(self, groups: list[tuple[storage.Location, int, int]], device: torch.device):
        self.parts = [(path, group) for path, group, _ in groups]
        self.blocks = [rows for _, _, rows in groups]
        self.device = device

    def __len__(self) -> int:
        return sum(self.blocks)

    def _read(self, run: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows of these blocks, in this order, as (features (rows, 784), labels)."""
        read = (batch for block in run for batch in self._batches_of(block))
        return storage.rows_of(read, sum(self.blocks[b] for b in run))

    def _batches_of(self, block: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        path, group = self.parts[block]
        return storage.iter_labelled_batches(path, row_groups=[group], reuse=True)

    def batches(self, config: TrainConfig, epoch: int) -> Batches:
        """The epoch's batches: each run of blocks is read, shuffled, and cut into batches (the rest joins the next)."""
        rest_x, rest_y = torch.empty(0, NUM_FEATURES), torch.empty(0, dtype=torch.int64)
        for run, order in epoch_plan(self.blocks, config.shuffle_rows, config.seed, epoch):
            x, y = self._read(run)
            x, y = torch.cat([rest_x, x[order]]), torch.cat([rest_y, y[order]])
            whole = len(x) - len(x) % config.batch_size
            for start in range(0, whole, config.batch_size):
                end = start + config.batch_size
                yield x[start:end].to(self.device), y[start:end].to(self.device)
            rest_x, rest_y = x[whole:], y[whole:]
        if len(rest_x):
            yield rest_x.to(self.device), rest_y.to(self.device)

    def feature_chunks(self) -> Iterator[torch.Tensor]:
        """The features block by block, for figures over every training row."""
        for block in range(len(self.blocks)):
            yield self._read([block])[0]


Rows = InMemory | Streamed


def row_groups(paths: list[storage.Location]) -> list[tuple[storage.Location, int, int]]:
    """(path, row group, rows) of every row group of the files, in order: the blocks of their rows."""
    groups = []
    for path in paths:
        metadata = storage.open_features(path).metadata
        groups += [(path, group, metadata.row_group(group).num_rows) for group in range(metadata.num_row_groups)]
    return groups


def as_rows(data: Rows | tuple[torch.Tensor, torch.Tensor]) -> Rows:
    """Rows as given, or (features, labels) tensors as rows in memory."""
    return InMemory(*data) if isinstance(data, tuple) else data

"""How training holds its rows: all in memory when they fit its budget, else streamed; importable without torch."""

from __future__ import annotations

import mmap
from contextlib import suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING

import psutil

from featuresum.tasks.data import NUM_FEATURES, SHARD_ROWS
from featuresum.tasks.errors import InputError

if TYPE_CHECKING:
    import torch

# Bytes a training row takes in memory: 784 float32 features and an int64 label.
ROW_BYTES = NUM_FEATURES * 4 + 8
# Streaming holds a buffer of rows being filled, its shuffled copy and the block being decoded.
STREAM_COPIES = 3
# Unless a budget is given, the rows may take this share of the memory available when training starts.
AVAILABLE_SHARE = 0.8
MB = 2**20
# Below this a tensor is left to torch's allocator: huge pages pay off on the multi-megabyte blocks of rows.
HUGE_PAGE_BYTES = 64 * MB


@dataclass(frozen=True)
class MemoryPlan:
    """How training holds its rows: all in memory, or streamed; with the bytes that needs and the budget."""

    mode: str
    needed: int
    budget: int

    def describe(self, rows: int, shuffle_rows: int) -> str:
        where = "held in memory"
        if self.mode == "stream":
            where = f"streamed from disk, shuffled in runs of at least {shuffle_rows:,}"
        return f"{rows:,} rows {where} ({self.needed / MB:,.0f} MB of a {self.budget / MB:,.0f} MB budget)"


def memory_plan(
    rows: int,
    holdout_rows: int,
    shuffle_rows: int,
    budget_mb: int | None = None,
    block_rows: int = SHARD_ROWS,
    held: int = 0,
) -> MemoryPlan:
    """In memory when every row fits the budget, streamed when a shuffle buffer does; else an InputError.

    The budget is `budget_mb`, or a share of the memory available now plus `held`, the bytes of rows
    this process already holds for the run; the held-out rows are always in memory. `block_rows` is
    the largest row group (generated files have SHARD_ROWS).
    """
    budget = budget_mb * MB if budget_mb else int((psutil.virtual_memory().available + held) * AVAILABLE_SHARE)
    whole = (rows + holdout_rows) * ROW_BYTES
    if whole <= budget:
        return MemoryPlan("memory", whole, budget)
    streamed = (STREAM_COPIES * (min(rows, shuffle_rows) + block_rows) + holdout_rows) * ROW_BYTES
    if streamed <= budget:
        return MemoryPlan("stream", streamed, budget)
    raise InputError(
        f"training needs {streamed / MB:,.0f} MB even when streaming its rows ({holdout_rows:,} held-out rows in"
        f" memory, shuffle buffers of at least {shuffle_rows:,} rows and a row group of {block_rows:,}), more than"
        f" its {budget / MB:,.0f} MB budget: lower --holdout-samples (or --shuffle-rows, down to one row group),"
        " or raise --train-memory-mb on a machine that has the memory"
    )


def empty_rows(rows: int) -> torch.Tensor:
    """An uninitialised (rows, 784) float32 tensor; on Linux in transparent huge pages where the kernel allows.

    Touching fresh memory page by page is what costs here: filling 5 GB of 4 KiB pages with transposed
    blocks took 9x as long as filling memory already touched, and huge pages take a 512th of the faults.
    """
    import torch

    size = rows * NUM_FEATURES * 4
    if not hasattr(mmap, "MADV_HUGEPAGE") or size < HUGE_PAGE_BYTES:
        return torch.empty(rows, NUM_FEATURES)
    region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with suppress(OSError):  # a kernel built without transparent huge pages refuses the advice
        region.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(region, dtype=torch.float32).view(rows, NUM_FEATURES)

"""Rows that this process just generated, handed to its training instead of read back from Parquet.

Reading 1.6M rows back decodes 5 GB and faults in fresh memory for all of it; the generator has
those rows at hand while it writes them. A flow step asks for a partition's rows (`keeping`), the
generating task collects them as it writes (`collect`, `keep`), and the training task takes them
(`take`). They are known by the file's path and fingerprint: a generated file's fingerprint is the
key of its specification, of which its rows are a pure function, so the rows kept are the file's.
Anything not taken is released when the step ends; a task in another process finds nothing kept
and reads the file, as it always did.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

    from featuresum.tasks.data import Shard

Rows = tuple["torch.Tensor", "torch.Tensor"]

_lock = threading.Lock()
_wanted: Counter[str] = Counter()
_kept: dict[tuple[str, str], Rows] = {}


@contextmanager
def keeping(paths: Iterable[str]) -> Iterator[None]:
    """While in this block, the generating tasks of this process keep the rows they write to `paths`."""
    paths = [str(path) for path in paths]
    with _lock:
        _wanted.update(paths)
    try:
        yield
    finally:
        with _lock:
            _wanted.subtract(paths)
            for path in paths:
                if _wanted[path] <= 0:
                    del _wanted[path]
                    for key in [key for key in _kept if key[0] == path]:
                        del _kept[key]


def wanted(path: str) -> bool:
    """Whether a step of this process asked for the rows written to `path`."""
    with _lock:
        return _wanted[str(path)] > 0


class Collector:
    """Copies generated shards, as they pass on their way to Parquet, into one (rows, 784) tensor of rows."""

    def __init__(self, rows: int):
        from featuresum.tasks import memory

        self.features, self.labels = memory.empty_rows(rows), np.empty(rows, dtype=np.int64)
        self.filled = 0

    def collect(self, shards: Iterator[Shard]) -> Iterator[Shard]:
        """The shards, unchanged, after copying each one's rows."""
        for shard in shards:
            end = self.filled + shard.features.shape[1]
            self.features[self.filled : end].copy_(shard.features.T)
            self.labels[self.filled : end] = shard.label.numpy()
            self.filled = end
            yield shard

    def rows(self) -> Rows:
        import torch

        if self.filled != len(self.labels):
            raise RuntimeError(f"collected {self.filled:,} rows of {len(self.labels):,}")
        return self.features, torch.from_numpy(self.labels)


def keep(path: str, fingerprint: str, rows: Rows) -> None:
    """Keep the rows of the file at `path` with this fingerprint, if a step still wants them."""
    with _lock:
        if _wanted[str(path)] > 0:
            _kept[(str(path), fingerprint)] = rows


def take(files: list[dict[str, Any]]) -> Rows | None:
    """The rows of these files (path and fingerprint, as tasks pass them) when one file's rows are kept, else None.

    Taken rows are no longer kept: whoever took them holds the only reference.
    """
    if len(files) != 1:
        return None
    with _lock:
        return _kept.pop((str(files[0]["path"]), files[0]["fingerprint"]), None)

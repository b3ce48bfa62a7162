"""Synthetic data: standard-normal features, labelled by the bucket their sum falls in."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from typing import TYPE_CHECKING

import numpy as np

# torch is imported where rows are drawn: a cached run reads these constants without loading it.
if TYPE_CHECKING:
    import torch

NUM_FEATURES = 784
# Upper bounds of classes 0..8, exactly as the original script; class 9 is sum >= 30.
CLASS_BOUNDARIES = (-10.0, -5.0, 0.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0)
NUM_CLASSES = len(CLASS_BOUNDARIES) + 1
# The day the synthetic source starts drifting from: `drift` shifts every feature's mean by that much
# per day after it (and before it, the other way), so the seed's distribution is this day's.
REFERENCE_DATE = date(2026, 1, 1)
# Rows are drawn in fixed-size shards, each from its own seed, so a shard can be made
# anywhere (another process, another machine) and the bytes stay the same.
SHARD_ROWS = 32_768


def derive_seed(*parts: object) -> int:
    """A 63-bit seed for one stream of randomness, e.g. derive_seed(seed, "train", shard)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def label_rule(feature_sum: torch.Tensor) -> torch.Tensor:
    """Class of each row sum: the number of boundaries it is greater than or equal to."""
    import torch

    boundaries = torch.tensor(CLASS_BOUNDARIES, dtype=feature_sum.dtype)
    return torch.bucketize(feature_sum, boundaries, right=True)


@dataclass(frozen=True)
class Shard:
    """One block of rows, stored column-major: `features` has shape (NUM_FEATURES, rows)."""

    sample_id: torch.Tensor
    features: torch.Tensor
    feature_sum: torch.Tensor
    label: torch.Tensor


def feature_mean(day: date | None, drift: float) -> float:
    """The mean of every feature on `day`: `drift` per day since REFERENCE_DATE (0 for undated data)."""
    return 0.0 if day is None else drift * (day - REFERENCE_DATE).days


def generate_shard(
    seed: int,
    stream: str,
    index: int,
    rows: int,
    day: date | None = None,
    drift: float = 0.0,
    into: torch.Tensor | None = None,
) -> Shard:
    """Rows index*SHARD_ROWS .. +rows of the dataset named by (seed, stream), or of its partition for `day`.

    `into`, a float32 tensor of at least NUM_FEATURES * rows values, receives the features.
    """
    import torch

    parts = (seed, stream, index) if day is None else (seed, stream, day.isoformat(), index)
    generator = torch.Generator().manual_seed(derive_seed(*parts))
    # Column-major draws let each feature column go to Parquet without a transpose.
    features = None if into is None else into[: NUM_FEATURES * rows].view(NUM_FEATURES, rows)
    features = torch.randn(NUM_FEATURES, rows, generator=generator, out=features)
    if mean := feature_mean(day, drift):
        features += mean
    # numpy reduces down columns in float64 several times faster than torch does here.
    feature_sum = torch.from_numpy(np.add.reduce(features.numpy(), axis=0, dtype=np.float64))
    start = index * SHARD_ROWS
    return Shard(
        sample_id=torch.arange(start, start + rows, dtype=torch.int64),
        features=features,
        feature_sum=feature_sum,
        label=label_rule(feature_sum),
    )


def shard_sizes(rows: int) -> list[int]:
    """Row counts of the shards that make up a dataset of `rows` rows."""
    full, rest = divmod(rows, SHARD_ROWS)
    return [SHARD_ROWS] * full + ([rest] if rest else [])


def generate_dataset(
    seed: int, stream: str, rows: int, day: date | None = None, drift: float = 0.0, reuse: bool = False
) -> Iterator[Shard]:
    """All shards of a dataset (or of its partition for `day`), in order; the same arguments give the same rows.

    With `reuse`, the features are drawn into two tensors in turn: a shard's stay valid while the next is
    drawn (as a writer reading ahead needs) and are overwritten by the one after. A fresh 100 MB tensor
    per shard is fresh memory to fault in every time: writing 1.6M rows took nearly twice as long.
    """
    import torch

    ring = [torch.empty(NUM_FEATURES * SHARD_ROWS) for _ in range(2 if reuse else 0)]
    for index, size in enumerate(shard_sizes(rows)):
        yield generate_shard(seed, stream, index, size, day, drift, ring[index % 2] if reuse else None)

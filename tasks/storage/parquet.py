"""Parquet files of features and predictions: their schemas, streamed writes and checked, streamed reads.

Feature files hold `sample_id` int64, the features `f000`..`f783` as float32 and, optionally,
`label` int64 in 0..9. Prediction files hold `sample_id` int64, `feature_sum` float64,
`predicted_class` int64 and `confidence` float32, one row per scored row in input order.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from featuresum.tasks import s3
from featuresum.tasks.data import NUM_CLASSES, NUM_FEATURES
from featuresum.tasks.errors import InputError
from featuresum.tasks.storage.files import Written, atomic_path, exists, identity, temporary_name
from featuresum.tasks.storage.locations import Location, at, is_remote, sibling

if TYPE_CHECKING:
    import torch

    from featuresum.tasks.data import Shard

FEATURE_COLUMNS = tuple(f"f{i:03d}" for i in range(NUM_FEATURES))
# Columns that, where a feature file or frame has them, hold integers.
INTEGER_COLUMNS = ("sample_id", "label")
DATASET_SCHEMA = pa.schema(
    [("sample_id", pa.int64()), *((name, pa.float32()) for name in FEATURE_COLUMNS), ("label", pa.int64())]
)
PREDICTIONS_SCHEMA = pa.schema(
    [
        ("sample_id", pa.int64()),
        ("feature_sum", pa.float64()),
        ("predicted_class", pa.int64()),
        ("confidence", pa.float32()),
    ]
)
# How much of a file written uncached is synced and dropped from the page cache at a time.
UNCACHED_SYNC_BYTES = 256 * 2**20
# Random floats do not compress and dictionary encoding makes them slower and larger.
PARQUET_OPTIONS = {"compression": "none", "use_dictionary": False, "write_statistics": False}


def write_parquet(path: Location, schema: pa.Schema, batches: Iterable[pa.RecordBatch], cached: bool = True) -> Written:
    """Stream record batches into a Parquet file that appears whole or not at all.

    Locally it is written beside its final name, synced and renamed. On object storage it streams
    to a temporary key beside its final one, which the store then copies in one step: an upload cut
    short leaves at most a temporary object, never a part of a file under the final key.
    Unless `cached`, a local file's pages leave the page cache as they reach the disk (see _uncached).
    """
    if not is_remote(path):
        with atomic_path(path) as tmp:
            rows = _write_batches(tmp, schema, batches if cached else _uncached(tmp, batches))
        return Written(identity(path), rows=rows)
    tmp = sibling(path, temporary_name(path))
    sink = _HashingSink()
    try:
        with s3.arrow_errors(path), s3.filesystem().open_output_stream(s3.path(tmp)) as sink.stream:
            rows = _write_batches(sink, schema, batches)
        etag = s3.copy(tmp, path)
    finally:
        s3.delete(tmp)
    return Written({"bytes": sink.size, "etag": etag}, sink.digest.hexdigest(), rows)


def _write_batches(sink: Any, schema: pa.Schema, batches: Iterable[pa.RecordBatch]) -> int:
    """Write record batches as one Parquet file into `sink` (a path or a writable file); returns the row count."""
    rows = 0
    with pq.ParquetWriter(sink, schema, **PARQUET_OPTIONS) as writer:
        for batch in batches:
            writer.write_batch(batch)
            rows += batch.num_rows
    return rows


def _uncached(path: Path, batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """The batches, with the pages of `path` written so far synced and dropped from the page cache every 256 MB.

    For a file nobody reads soon: 5 GB of generated rows handed straight to training would otherwise
    take 5 GB of page cache, and pages never touched before are what is slow to write: on a 2-core VM a
    5 GB file written through pages dropped and reused took 3-4 s instead of 12-14. Where the system
    cannot drop pages (no posix_fadvise, as on macOS), the batches pass through unchanged.
    """
    if not hasattr(os, "posix_fadvise"):
        yield from batches
        return
    pending = 0
    for batch in batches:
        yield batch
        pending += batch.nbytes
        if pending >= UNCACHED_SYNC_BYTES and path.exists():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
            pending = 0


class _HashingSink:
    """A writable file that hashes what it forwards to an output stream, so an upload needs no second read."""

    def __init__(self) -> None:
        self.stream: Any = None
        self.digest = hashlib.sha256()
        self.size = 0
        self.closed = False

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.stream.write(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def open_input(path: Location) -> Any:
    """A file to read at random (Parquet's footer first): the local path, or the object opened for reading."""
    if not is_remote(path):
        return path
    with s3.arrow_errors(path):
        return s3.filesystem().open_input_file(s3.path(path))


def values(array: pa.Array) -> np.ndarray:
    """A numeric column as a numpy array: a read-only view of its buffer when it has no nulls.

    pyarrow's `to_numpy` goes through its pandas conversion, which imports pandas (about 0.2 s) on
    first use; a cached run reads the predictions' columns without it.
    """
    if array.null_count or not (pa.types.is_integer(array.type) or pa.types.is_floating(array.type)):
        return array.to_numpy(zero_copy_only=False)
    dtype = np.dtype(array.type.to_pandas_dtype())
    if not len(array):
        return np.empty(0, dtype=dtype)
    return np.frombuffer(array.buffers()[1], dtype=dtype, count=len(array), offset=array.offset * dtype.itemsize)


def shard_to_batch(shard: Shard) -> pa.RecordBatch:
    """A generated shard as a record batch of DATASET_SCHEMA, without copying the features."""
    columns = [pa.array(shard.sample_id.numpy())]
    columns += [pa.array(column) for column in shard.features.numpy()]
    columns.append(pa.array(shard.label.numpy()))
    return pa.RecordBatch.from_arrays(columns, schema=DATASET_SCHEMA)


def check_column_types(columns: Iterable[tuple[str, Any, bool, bool]], where: Location | None = None) -> None:
    """InputError for the first column of the wrong type: features hold numbers, `sample_id` and `label` integers.

    Each column comes as (name, its type as shown, whether it holds numbers, whether it holds
    integers), from a Parquet schema or a DataFrame alike; `where` (a file) leads the message.
    """
    prefix = f"{where}: " if where is not None else ""
    for name, kind, number, integer in columns:
        if not number:
            raise InputError(f"{prefix}column {name} has type {kind}, expected a number")
        if name in INTEGER_COLUMNS and not integer:
            raise InputError(f"{prefix}column {name} has type {kind}, expected an integer")


def _check_schema(path: Location, schema: pa.Schema) -> None:
    """InputError unless a feature file has exactly the feature columns, and every checked column its type."""
    names = set(schema.names)
    feature_like = [name for name in names if name[:1] == "f" and name[1:].isdigit()]
    missing = [name for name in FEATURE_COLUMNS if name not in names]
    if missing or len(feature_like) != NUM_FEATURES:
        raise InputError(
            f"{path}: expected {NUM_FEATURES} feature columns f000..f783, found {len(feature_like)}"
            + (f" (missing {missing[0]})" if missing else "")
        )
    present = [name for name in (*FEATURE_COLUMNS, *INTEGER_COLUMNS) if name in names]
    check_column_types((_column_type(name, schema.field(name).type) for name in present), path)


def _column_type(name: str, kind: pa.DataType) -> tuple[str, pa.DataType, bool, bool]:
    return name, kind, pa.types.is_floating(kind) or pa.types.is_integer(kind), pa.types.is_integer(kind)


def open_features(path: Location) -> pq.ParquetFile:
    """Open a feature file and check its schema; raises InputError naming the file and the problem."""
    if not is_remote(path) and Path(path).is_dir():
        raise InputError(f"{path}: is a directory, not a Parquet file")
    if not exists(path):
        raise InputError(f"{path}: no such file")
    try:
        # pre_buffer (on by default) caches every column chunk read, so memory grows with the file.
        parquet = pq.ParquetFile(open_input(path), pre_buffer=False)
    except (pa.ArrowException, OSError) as error:
        raise InputError(f"{path}: not a readable Parquet file ({error})") from None
    _check_schema(path, parquet.schema_arrow)
    return parquet


def iter_feature_batches(
    path: Location, batch_rows: int = 16_384, row_groups: list[int] | None = None, reuse: bool = False
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """Stream (sample_id, features of shape (784, rows) float32, label or None) from a feature file.

    `row_groups` limits the stream to those row groups (a shard). Rows without a `sample_id`
    column are numbered by their position in the file. Raises InputError on non-finite features.
    With `reuse`, the features are stacked into two arrays in turn: a batch's stay valid while the next
    is read (as scoring reads ahead) and are overwritten by the one after, for callers that copy them
    at once. A fresh 50 MB array per batch costs its page faults every time: six times the stack.
    """
    parquet = open_features(path)
    ring = [np.empty(NUM_FEATURES * batch_rows, dtype=np.float32) for _ in range(2 if reuse else 0)]
    names = parquet.schema_arrow.names
    has_label = "label" in names
    columns = [*FEATURE_COLUMNS] + [name for name in ("sample_id", "label") if name in names]
    never_null = [name for name in columns if name != "label"]
    metadata = parquet.metadata
    first = row_groups[0] if row_groups else 0
    start = sum(metadata.row_group(i).num_rows for i in range(first))
    try:
        for index, batch in enumerate(_batches(path, parquet, batch_rows, columns, row_groups)):
            if nulls := [name for name in never_null if batch.column(name).null_count]:
                count = open_features(path).read(columns=nulls[:1]).column(0).null_count  # the whole file's
                raise InputError(f"{path}: column {nulls[0]} has {count} null values; fill or drop those rows")
            into = ring[index % 2] if reuse else np.empty(NUM_FEATURES * batch.num_rows, dtype=np.float32)
            features = into[: NUM_FEATURES * batch.num_rows].reshape(NUM_FEATURES, batch.num_rows)
            np.stack([batch.column(i).to_numpy(zero_copy_only=False) for i in range(NUM_FEATURES)], out=features)
            if not np.isfinite(features).all():
                raise InputError(f"{path}: features contain NaN, infinite or missing values")
            if "sample_id" in names:
                sample_id = batch.column("sample_id").to_numpy(zero_copy_only=False).astype(np.int64)
            else:
                sample_id = np.arange(start, start + batch.num_rows, dtype=np.int64)
            label = batch.column("label").to_numpy(zero_copy_only=False) if has_label else None
            start += batch.num_rows
            yield sample_id, features, label
    except (pa.ArrowException, OSError) as error:
        raise InputError(f"{path}: unreadable Parquet data ({error})") from None


def _batches(
    path: Location, parquet: pq.ParquetFile, batch_rows: int, columns: list[str], row_groups: list[int] | None
) -> Iterator[pa.RecordBatch]:
    """The record batches of some columns and row groups of a Parquet file, with memory bounded by a row group.

    On object storage every column chunk read alone is a request of its own, 784 per row group; so each
    row group is read through a reader of its own that pre-buffers it, in a few large ranged GETs, and
    is dropped with its buffers before the next (one reader for all would keep every buffer it read).
    """
    if not is_remote(path):
        yield from parquet.iter_batches(batch_size=batch_rows, columns=columns, row_groups=row_groups)
        return
    for index in range(parquet.metadata.num_row_groups) if row_groups is None else row_groups:
        one = pq.ParquetFile(open_input(path), metadata=parquet.metadata, pre_buffer=True)
        yield from one.iter_batches(batch_size=batch_rows, columns=columns, row_groups=[index])


def row_group_shards(path: Location, shard_rows: int) -> list[list[int]]:
    """Split a Parquet file's row groups into consecutive shards of at least `shard_rows` rows."""
    metadata = open_features(path).metadata
    shards: list[list[int]] = []
    rows = shard_rows
    for index in range(metadata.num_row_groups):
        if rows >= shard_rows:
            shards.append([])
            rows = 0
        shards[-1].append(index)
        rows += metadata.row_group(index).num_rows
    return shards


def iter_parquet_batches(paths: Iterable[Location]) -> Iterator[pa.RecordBatch]:
    """Stream the record batches of several Parquet files, one after another."""
    for path in paths:
        yield from pq.ParquetFile(open_input(at(path))).iter_batches()


def iter_labelled_batches(
    path: Location, row_groups: list[int] | None = None, reuse: bool = False
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Stream (features of shape (784, rows) float32, labels int64) of a labelled feature file, checked.

    Raises InputError on a missing label or one outside 0..9, as well as on what iter_feature_batches refuses.
    """
    for _, block, label in iter_feature_batches(path, row_groups=row_groups, reuse=reuse):
        if label is None or label.dtype.kind == "f":  # a null label reads as NaN
            raise InputError(f"{path}: a training or held-out file needs a label on every row")
        if label.size and (label.min() < 0 or label.max() >= NUM_CLASSES):
            raise InputError(f"{path}: labels must lie in 0..{NUM_CLASSES - 1}")
        yield block, label.astype(np.int64, copy=False)


def read_dataset(paths: Location | list[Location]) -> tuple[torch.Tensor, torch.Tensor]:
    """Load labelled feature files whole, one after another, as (features (rows, 784) float32, labels int64)."""
    paths = [paths] if isinstance(paths, str | Path) else paths
    rows = sum(open_features(path).metadata.num_rows for path in paths)
    return rows_of((batch for path in paths for batch in iter_labelled_batches(path, reuse=True)), rows)


def rows_of(batches: Iterator[tuple[np.ndarray, np.ndarray]], rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`rows` rows of labelled (features (784, n), labels) batches, as (features (rows, 784), labels int64).

    The next batch is decoded while this one is copied (the copy is mostly faulting in fresh memory),
    so the batches may share buffers that hold while the next is read (reuse=True).
    """
    import torch

    from featuresum.tasks import cpu, memory

    features, labels = memory.empty_rows(rows), np.empty(rows, dtype=np.int64)
    start = 0
    for block, label in cpu.ahead(batches):
        end = start + block.shape[1]
        # torch copies the transposed block in tiles on every core; numpy's strided `= block.T` is 2-3x slower.
        features[start:end].copy_(torch.from_numpy(block).T)
        labels[start:end] = label
        start = end
    return features, torch.from_numpy(labels)

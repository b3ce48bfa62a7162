"""Every file the pipeline touches: paths, atomic writes, fingerprints, manifests and Parquet schemas.

Feature files hold `sample_id` int64, the features `f000`..`f783` as float32 and, optionally,
`label` int64 in 0..9. Prediction files hold `sample_id` int64, `feature_sum` float64,
`predicted_class` int64 and `confidence` float32, one row per scored row in input order.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import random
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import date
from functools import cache
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from featuresum.tasks import s3
from featuresum.tasks.data import NUM_CLASSES, NUM_FEATURES
from featuresum.tasks.errors import DiskFull, InputError

if TYPE_CHECKING:
    import torch

    from featuresum.tasks.data import Shard

# Where a file lives: a local path, or an `s3://bucket/key` URI of an S3-compatible object store.
Location = str | Path
FEATURE_COLUMNS = tuple(f"f{i:03d}" for i in range(NUM_FEATURES))
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
# Random floats do not compress and dictionary encoding makes them slower and larger.
# Temporary files older than this whose writer is gone are leftovers of a killed run.
LEFTOVER_AGE_SECONDS = 3600.0
LEFTOVER_NAME = re.compile(r"\..+\.(?P<pid>\d+)-[0-9a-f]{32}\.tmp")
# How much of an object one ranged GET reads while it is fingerprinted.
REMOTE_READ_BYTES = 64 * 2**20
PARQUET_OPTIONS = {"compression": "none", "use_dictionary": False, "write_statistics": False}


@cache
def code_version() -> str:
    """Hash of the source of every module that shapes an output, so a code change misses the cache."""
    digest = hashlib.sha256()
    for source in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(source.name.encode() + source.read_bytes())
    digest.update(version("torch").encode() + pa.__version__.encode())
    return digest.hexdigest()


def spec_key(spec: dict[str, Any]) -> str:
    """Content key of an output: its full specification plus the code version."""
    text = json.dumps(spec, sort_keys=True, default=str)
    return hashlib.sha256(f"{code_version()}\n{text}".encode()).hexdigest()


def is_remote(location: Location) -> bool:
    """Whether a location is on object storage (an `s3://` URI) rather than a local path."""
    return s3.is_uri(location)


def at(location: Location) -> Location:
    """A location as every function here takes it: a normalised `s3://` URI, or a local Path."""
    return s3.normalize(location) if s3.is_uri(location) else Path(location)


def resolve(location: Location) -> Location:
    """A location that means the same from any working directory: the URI, or the absolute path."""
    return s3.normalize(location) if s3.is_uri(location) else Path(location).resolve()


def join(base: Location, *names: str) -> Location:
    """`names` under the folder (or key prefix) `base`."""
    if is_remote(base):
        return "/".join([s3.normalize(base), *names])
    return Path(base).joinpath(*names)


def parent(location: Location) -> Location:
    """The folder (or key prefix) that holds a location."""
    if is_remote(location):
        bucket, key = s3.split(location)
        return s3.normalize(f"{s3.SCHEME}{bucket}/{key.rpartition('/')[0]}")
    return Path(location).parent


def name_of(location: Location) -> str:
    """The last part of a location: a file's name."""
    return str(location).rstrip("/").rpartition("/")[2] if is_remote(location) else Path(location).name


def sibling(location: Location, name: str) -> Location:
    """The location `name` in the same folder (or key prefix) as `location`."""
    return join(parent(location), name)


def output_path(directory: Location, kind: str, spec: dict[str, Any], suffix: str) -> Location:
    """Content-addressed path: two different specifications never share a file."""
    return join(directory, f"{kind}-{spec_key(spec)[:16]}{suffix}")


def partition_path(directory: Location, stream: str, spec: dict[str, Any], day: date) -> Location:
    """Hive-style partition of a dated dataset: `<directory>/<stream>-<key>/date=YYYY-MM-DD/part-0.parquet`.

    The key covers the specification but not the date, so one folder holds every date of a
    dataset, which pyarrow.dataset and pandas read as one table with a `date` column.
    """
    return join(directory, f"{stream}-{spec_key(spec)[:16]}", f"date={day.isoformat()}", "part-0.parquet")


def partial_checkpoint_path(checkpoint: Location) -> Location:
    """Where training keeps its end-of-epoch checkpoint until it finishes."""
    stem, suffix = os.path.splitext(name_of(checkpoint))
    return sibling(checkpoint, f"{stem}.partial{suffix}")


@dataclass(frozen=True)
class Written:
    """What a write produced: rows (of a Parquet file), the identity of the file written and its content hash."""

    identity: dict[str, Any]
    fingerprint: str | None = None
    rows: int = 0


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary name beside the local `path`; on success it is synced and renamed into place.

    The temporary name carries the writer's pid, so `sweep_leftovers` never removes a live writer's file.
    """
    path = Path(path)
    tmp = path.with_name(_temporary_name(path))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except OSError as error:
        if error.errno == errno.ENOSPC:
            raise DiskFull(f"disk full: no space left in {path.parent}; free space or use another folder") from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


def _temporary_name(location: Location) -> str:
    return f".{name_of(location)}.{os.getpid()}-{uuid.uuid4().hex}.tmp"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_leftovers(directory: Path, max_age_seconds: float = LEFTOVER_AGE_SECONDS) -> list[Path]:
    """Delete temporary files that killed runs left in `directory`; returns what was removed.

    A file is removed only when it is older than `max_age_seconds` and the process that wrote it
    (named in the file name) is gone, so a live run's half-written file is never touched.
    """
    removed = []
    now = time.time()
    for tmp in directory.rglob(".*.tmp"):
        # Only names atomic_path makes (.<name>.<pid>-<uuid hex>.tmp): never another program's files.
        ours = LEFTOVER_NAME.fullmatch(tmp.name)
        try:
            old = now - tmp.stat().st_mtime > max_age_seconds
        except FileNotFoundError:
            continue
        if ours and old and not _pid_alive(int(ours["pid"])):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def lock_path(path: Path) -> Path:
    """The lock file `exclusive` takes for `path`: a dotfile beside it."""
    return path.with_name(f".{path.name}.lock")


@contextmanager
def exclusive(path: Location) -> Iterator[None]:
    """Hold a lock on `path` (a lock file beside it) so only one process produces it at a time.

    Two identical runs (a scheduled one and a manual one, say) then never write the same file or
    its partial checkpoint at once: the second waits, then finds the first's result. Object stores
    have no such lock, and none is taken there: both runs compute, each object appears whole, and a
    manifest vouches only for the object whose ETag it records, so neither run's cache is fooled.
    """
    if is_remote(path):
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path(path).open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def exists(location: Location) -> bool:
    """Whether a file (or object) is there."""
    return s3.head(location) is not None if is_remote(location) else Path(location).is_file()


def read_bytes(location: Location) -> bytes:
    """A small file's content; FileNotFoundError when it is missing."""
    if not is_remote(location):
        return Path(location).read_bytes()
    found = s3.get(location)
    if found is None:
        raise FileNotFoundError(errno.ENOENT, "no such object", location)
    return found[0]


def write_bytes(location: Location, data: bytes) -> Written:
    """Write a small file whole or not at all: renamed into place, or one PUT to the object store."""
    digest = hashlib.sha256(data).hexdigest()
    if is_remote(location):
        return Written({"bytes": len(data), "etag": s3.put(location, data)}, digest)
    with atomic_path(location) as tmp:
        tmp.write_bytes(data)
    return Written(identity(location), digest)


def write_json(path: Location, value: Any) -> None:
    """Write a small JSON document atomically."""
    write_bytes(path, json.dumps(value, indent=2, sort_keys=True).encode())


def update(location: Location, change: Callable[[bytes | None], bytes]) -> None:
    """Read a small file, change it and write it back without losing a concurrent writer's change.

    `change` gets the content (None when there is no file yet) and returns the new content; it may be
    called more than once. Locally writers queue on the file's lock. On object storage the write is
    conditional (`If-Match` the ETag read, `If-None-Match: *` when there was none), and a writer that
    lost the race reads again and redoes its change: nothing to unlock if a run is killed midway.
    """
    if not is_remote(location):
        with exclusive(location):
            try:
                old = read_bytes(location)
            except FileNotFoundError:
                old = None
            write_bytes(location, change(old))
        return
    while True:
        found = s3.get(location)
        new = change(None if found is None else found[0])
        if found is not None and new == found[0]:
            return
        try:
            s3.put(location, new, if_match=found[1] if found else None, if_absent=found is None)
            return
        except s3.Conflict:
            time.sleep(random.uniform(0.01, 0.1))


def remove(location: Location) -> None:
    """Delete a file if it is there."""
    if is_remote(location):
        s3.delete(location)
    else:
        Path(location).unlink(missing_ok=True)


def remove_tree(location: Location, older_than: float | None = None, now: float | None = None) -> None:
    """Delete a folder (or every object under a key prefix) if it is there.

    With `older_than` (seconds), only what was last written longer ago than that before `now` (a
    file time, by default the clock's) goes, and the folder itself only once it is empty: what a
    live run is still writing or about to read stays.
    """
    if is_remote(location):
        s3.delete_prefix(location, older_than)
    elif older_than is None:
        shutil.rmtree(location, ignore_errors=True)
    elif Path(location).is_dir():
        now = time.time() if now is None else now
        for found in Path(location).iterdir():
            with suppress(FileNotFoundError):
                if found.is_file() and now - found.stat().st_mtime > older_than:
                    found.unlink()
        with suppress(OSError):  # not empty: another run's files are there
            Path(location).rmdir()


def fingerprint(path: Location) -> str:
    """SHA-256 digest of a file's content."""
    if is_remote(path):
        digest = hashlib.sha256()
        # Each read is one ranged GET: large ones, so a big object costs few requests.
        with _arrow_errors(path), s3.filesystem().open_input_stream(s3.path(path)) as f:
            while chunk := f.read(REMOTE_READ_BYTES):
                digest.update(chunk)
        return digest.hexdigest()
    with Path(path).open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def manifest_path(path: Location) -> Location:
    """The manifest beside an output: a dotfile, so dataset readers (pyarrow, pandas) skip it."""
    return sibling(path, f".{name_of(path)}.json")


def identity(path: Location) -> dict[str, Any]:
    """What changes whenever a file is rewritten, replaced or touched: size, times and inode (size and ETag).

    An object's ETag changes whenever its bytes do (and may for the same bytes uploaded in other parts).
    """
    if is_remote(path):
        if (found := s3.head(path)) is None:
            raise FileNotFoundError(errno.ENOENT, "no such object", path)
        return found
    stat = Path(path).stat()
    return {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns, "inode": stat.st_ino}


def write_manifest(
    path: Location, key: str, content_key: str | None = None, written: Written | None = None, **metadata: Any
) -> dict[str, Any]:
    """Record a finished output beside it; returns the manifest (path, key, fingerprint, metadata).

    `key` is the cache key of the task run that produced the file: a cached result is reused only
    when the manifest on disk carries the same key. The fingerprint names the content: a content
    hash by default, or the specification key of an output that is a deterministic function of
    its specification (saves re-reading it). `written` is what the write of the file returned: its
    identity then describes the very object this run wrote, even if another has replaced it since.
    """
    manifest = {
        "path": str(path),
        "key": key,
        "fingerprint": content_key or (written and written.fingerprint) or fingerprint(path),
        **(written.identity if written else identity(path)),
        **metadata,
    }
    write_json(manifest_path(path), manifest)
    return manifest


def read_manifest(path: Location, key: str) -> dict[str, Any] | None:
    """The manifest of `path` if the file is still the very file that the run with `key` wrote, else None.

    None when the file or its manifest is missing, when the file was truncated, rewritten or
    replaced since, or when another run (other inputs or settings, same path) wrote it.
    """
    manifest = _current_manifest(path)
    return manifest if manifest is not None and manifest.get("key") == key else None


def manifest_of(path: Location, fingerprint: str | None = None) -> dict[str, Any] | None:
    """The manifest of `path` if the file is unchanged since it was written (and holds content `fingerprint`)."""
    manifest = _current_manifest(path)
    if manifest is None or fingerprint not in (None, manifest.get("fingerprint")):
        return None
    return manifest


def _current_manifest(path: Location) -> dict[str, Any] | None:
    """The manifest beside `path` while the file on disk is still the one it describes, else None."""
    try:
        manifest = json.loads(read_bytes(manifest_path(path)))
        current = identity(path)
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or any(manifest.get(name) != value for name, value in current.items()):
        return None
    return manifest


def is_intact(path: Location, key: str) -> bool:
    """Whether `path` is still the very file that the run with cache key `key` wrote."""
    return read_manifest(path, key) is not None


def write_parquet(path: Location, schema: pa.Schema, batches: Iterable[pa.RecordBatch]) -> Written:
    """Stream record batches into a Parquet file that appears whole or not at all.

    Locally it is written beside its final name, synced and renamed. On object storage it streams
    to a temporary key beside its final one, which the store then copies in one step: an upload cut
    short leaves at most a temporary object, never a part of a file under the final key.
    """
    if not is_remote(path):
        with atomic_path(path) as tmp:
            rows = _write_batches(tmp, schema, batches)
        return Written(identity(path), rows=rows)
    tmp = sibling(path, _temporary_name(path))
    sink = _HashingSink()
    try:
        with _arrow_errors(path), s3.filesystem().open_output_stream(s3.path(tmp)) as sink.stream:
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


@contextmanager
def _arrow_errors(location: Location) -> Iterator[None]:
    """pyarrow's errors of the object store as featuresum's: a missing bucket or refused key is the user's."""
    try:
        yield
    except OSError as error:
        raise (s3.arrow_error(str(location), error) or error) from None


def open_input(path: Location) -> Any:
    """A file to read at random (Parquet's footer first): the local path, or the object opened for reading."""
    if not is_remote(path):
        return path
    with _arrow_errors(path):
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
    schema = parquet.schema_arrow
    names = set(schema.names)
    feature_like = [name for name in names if name[:1] == "f" and name[1:].isdigit()]
    missing = [name for name in FEATURE_COLUMNS if name not in names]
    if missing or len(feature_like) != NUM_FEATURES:
        raise InputError(
            f"{path}: expected {NUM_FEATURES} feature columns f000..f783, found {len(feature_like)}"
            + (f" (missing {missing[0]})" if missing else "")
        )
    for name in (*FEATURE_COLUMNS, "sample_id", "label"):
        if name not in names:
            continue
        kind = schema.field(name).type
        numeric = pa.types.is_floating(kind) or pa.types.is_integer(kind)
        if not numeric:
            raise InputError(f"{path}: column {name} has type {kind}, expected a number")
        if name in ("sample_id", "label") and not pa.types.is_integer(kind):
            raise InputError(f"{path}: column {name} has type {kind}, expected an integer")
    return parquet


def iter_feature_batches(
    path: Location, batch_rows: int = 16_384, row_groups: list[int] | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """Stream (sample_id, features of shape (784, rows) float32, label or None) from a feature file.

    `row_groups` limits the stream to those row groups (a shard). Rows without a `sample_id`
    column are numbered by their position in the file. Raises InputError on non-finite features.
    """
    parquet = open_features(path)
    names = parquet.schema_arrow.names
    has_label = "label" in names
    columns = [*FEATURE_COLUMNS] + [name for name in ("sample_id", "label") if name in names]
    never_null = [name for name in columns if name != "label"]
    metadata = parquet.metadata
    first = row_groups[0] if row_groups else 0
    start = sum(metadata.row_group(i).num_rows for i in range(first))
    try:
        for batch in _batches(path, parquet, batch_rows, columns, row_groups):
            if nulls := [name for name in never_null if batch.column(name).null_count]:
                count = open_features(path).read(columns=nulls[:1]).column(0).null_count  # the whole file's
                raise InputError(f"{path}: column {nulls[0]} has {count} null values; fill or drop those rows")
            features = np.stack([batch.column(i).to_numpy(zero_copy_only=False) for i in range(NUM_FEATURES)]).astype(
                np.float32, copy=False
            )
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


def parts_dir(path: Location) -> Location:
    """Where the shards of the output `path` are written before they are combined into it."""
    return sibling(path, f"{name_of(path)}.parts")


def part_path(path: Location, index: int, spec: dict[str, Any]) -> Location:
    """Shard `index` of the output `path`, named by everything that shapes it (inputs, row groups, code)."""
    return join(parts_dir(path), f"part-{index:05d}-{spec_key(spec)[:16]}.parquet")


def iter_parquet_batches(paths: Iterable[Location]) -> Iterator[pa.RecordBatch]:
    """Stream the record batches of several Parquet files, one after another."""
    for path in paths:
        yield from pq.ParquetFile(open_input(at(path))).iter_batches()


def read_dataset(paths: Location | list[Location]) -> tuple[torch.Tensor, torch.Tensor]:
    """Load labelled feature files whole, one after another, as (features (rows, 784) float32, labels int64)."""
    import torch

    paths = [paths] if isinstance(paths, str | Path) else paths
    rows = sum(open_features(path).metadata.num_rows for path in paths)
    features = torch.empty(rows, NUM_FEATURES, dtype=torch.float32)
    labels = np.empty(rows, dtype=np.int64)
    start = 0
    for path in paths:
        for _, block, label in iter_feature_batches(path):
            if label is None or label.dtype.kind == "f":  # a null label reads as NaN
                raise InputError(f"{path}: a training or held-out file needs a label on every row")
            end = start + block.shape[1]
            # torch copies the transposed block in tiles on every core; numpy's strided `= block.T` is 2-3x slower.
            features[start:end].copy_(torch.from_numpy(block).T)
            labels[start:end] = label
            start = end
        if labels[:start].size and (labels[:start].min() < 0 or labels[:start].max() >= NUM_CLASSES):
            raise InputError(f"{path}: labels must lie in 0..{NUM_CLASSES - 1}")
    return features, torch.from_numpy(labels)

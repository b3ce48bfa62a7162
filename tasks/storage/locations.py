"""Where files live: local paths and `s3://` URIs, and the names of every output the pipeline writes."""

from __future__ import annotations

import os
from datetime import date
from pathlib import Path
from typing import Any

from featuresum.tasks import s3
from featuresum.tasks.storage.keys import spec_key

# Where a file lives: a local path, or an `s3://bucket/key` URI of an S3-compatible object store.
Location = str | Path


def is_remote(location: Location) -> bool:
    """Whether a location is on object storage (an `s3://` URI) rather than a local path."""
    return s3.is_uri(location)


def at(location: Location) -> Location:
    """A location as every storage function takes it: a normalised `s3://` URI, or a local Path."""
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
    """Path named by the output's specification key: two different specifications never share a file."""
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


def parts_dir(path: Location) -> Location:
    """Where the shards of the output `path` are written before they are combined into it."""
    return sibling(path, f"{name_of(path)}.parts")


def part_path(path: Location, index: int, spec: dict[str, Any]) -> Location:
    """Shard `index` of the output `path`, named by everything that shapes it (inputs, row groups, code)."""
    return join(parts_dir(path), f"part-{index:05d}-{spec_key(spec)[:16]}.parquet")

"""Manifests: the record beside each finished output that says which run wrote it and what it holds.

A manifest is a JSON dotfile beside its output (`.<name>.json`) with the output's `path`, the cache
`key` of the task run that wrote it, the file's identity when written (size, times and inode; size and
ETag on object storage), the task's metadata, and a `fingerprint` that identifies the content:

- a generated dataset (a deterministic function of its specification): the specification key of
  the file (keys.spec_key of stream, rows, seed, day, drift and the code version), which stands in
  for its content hash so the file is never read back to be hashed;
- every other output (checkpoints, prediction shards, predictions): the SHA-256 of the file's bytes,
  as files.fingerprint computes it; hashed as it is written where the write returns the hash (a
  checkpoint, any upload to the object store), else read back once.

A manifest vouches for its file only while the file's identity is the one it records.
"""

import json
from typing import Any

from featuresum.tasks.storage.files import Written, fingerprint, identity, read_bytes, write_json
from featuresum.tasks.storage.locations import Location, name_of, sibling


def manifest_path(path: Location) -> Location:
    """The manifest beside an output: a dotfile, so dataset readers (pyarrow, pandas) skip it."""
    return sibling(path, f".{name_of(path)}.json")


def write_manifest(
    path: Location, key: str, specification_key: str | None = None, written: Written | None = None, **metadata: Any
) -> dict[str, Any]:
    """Record a finished output beside it; returns the manifest (path, key, fingerprint, metadata).

    `key` is the cache key of the task run that produced the file: a cached result is reused only
    when the manifest on disk carries the same key. The fingerprint identifies the content: the
    content hash by default, or `specification_key` for an output that is a deterministic function of
    its specification (saves re-reading it). `written` is what the write of the file returned: its
    identity then describes the very object this run wrote, even if another has replaced it since.
    """
    manifest = {
        "path": str(path),
        "key": key,
        "fingerprint": specification_key or (written and written.fingerprint) or fingerprint(path),
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
    """The manifest of `path` if the file is unchanged since it was written (and its fingerprint is `fingerprint`)."""
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

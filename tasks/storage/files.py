"""Whole files, local or on object storage: written atomically, read, changed, removed, identified and hashed.

A local write goes to a temporary name beside its target and is renamed into place; a write to the
object store is one PUT. Temporary files that a killed run left behind are swept by `sweep_leftovers`.
"""

import errno
import hashlib
import json
import os
import random
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blake3 import blake3

from featuresum.tasks import s3
from featuresum.tasks.errors import DiskFull
from featuresum.tasks.storage.locations import Location, is_remote, name_of
from featuresum.tasks.storage.locks import local_lock

# Temporary files older than this whose writer is gone are leftovers of a killed run.
LEFTOVER_AGE_SECONDS = 3600.0
LEFTOVER_NAME = re.compile(r"\..+\.(?P<pid>\d+)-[0-9a-f]{32}\.tmp")
# How much of a file one read takes while it is fingerprinted: on object storage, one ranged GET.
REMOTE_READ_BYTES = 64 * 2**20
LOCAL_READ_BYTES = 4 * 2**20


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
    tmp = path.with_name(temporary_name(path))
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


def temporary_name(location: Location) -> str:
    """A name for a write in progress beside `location`: a dotfile naming the writer's pid (LEFTOVER_NAME)."""
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
        with local_lock(location):
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


def list_files(directory: Location) -> list[tuple[Location, int]]:
    """(location, size in bytes) of every file under a folder (or object under a key prefix), dotfiles too."""
    if is_remote(directory):
        return list(s3.list_prefix(directory))
    found = []
    for path in Path(directory).rglob("*"):
        with suppress(FileNotFoundError):
            if path.is_file() and not path.is_symlink():
                found.append((path, path.stat().st_size))
    return found


def remove_empty_folder(location: Location) -> None:
    """Delete a local folder if it holds nothing (on an object store a prefix without objects is no folder)."""
    if not is_remote(location):
        with suppress(OSError):  # not empty, or gone already
            Path(location).rmdir()


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


def fingerprint(path: Location, digest: str = "sha256") -> str:
    """The digest of a file's content: SHA-256's hex, or with digest="blake3" "blake3:" and BLAKE3's hex.

    BLAKE3 (a cryptographic hash too) reads a large file on every core, about 4x SHA-256's speed here:
    what a user's feature file is identified by (see benchmarks/RESULTS.md, figure 9).
    """
    hasher = blake3(max_threads=blake3.AUTO) if digest == "blake3" else hashlib.sha256()
    if is_remote(path):
        # Each read is one ranged GET: large ones, so a big object costs few requests.
        with s3.arrow_errors(path), s3.filesystem().open_input_stream(s3.path(path)) as f:
            while chunk := f.read(REMOTE_READ_BYTES):
                hasher.update(chunk)
    else:
        # Reads into one buffer that stays in the CPU's cache while it is hashed: 1.5-4x faster than 64 MiB reads.
        with Path(path).open("rb", buffering=0) as f:
            buffer = memoryview(bytearray(LOCAL_READ_BYTES))
            while size := f.readinto(buffer):
                hasher.update(buffer[:size])
    return hasher.hexdigest() if digest == "sha256" else f"{digest}:{hasher.hexdigest()}"

"""Locks on local outputs, so one process at a time produces a file."""

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from featuresum.tasks.storage.locations import Location, is_remote


def lock_path(path: Path) -> Path:
    """The lock file `local_lock` takes for `path`: a dotfile beside it."""
    return path.with_name(f".{path.name}.lock")


@contextmanager
def local_lock(path: Location) -> Iterator[None]:
    """Hold a lock on the local `path` (a lock file beside it) so only one process produces it at a time.

    Two identical runs (a scheduled one and a manual one, say) then never write the same file or
    its partial checkpoint at once: the second waits, then finds the first's result.

    On object storage no lock is taken: stores have no such lock. That is safe because there both
    runs compute, each object appears whole, and a manifest vouches only for the object whose ETag
    it records, so neither run's cache is fooled.
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

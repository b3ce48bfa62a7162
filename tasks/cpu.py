"""CPU threads: work made ahead on a thread of its own, and training's threads as many as the cores that
other processes leave free.

PyTorch's OpenMP threads spin while they wait for each other, so when another process holds a
core, one of them is descheduled and the rest spin for it: training beside one busy process ran at
a quarter of its idle speed with two threads, and faster with one (figure 12 of the benchmarks).
With FEATURESUM_THREADS=auto, the load of other processes is measured from the host's CPU times
(psutil, on Linux and macOS) about once a second while training and the thread count follows it. It
is off by default: the float sums of a training step depend on the thread count, so a model trained
while the load changed differs in its last bits from one trained on an idle machine, and a backfill
would no longer give the versions that running the dates one by one gives.
"""

import os
import resource
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

import psutil

# The environment variable that turns the policy on: FEATURESUM_THREADS=auto.
SETTING = "FEATURESUM_THREADS"
# How often the load of other processes is measured while training.
INTERVAL_SECONDS = 1.0
# Time spent waiting for IO (Linux) is idle time; time spent running guests (Linux) is counted in user and nice.
NOT_BUSY = ("idle", "iowait", "guest", "guest_nice")
T = TypeVar("T")
_END = object()


_loan = {"holders": 0, "threads": 0}
_loan_lock = threading.Lock()


@contextmanager
def one_core_lent(torch: Any) -> Iterator[None]:
    """torch's threads one fewer while the caller's own thread works beside them, then as many as before.

    set_num_threads is process-wide: concurrent holders share one loan, and the last to leave gives it back.
    """
    with _loan_lock:
        if _loan["holders"] == 0:
            _loan["threads"] = torch.get_num_threads()
            torch.set_num_threads(max(1, _loan["threads"] - 1))
        _loan["holders"] += 1
    try:
        yield
    finally:
        with _loan_lock:
            _loan["holders"] -= 1
            if _loan["holders"] == 0:
                torch.set_num_threads(_loan["threads"])


def ahead(items: Iterator[T]) -> Iterator[T]:
    """The items of `items`, each next one made on a thread of its own while the caller works on the last.

    For work that releases the GIL (torch, numpy, pyarrow): making a batch then overlaps using one.
    """
    with ThreadPoolExecutor(1, thread_name_prefix="ahead") as worker:
        upcoming = worker.submit(next, items, _END)
        while (item := upcoming.result()) is not _END:
            upcoming = worker.submit(next, items, _END)
            yield item


def _host_busy_seconds() -> float:
    """CPU seconds every process on the host has used (all but idle and, where counted, iowait)."""
    times = psutil.cpu_times()._asdict()
    return sum(seconds for field, seconds in times.items() if field not in NOT_BUSY)


def _own_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def usable_cores() -> int:
    """Cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def threads_for(others: float, cores: int, limit: int) -> int:
    """Threads that fit beside other processes keeping `others` cores busy: at most `limit`, at least 1.

    A core counts as taken when other processes keep it busy more than half the time.
    """
    return max(1, min(limit, cores - round(others)))


class OthersLoad:
    """How many cores other processes kept busy since the last reading (None where it cannot be told).

    The clock and the two CPU-time counters are parameters, so the arithmetic can be checked on given figures.
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        host_busy: Callable[[], float | None] = _host_busy_seconds,
        own: Callable[[], float] = _own_seconds,
    ):
        self._readings = lambda: (clock(), host_busy(), own())
        self._last = self._readings()

    def read(self) -> float | None:
        now = self._readings()
        (then, busy, own), self._last = self._last, now
        if busy is None or now[1] is None or now[0] <= then:
            return None
        return max(0.0, (now[1] - busy) - (now[2] - own)) / (now[0] - then)


class ThreadPolicy:
    """Sets torch's thread count to what the other processes leave free, at most once per interval."""

    def __init__(
        self,
        set_threads: Callable[[int], None],
        limit: int,
        interval: float = INTERVAL_SECONDS,
        load: OthersLoad | None = None,
    ):
        self._set_threads = set_threads
        self.limit = limit
        self.threads = limit
        self._interval = interval
        self._load = load or OthersLoad()
        self._due = time.monotonic() + interval
        self.changes: list[tuple[int, float]] = []

    @classmethod
    def for_torch(cls) -> "ThreadPolicy | None":
        """The policy for this process's torch with FEATURESUM_THREADS=auto and no OMP_NUM_THREADS, else None."""
        if os.environ.get(SETTING) != "auto" or os.environ.get("OMP_NUM_THREADS"):
            return None
        import torch

        return cls(torch.set_num_threads, torch.get_num_threads())

    def adjust(self) -> int:
        """Measure the other processes' load now and set the thread count to fit beside it."""
        others = self._load.read()
        self._due = time.monotonic() + self._interval
        if others is None:
            return self.threads
        wanted = threads_for(others, usable_cores(), self.limit)
        if wanted != self.threads:
            self._set_threads(wanted)
            self.threads = wanted
            self.changes.append((wanted, others))
        return self.threads

    def maybe_adjust(self) -> None:
        """adjust(), when an interval has passed since the last time (cheap enough to call every step)."""
        if time.monotonic() >= self._due:
            self.adjust()

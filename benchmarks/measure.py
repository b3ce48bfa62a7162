"""Timing, spreads, host load and the machine description shared by the benchmarks."""

import os
import platform
import resource
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Spread:
    """Repeated measurements of one quantity, reported as min / median / max."""

    values: tuple[float, ...]

    @classmethod
    def of(cls, values: list[float]) -> "Spread":
        """A spread of at least one value."""
        if not values:
            raise ValueError("a spread needs at least one measurement")
        return cls(tuple(values))

    @property
    def min(self) -> float:
        return min(self.values)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def max(self) -> float:
        return max(self.values)

    def format(self, spec: str = ".3g") -> str:
        """`min / median / max`, or the single value when there was one repetition."""
        if len(self.values) == 1:
            return format(self.values[0], spec)
        return f"{self.min:{spec}} / **{self.median:{spec}}** / {self.max:{spec}}"


def ratios(numerators: list[float], denominators: list[float]) -> Spread:
    """Per-repetition ratios of paired measurements (pairs share the repetition, so drift cancels)."""
    return Spread.of([a / b for a, b in zip(numerators, denominators, strict=True)])


def best_ratio(numerators: list[float], denominators: list[float]) -> float:
    """Ratio of the fastest repetitions: load from other processes only ever slows a run down."""
    return min(numerators) / min(denominators)


def interleave(reps: int, variants: dict[str, Callable[[], float]]) -> dict[str, list[float]]:
    """Run every variant once per repetition, rotating the order so drift and warm-up hit all alike.

    Each variant times itself (so its untimed set-up stays out) and returns seconds.
    """
    names = list(variants)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            seconds[name].append(variants[name]())
    return seconds


def timed(action: Callable[[], object]) -> float:
    """Seconds one call takes."""
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def settle_disk() -> None:
    """Flush dirty pages left by an earlier repetition, so no repetition pays for another's writes."""
    os.sync()


def _busy_jiffies() -> int:
    # First line of /proc/stat: cpu user nice system idle iowait irq softirq steal guest guest_nice.
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return user + nice + system + irq + softirq + steal


def _own_cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class HostLoad:
    """Context manager: how many CPU cores other processes kept busy while the block ran.

    This process and the children it waited for are excluded; a daemon it started (the local
    Prefect server) is not, so it counts as foreign load.
    """

    def __enter__(self) -> "HostLoad":
        self._start = (time.perf_counter(), _busy_jiffies(), _own_cpu_seconds())
        self.wall = 0.0
        self.foreign_cores = 0.0
        return self

    def __exit__(self, *exc_info: object) -> None:
        wall0, busy0, own0 = self._start
        self.wall = time.perf_counter() - wall0
        busy = (_busy_jiffies() - busy0) / os.sysconf("SC_CLK_TCK")
        own = _own_cpu_seconds() - own0
        self.foreign_cores = max(0.0, busy - own) / self.wall if self.wall > 0 else 0.0


def vm_hwm_mib(pid: int | str = "self") -> float | None:
    """Peak resident set size (VmHWM) of a process so far, in MiB; None once it has exited."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return None  # an exited process not yet reaped has no memory left to report


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (VmHWM), in MiB."""
    peak = vm_hwm_mib()
    if peak is None:
        raise RuntimeError("no VmHWM in /proc/self/status")
    return peak


def run_watching_rss(
    command: list[str], timeout: float, poll_seconds: float = 0.05, **options: object
) -> tuple[subprocess.CompletedProcess, float]:
    """`subprocess.run(command, capture_output=True, text=True)`, plus the command's peak RSS in MiB.

    The child's VmHWM is read from /proc while it runs: it only grows, so the last read before the
    child exits stands (a rise in its last `poll_seconds` can be missed). `ru_maxrss` would not do:
    Linux carries it across fork and exec, so a child starts with its parent's.
    """
    peak = 0.0
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **options) as child:
        done = threading.Event()

        def watch() -> None:
            nonlocal peak
            # Once the child is reaped (returncode set) its pid may name another process.
            while not done.wait(poll_seconds) and child.returncode is None:
                peak = max(peak, vm_hwm_mib(child.pid) or 0.0)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            stdout, stderr = child.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            child.communicate()
            raise
        finally:
            done.set()
            watcher.join()
    return subprocess.CompletedProcess(command, child.returncode, stdout, stderr), peak


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _meminfo_bytes(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/meminfo")


def memory_available_bytes() -> int:
    """Memory the kernel could give a new process without swapping (MemAvailable)."""
    return _meminfo_bytes("MemAvailable")


def _git(*args: str) -> str:
    result = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False)
    return result.stdout.strip()


def source_state() -> str:
    """Commit of the checkout, and the pipeline files that differ from it (others may be editing)."""
    changed = [line[3:] for line in _git("status", "--porcelain", "--", "flows", "tasks").splitlines()]
    commit = _git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + (f" plus uncommitted changes to {', '.join(changed)}" if changed else "")


def machine() -> dict[str, str]:
    """The machine and software the figures were measured on."""
    import numpy
    import prefect
    import pyarrow
    import torch

    return {
        "CPU": cpu_model(),
        "cores": f"{os.cpu_count()} logical, {len(os.sched_getaffinity(0))} usable",
        "torch threads": str(torch.get_num_threads()),
        "RAM": f"{_meminfo_bytes('MemTotal') / 2**30:.1f} GiB",
        "OS": f"{platform.system()} {platform.release()}",
        "Python": platform.python_version(),
        "torch": torch.__version__,
        "pyarrow": pyarrow.__version__,
        "prefect": prefect.__version__,
        "numpy": numpy.__version__,
        "GPU": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "load average at start": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
    }

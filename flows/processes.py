"""The processes of the local server, as psutil sees them: identity, process groups and listening ports.

psutil answers the same on Linux and macOS; process groups and their signals are POSIX.
"""

import os
import signal
import time
from contextlib import suppress

import psutil

from featuresum.tasks.errors import EnvironmentFailure

# How long processes that ignored SIGTERM and got SIGKILL may take to disappear.
KILL_WAIT = 10.0


_GONE = (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)


def process_start_time(pid: int) -> float | None:
    """When the process `pid` started, in seconds since the epoch; None if it is gone or a zombie."""
    try:
        process = psutil.Process(pid)
        return None if process.status() in _GONE else process.create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):  # gone (zombies included), or not ours to look at
        return None


def process_group_members(pgid: int) -> list[int]:
    """The processes of process group `pgid` that are still running (zombies excluded)."""
    members = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == pgid and process.status() not in _GONE:
                members.append(process.pid)
        except (ProcessLookupError, PermissionError, psutil.NoSuchProcess):  # gone while we looked
            continue
        except psutil.AccessDenied:  # in the group, state unknown: count it until it is gone
            members.append(process.pid)
    return members


def stop_process_group(pgid: int, timeout: float = 30.0) -> None:
    """SIGTERM process group `pgid`, SIGKILL it after `timeout` seconds, and return once it is gone."""

    def gone_within(seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while process_group_members(pgid):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    with suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
        # A stopped process (SIGSTOP, ^Z) acts on SIGTERM only once continued.
        os.killpg(pgid, signal.SIGCONT)
    if not gone_within(timeout):
        with suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        if not gone_within(KILL_WAIT):
            raise EnvironmentFailure(f"process group {pgid} is still running {KILL_WAIT:g}s after SIGKILL")
    # Collect the leader's exit status if we started it, so no zombie of it lingers in this process.
    with suppress(ChildProcessError):
        os.waitpid(pgid, os.WNOHANG)


def holds_listening_port(pid: int, port: int) -> bool:
    """Whether process `pid` owns a TCP socket listening on `port`."""
    try:
        # Per process, which needs no privileges on macOS, unlike psutil.net_connections() for the whole system.
        connections = psutil.Process(pid).net_connections(kind="inet")
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port for c in connections)

"""The local server's log: its output copied, line by line, into a size-capped rotating file.

The server leads a process group of its own, together with the copier, so stopping the group
ends both; the copier outlives the server's last words.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import BinaryIO

# The server logs warnings and errors only (one start-up banner, then a few lines per problem), so 5 MiB
# holds weeks of a healthy server and the whole story of a failing one, while the log plus two backups
# never take more than 15 MiB of PREFECT_HOME however long the server runs.
LOG_MAX_BYTES = 5 * 1024 * 1024
LOG_BACKUPS = 2
# A line without a newline (a binary dump, a runaway progress bar) is cut into pieces of this size.
LOG_LINE_LIMIT = 64 * 1024
# Run in the new process group's leader: start the log copier, then become the server.
_LAUNCH = (
    "import sys; from featuresum.flows.server_log import exec_with_log_copier; exec_with_log_copier(*sys.argv[1:])"
)
_COPY = "import sys; from featuresum.flows.server_log import run_log_copier; run_log_copier(sys.argv[1])"


def _rotate(path: Path, backups: int) -> None:
    """Shift `path` to `path`.1, .1 to .2 and so on, dropping the oldest beyond `backups`."""
    if backups < 1:
        path.unlink(missing_ok=True)
        return
    for index in range(backups - 1, 0, -1):
        older = path.with_name(f"{path.name}.{index}")
        if older.exists():
            os.replace(older, path.with_name(f"{path.name}.{index + 1}"))
    os.replace(path, path.with_name(f"{path.name}.1"))


def copy_to_rotating_log(
    stream: BinaryIO, path: Path, max_bytes: int = LOG_MAX_BYTES, backups: int = LOG_BACKUPS
) -> None:
    """Append `stream` to `path` line by line until it ends, starting a new file before one would pass `max_bytes`."""
    out = path.open("ab")
    size = out.tell()
    try:
        while line := stream.readline(LOG_LINE_LIMIT):
            if size and size + len(line) > max_bytes:
                out.close()
                _rotate(path, backups)
                out = path.open("ab")
                size = 0
            out.write(line)
            # Line by line, so the log is readable while the server runs and complete when it dies.
            out.flush()
            size += len(line)
    finally:
        out.close()


def run_log_copier(log: str) -> None:
    """Copy standard input into the rotating log `log` until the writer closes it."""
    # SIGTERM goes to the whole group; the copier stays to record the server's last words and leaves at
    # end of input, which comes when the server has exited.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    copy_to_rotating_log(sys.stdin.buffer, Path(log))


def exec_with_log_copier(log: str, *command: str) -> None:
    """Start the log copier as a child, then replace this process by `command` writing into it."""
    read_end, write_end = os.pipe()
    # The child stays in this process group; its own errors go to our stderr, which is the log file.
    subprocess.Popen([sys.executable, "-c", _COPY, log], stdin=read_end, stdout=subprocess.DEVNULL)
    os.close(read_end)
    os.dup2(write_end, 1)
    os.dup2(write_end, 2)
    os.close(write_end)
    os.execv(command[0], list(command))


def spawn_logged(command: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    """Start `command` leading a new process group, its output copied into the rotating log `log`."""
    with log.open("ab") as early:  # for anything said before the copier runs
        return subprocess.Popen(
            [sys.executable, "-c", _LAUNCH, str(log), *command],
            stdin=subprocess.DEVNULL,
            stdout=early,
            stderr=early,
            env=env,
            start_new_session=True,
        )

"""Where flow runs are recorded: the configured Prefect API, or a local server the CLI starts and reuses.

Prefect's ephemeral mode (no PREFECT_API_URL) runs a temporary API inside the process and loses
task runs that are still in flight as events when the process exits. Instead, with no API
configured, the CLI starts `prefect server start` on 127.0.0.1 with its SQLite database under
PREFECT_HOME, leaves it running for later commands and for the UI, and before exiting waits until
every task run of its flow run is recorded in a final state.

One PREFECT_HOME has at most one such server. Its record ($PREFECT_HOME/featuresum-server.json)
names the process by pid and start time, so a reused pid or another program on the recorded port
is not taken for it. A record without a matching start time (written by an earlier version, or
before a step of the wall clock, which start times follow) counts only while that pid listens on the
recorded port. The server leads a process group of its own, together with the process that copies
its output into a size-capped rotating log; stopping it ends that whole group.

Prefect's own `prefect server start --background` does not cover this: it returns before the server
answers, gives up when the port is taken, sends the server's output to a pipe that nobody reads, and
records a bare pid that `prefect server stop` signals without checking it or waiting. Processes are
looked at through psutil and locks are fcntl locks, so this works on Linux and macOS (POSIX), not Windows.
"""

import fcntl
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from http.client import HTTPException
from importlib.metadata import version
from pathlib import Path

from featuresum.flows.processes import holds_listening_port, process_start_time, stop_process_group
from featuresum.flows.server_log import spawn_logged

DEFAULT_PORT = 4200
SERVER_STATE = "featuresum-server.json"
SERVER_LOG = "featuresum-server.log"
SERVER_LOCK = "featuresum-server.lock"
# What the local server's vacuum deletes when it is old: flow runs and events.
VACUUM = "events,flow_runs"
# Another program may take the port between our probe and the server's bind; then we try another port.
START_ATTEMPTS = 3
# The local server answers its health check in milliseconds; one that takes longer is starting or busy.
HEALTH_TIMEOUT = 2.0


class ServerError(RuntimeError):
    """The local Prefect server could not be started, reached or stopped; the message is one line."""


def quiet_defaults() -> None:
    """Keep Prefect off the network (SDK and server telemetry) unless the user chose otherwise."""
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def prefect_home() -> Path:
    """PREFECT_HOME as Prefect resolves it (environment, profile or ~/.prefect)."""
    from prefect.settings import get_current_settings

    return Path(get_current_settings().home).expanduser()


def configured_api_url() -> str | None:
    """The API URL set by the user (environment or profile), if any."""
    from prefect.settings import get_current_settings

    return get_current_settings().api.url or None


def api_health(api_url: str, timeout: float = 5.0) -> str:
    """How a Prefect API answers its health check (which needs no credentials): "ok", "refused" or "silent".

    "refused": nothing listens there. "silent": no answer within `timeout` seconds, or not a healthy one.
    """
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=timeout) as response:
            return "ok" if response.status == 200 else "silent"
    except urllib.error.URLError as error:
        return "refused" if isinstance(error.reason, ConnectionRefusedError) else "silent"
    except (OSError, HTTPException):  # timed out, reset, or not HTTP at all
        return "silent"


# The local server.


def _read_state(home: Path) -> dict:
    try:
        state = json.loads((home / SERVER_STATE).read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _write_state(home: Path, state: dict) -> None:
    partial = home / f"{SERVER_STATE}.partial"
    partial.write_text(json.dumps(state, indent=2))
    os.replace(partial, home / SERVER_STATE)


@contextmanager
def _server_lock(home: Path) -> Iterator[None]:
    """Serialize starting and stopping the server of `home` across processes."""
    home.mkdir(parents=True, exist_ok=True)
    with (home / SERVER_LOCK).open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _port_of(api_url: str) -> int:
    return int(api_url.rsplit(":", 1)[1].split("/", 1)[0])


def _recorded_server(home: Path) -> dict | None:
    """The recorded server's state when its process still runs: same pid, and same start time or recorded port.

    An earlier version recorded no start time, or one in clock ticks; and a step of the wall clock moves
    the start time psutil reports. Then the process is ours only if it listens on the recorded port.
    """
    state = _read_state(home)
    pid, url = state.get("pid"), state.get("api_url")
    if not isinstance(pid, int) or not isinstance(url, str):
        return None
    started = process_start_time(pid)
    if started is None:
        return None
    if state.get("start_time") == started or holds_listening_port(pid, _port_of(url)):
        return {**state, "start_time": started}
    return None


def _is_running(state: dict) -> bool:
    started = process_start_time(state["pid"])
    return started is not None and started == state["start_time"]


def _is_serving(state: dict) -> bool:
    """Whether the recorded process itself listens on its URL and answers the health check there."""
    if not holds_listening_port(state["pid"], _port_of(state["api_url"])):
        return False
    return api_health(state["api_url"], timeout=HEALTH_TIMEOUT) == "ok"


def _wait_until_serving(state: dict, timeout: float) -> bool:
    """Wait for the recorded server to answer; False when its process ends or `timeout` passes first."""
    deadline = time.monotonic() + timeout
    while _is_running(state):
        if _is_serving(state):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return False


def _port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        # As the server binds: connections of an earlier server in TIME_WAIT do not count, a listener does.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port(default: bool = True) -> int:
    """The default port when it is free (and wanted), else one the system picks."""
    if default and _port_is_free(DEFAULT_PORT):
        return DEFAULT_PORT
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _database(env: dict[str, str], home: Path) -> str:
    """The server's database as it will use it: the configured URL (password hidden) or the SQLite file."""
    url = env.get("PREFECT_SERVER_DATABASE_CONNECTION_URL")
    return re.sub(r"(//[^:/@]+:)[^@]*@", r"\1***@", url) if url else str(home / "prefect.db")


def _last_error_line(log: Path) -> str:
    """The last exception (or else error) line of `log`, shortened, to put in a one-line message."""
    try:
        with log.open("rb") as file:
            file.seek(max(0, file.seek(0, os.SEEK_END) - 65536))
            lines = [line.strip() for line in file.read().decode(errors="replace").splitlines()]
    except OSError:
        return ""
    # A traceback's last line ("sqlalchemy.exc.OperationalError: ...") says more than a closing "ERROR: ..." line.
    exceptions = [line for line in lines if re.match(r"[\w.]+(Error|Exception): ", line)]
    errors = exceptions or [line for line in lines if "error" in line.lower()]
    return errors[-1][:200] if errors else ""


def _spawn_server(home: Path, port: int) -> tuple[dict, subprocess.Popen]:
    """Start `prefect server start` on `port` and return its state record and process."""
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    # The UI must call this server's API, not the default port's.
    env["PREFECT_UI_API_URL"] = url
    env["PYTHONUNBUFFERED"] = "1"
    # Bounded records: the server's vacuum deletes flow runs (with their logs and task runs) that ended
    # more than PREFECT_SERVER_SERVICES_DB_VACUUM_RETENTION_PERIOD ago (default 90 days), besides old
    # events, unless the caller chose otherwise.
    env.setdefault("PREFECT_SERVER_SERVICES_DB_VACUUM_ENABLED", VACUUM)
    env.pop("PREFECT_API_URL", None)
    log = home / SERVER_LOG
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    process = spawn_logged(command, log, env)
    state = {
        "api_url": url,
        "pid": process.pid,
        "start_time": process_start_time(process.pid),
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "database": _database(env, home),
        "prefect_version": version("prefect"),
        "log": str(log),
    }
    return state, process


def _discard(home: Path, pid: int) -> None:
    """End a server that did not start, and forget it."""
    stop_process_group(pid, timeout=10.0)
    (home / SERVER_STATE).unlink(missing_ok=True)


def _lost_its_port(log: Path, since: int) -> bool:
    """Whether the server's log, from byte `since` on, says that its port was taken (its own words)."""
    try:
        with log.open("rb") as file:
            file.seek(since)
            return b"already in use" in file.read().lower()  # prefect's own check, or the bind's error
    except OSError:
        return False


def _start_server(home: Path, timeout: float, port: int) -> str | None:
    """Start a server on `port` and wait until it answers; None if another program took the port first."""
    log = home / SERVER_LOG
    since = log.stat().st_size if log.exists() else 0
    state, process = _spawn_server(home, port)
    _write_state(home, state)
    print(f"Starting a local Prefect server at http://127.0.0.1:{port} (log: {state['log']})", file=sys.stderr)
    try:
        if _wait_until_serving(state, timeout):
            return state["api_url"]
    except BaseException:  # interrupted: leave no half-started server behind
        _discard(home, process.pid)
        raise
    exit_code = process.poll()
    _discard(home, process.pid)
    if exit_code is not None and (_lost_its_port(log, since) or not _port_is_free(port)):
        print(f"Another program took port {port}: trying another", file=sys.stderr)
        return None
    reason = f"exited with code {exit_code}" if exit_code is not None else f"did not answer within {timeout:g}s"
    detail = _last_error_line(home / SERVER_LOG)
    raise ServerError(f"the local Prefect server {reason}{f' ({detail})' if detail else ''}; see {state['log']}")


def ensure_local_server(home: Path, timeout: float = 180.0) -> str:
    """Start (or reuse) a Prefect server bound to 127.0.0.1 with its database under `home`; returns its API URL.

    A recorded server that still runs but does not answer yet (starting, or busy) is waited for up to
    `timeout` seconds, never replaced: two servers must not share one database. Raises ServerError
    when a server cannot be started or the recorded one does not answer in time.
    """
    with _server_lock(home):
        if state := _recorded_server(home):
            if _is_serving(state):
                return state["api_url"]
            pid, url = state["pid"], state["api_url"]
            print(f"Waiting for the local Prefect server (pid {pid}) to answer at {url}", file=sys.stderr)
            if _wait_until_serving(state, timeout):
                return url
            if _is_running(state):
                raise ServerError(
                    f"the local Prefect server (pid {pid}) did not answer at {url} within {timeout:g}s; "
                    f"see {state.get('log', home / SERVER_LOG)}, or stop it: featuresum server stop"
                )
        for attempt in range(START_ATTEMPTS):
            if url := _start_server(home, timeout, _free_port(default=attempt == 0)):
                return url
        raise ServerError(f"other programs took every port the local Prefect server tried; see {home / SERVER_LOG}")


def server_status(home: Path) -> dict | None:
    """The local server recorded under `home` (URL, pid, database, version, uptime, log), or None if none runs."""
    state = _recorded_server(home)
    if state is None:
        return None
    return {
        "url": state["api_url"].removesuffix("/api"),
        "api_url": state["api_url"],
        "pid": state["pid"],
        "healthy": _is_serving(state),
        "database": state.get("database", str(home / "prefect.db")),
        "prefect_version": state.get("prefect_version"),
        "started_at": state.get("started_at"),
        "uptime_seconds": round(max(0.0, time.time() - state["start_time"]), 1),
        "log": state.get("log", str(home / SERVER_LOG)),
    }


def stop_local_server(home: Path, timeout: float = 30.0) -> bool:
    """Stop the local server recorded under `home` and every process of its group; returns whether one ran."""
    with _server_lock(home):
        state = _recorded_server(home)
        (home / SERVER_STATE).unlink(missing_ok=True)
        if state is None:
            return False
        stop_process_group(state["pid"], timeout)
        return True


@contextmanager
def prefect_api() -> Iterator[str]:
    """Point Prefect at the configured API, or at the local server (started on first use)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if url := configured_api_url():
        yield url
        return
    url = ensure_local_server(prefect_home())
    with temporary_settings({PREFECT_API_URL: url}):
        yield url


def wait_for_task_runs(flow_run_id: str, task_run_ids: list[str], timeout: float = 120.0) -> dict[str, str]:
    """Block until the given task runs are recorded in a final state; returns {task run name: state name}.

    Task runs reach the API as events, some time after the flow itself returns.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    wanted = set(task_run_ids)
    runs_filter = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            recorded, offset = {}, 0
            while page := client.read_task_runs(flow_run_filter=runs_filter, offset=offset, limit=200):
                recorded.update({str(run.id): run for run in page if run.state and run.state.is_final()})
                offset += len(page)
            if wanted <= recorded.keys():
                return {recorded[i].name: recorded[i].state.name for i in task_run_ids}
            if time.monotonic() > deadline:
                missing = len(wanted - recorded.keys())
                raise TimeoutError(f"{missing} task runs of flow run {flow_run_id} were not recorded in {timeout}s")
            time.sleep(0.25)

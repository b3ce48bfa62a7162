"""Where flow runs are recorded: the configured Prefect API, or a local server the CLI starts and reuses.

Prefect's ephemeral mode (no PREFECT_API_URL) runs a temporary API inside the process and loses
task runs that are still in flight as events when the process exits. Instead, with no API
configured, the CLI starts `prefect server start` on 127.0.0.1 with its SQLite database under
PREFECT_HOME, leaves it running for later commands and for the UI, and before exiting waits until
every task run of its flow run is recorded in a final state.
"""

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

DEFAULT_PORT = 4200
SERVER_STATE = "featuresum-server.json"
SERVER_LOG = "featuresum-server.log"


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


def is_healthy(api_url: str, timeout: float = 2.0) -> bool:
    """Whether a Prefect API answers its health check (which needs no credentials)."""
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


def _port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    if _port_is_free(DEFAULT_PORT):
        return DEFAULT_PORT
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _read_state(home: Path) -> dict:
    try:
        return json.loads((home / SERVER_STATE).read_text())
    except (OSError, ValueError):
        return {}


def local_server_url(home: Path) -> str | None:
    """URL of the local server recorded under `home`, if it is up."""
    url = _read_state(home).get("api_url")
    return url if url and is_healthy(url) else None


def ensure_local_server(home: Path, timeout: float = 180.0) -> str:
    """Start (or reuse) a Prefect server bound to 127.0.0.1 with its database under `home`."""
    home.mkdir(parents=True, exist_ok=True)
    # The lock stops concurrent commands from starting one server each.
    with (home / "featuresum-server.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if url := local_server_url(home):
            return url
        port = _free_port()
        url = f"http://127.0.0.1:{port}/api"
        env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        # The UI must call this server's API, not the default port's.
        env["PREFECT_UI_API_URL"] = url
        env.pop("PREFECT_API_URL", None)
        with (home / SERVER_LOG).open("ab") as log:
            server = subprocess.Popen(
                [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        print(
            f"Starting a local Prefect server at {url.removesuffix('/api')} (log: {home / SERVER_LOG})", file=sys.stderr
        )
        deadline = time.monotonic() + timeout
        while not is_healthy(url):
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise RuntimeError(f"the local Prefect server did not start; see {home / SERVER_LOG}")
            time.sleep(0.5)
        (home / SERVER_STATE).write_text(json.dumps({"api_url": url, "pid": server.pid}))
        return url


def stop_local_server(home: Path, timeout: float = 30.0) -> bool:
    """Stop the local server recorded under `home`; returns whether one was running."""
    state = _read_state(home)
    (home / SERVER_STATE).unlink(missing_ok=True)
    pid = state.get("pid")
    if not pid:
        return False
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    with suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
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

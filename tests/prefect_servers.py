"""Real Prefect servers and the installed commands, as the server and browser tests use them."""

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
# Server start-up measured 15-20 s here; the lead's tests may share the two cores.
SERVER_START_TIMEOUT = 240.0


def require_service(variable: str, what: str) -> str:
    """The value of `variable`, or a skip naming the missing service (a failure where every test must run)."""
    value = os.environ.get(variable)
    if value:
        return value
    message = f"{variable} is not set: no {what} to test against"
    if os.environ.get("FEATURESUM_REQUIRE_ALL") == "1":
        pytest.fail(f"{message} (FEATURESUM_REQUIRE_ALL=1)")
    pytest.skip(message)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def clean_environment(**extra: str) -> dict[str, str]:
    """This process's environment without any Prefect setting, telemetry off, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false", **extra)
    return env


def stop_process_group(process: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGTERM a process started in a session of its own and everything it started; SIGKILL stragglers."""
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        pass
    # Children (the served runs, the server's services) may outlive their parent.
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    with suppress(subprocess.TimeoutExpired):
        process.wait(5)


def tail(path: Path, lines: int = 40) -> str:
    """The last lines of a log file, for failure messages."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


def http_status(url: str, data: bytes | None = None, headers: dict[str, str] | None = None) -> int:
    """HTTP status of a request (a JSON POST when `data` is given); 0 when nothing answers."""
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return 0


@dataclass
class PrefectServer:
    """A `prefect server start` subprocess on 127.0.0.1 and the environment a client needs for it."""

    url: str
    home: Path
    log: Path
    process: subprocess.Popen
    client_env: dict[str, str] = field(default_factory=dict)

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"

    @contextmanager
    def settings(self):
        """Point this test process's Prefect client at the server (with its credentials)."""
        from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

        values = {PREFECT_API_URL: self.api_url}
        if auth := self.client_env.get("PREFECT_API_AUTH_STRING"):
            values[PREFECT_API_AUTH_STRING] = auth
        with temporary_settings(values):
            yield


@contextmanager
def prefect_server(home: Path, database_url: str | None = None, auth: str | None = None):
    """Start a Prefect server with its state under `home`; stop it (and its process group) on exit."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = clean_environment(
        PREFECT_HOME=str(home),
        # `--port` alone leaves the UI calling the API on the default port 4200.
        PREFECT_UI_API_URL=f"{url}/api",
    )
    if database_url:
        env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = database_url
    if auth:
        env["PREFECT_SERVER_API_AUTH_STRING"] = auth
    log = home / "server.log"
    command = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with log.open("wb") as output:
        process = subprocess.Popen(
            command, env=env, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while http_status(f"{url}/api/health") != 200:
            if process.poll() is not None:
                raise RuntimeError(f"prefect server exited with {process.returncode}:\n{tail(log)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"prefect server not healthy after {SERVER_START_TIMEOUT} s:\n{tail(log)}")
            time.sleep(0.5)
        client_home = home / "client"
        client_env = clean_environment(PREFECT_HOME=str(client_home), PREFECT_API_URL=f"{url}/api")
        if auth:
            client_env["PREFECT_API_AUTH_STRING"] = auth
        yield PrefectServer(url=url, home=home, log=log, process=process, client_env=client_env)
    finally:
        stop_process_group(process)


def run_command(
    program: str, *args: str, env: dict[str, str], cwd: Path, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Run an installed command (featuresum, prefect) to completion and return its output."""
    return subprocess.run(
        [str(BIN / program), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def wait_until(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.5) -> object:
    """Poll `condition` until it returns something truthy; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if result := condition():
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@contextmanager
def serve_command(server: PrefectServer, work: Path, name: str, *options: str, env: dict[str, str] | None = None):
    """`featuresum serve --name NAME OPTIONS` running against the server from `work`, until its schedule is live.

    Yields (the serve process, the deployment); its output goes to `work/serve.log`. The process group is
    stopped (SIGTERM, then SIGKILL) on exit.
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    log = work / "serve.log"
    started = datetime.now(UTC)
    command = [str(BIN / "featuresum"), "serve", "--name", name, *options]
    # A served runner polls for due runs every 10 s by default; 1 s keeps the tests short.
    env = {**server.client_env, "PREFECT_RUNNER_POLL_FREQUENCY": "1", **(env or {})}
    with log.open("ab") as output:
        process = subprocess.Popen(
            command, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        with server.settings(), get_client(sync_client=True) as client:

            def deployment():
                assert process.poll() is None, f"featuresum serve exited with {process.returncode}:\n{tail(log)}"
                try:
                    return client.read_deployment_by_name(f"featuresum-pipeline/{name}")
                except ObjectNotFound:
                    return None

            found = wait_until(deployment, 180, "the served deployment")

            # The runner pauses the schedule on SIGTERM only once it polls (the deployment is then READY);
            # a SIGTERM before that exits without pausing. A deployment served before stays READY for a
            # while after its runner stopped: this process has polled only once last_polled follows its start.
            def polled():
                found = client.read_deployment(found_id)
                return found.status.value == "READY" and found.last_polled and found.last_polled > started

            found_id = found.id
            wait_until(polled, 180, "serve to poll for runs")
            yield process, found
    finally:
        stop_process_group(process)

"""`featuresum server start|status|stop` and the local server behind it, with real `prefect server start` processes.

Each test has a PREFECT_HOME of its own and stops what it starts. Server start-up takes 10-20 s here, so
the tests that only look at a running server share one (module fixture, also in a home of its own).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import prefect
import psutil
import pytest
from prefect.settings import PREFECT_HOME, temporary_settings
from typer.testing import CliRunner

from featuresum.flows import local_server, processes
from featuresum.flows.cli.server import server_app

pytestmark = pytest.mark.server

# Generous: the tests may share two cores with other servers starting.
START_TIMEOUT = 240.0


def invoke(home: Path, *args: str):
    """Run `featuresum server ARGS` in this process, with PREFECT_HOME set to `home`."""
    with temporary_settings({PREFECT_HOME: home}):
        return CliRunner().invoke(server_app, list(args))


def processes_of(home: Path) -> dict[int, list[str]]:
    """Every running process whose environment has PREFECT_HOME=`home`: {pid: command line}."""
    found = {}
    for process in psutil.process_iter():
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                continue
            if process.environ().get("PREFECT_HOME") == str(home):
                found[process.pid] = process.cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def prefect_servers_of(home: Path) -> list[int]:
    """The `prefect server start` processes serving `home`."""
    return [
        pid for pid, command in processes_of(home).items() if command[1:3] == ["-m", "prefect"] and "start" in command
    ]


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        # Connections of the stopped server in TIME_WAIT do not count (the server binds this way), a listener does.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    """A PREFECT_HOME with a local server started by ensure_local_server; stopped after the module."""
    home = tmp_path_factory.mktemp("running-server")
    try:
        local_server.ensure_local_server(home, timeout=START_TIMEOUT)
        yield home
    finally:
        local_server.stop_local_server(home)


def test_status_shows_url_pid_database_version_uptime_and_log(running):
    status = local_server.server_status(running)
    assert status is not None and status["healthy"]
    port = int(status["url"].rsplit(":", 1)[1])

    shown = invoke(running, "status")
    assert shown.exit_code == 0, shown.output
    for value in (status["url"], str(status["pid"]), str(running / "prefect.db"), prefect.__version__, status["log"]):
        assert value in shown.stdout
    assert "uptime" in shown.stdout

    as_json = invoke(running, "status", "--json")
    assert as_json.exit_code == 0, as_json.output
    report = json.loads(as_json.stdout)
    assert report["running"] is True
    assert report["url"] == f"http://127.0.0.1:{port}"
    assert report["pid"] == status["pid"]
    assert report["database"] == str(running / "prefect.db") and (running / "prefect.db").is_file()
    assert report["prefect_version"] == prefect.__version__
    assert 0 < report["uptime_seconds"] < 3600
    # The server's output reaches the log through the copier, which shares the server's process group.
    assert report["log"] == str(running / local_server.SERVER_LOG)
    assert f"127.0.0.1:{port}" in Path(report["log"]).read_text()
    members = processes.process_group_members(status["pid"])
    assert len(members) == 2 and status["pid"] in members
    assert any("run_log_copier" in " ".join(processes_of(running)[pid]) for pid in members)


def test_status_json_in_a_fresh_process(running):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(running)
    script = "from featuresum.flows.cli.server import server_app; server_app()"
    result = subprocess.run(
        [sys.executable, "-c", script, "status", "--json"], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["pid"] == local_server.server_status(running)["pid"]


def test_a_second_start_reuses_the_running_server(running):
    pid = local_server.server_status(running)["pid"]
    again = invoke(running, "start", "--json")
    assert again.exit_code == 0, again.output
    report = json.loads(again.stdout)
    assert report["started"] is False and report["pid"] == pid
    assert local_server.ensure_local_server(running) == report["api_url"]
    assert prefect_servers_of(running) == [pid]


def test_a_slow_recorded_server_is_waited_for_not_replaced(running):
    status = local_server.server_status(running)
    outcome = {}

    def second_start():
        try:
            outcome["url"] = local_server.ensure_local_server(running, timeout=120)
        except Exception as error:  # re-raised by the test below
            outcome["error"] = error

    os.killpg(status["pid"], signal.SIGSTOP)
    try:
        waiting = threading.Thread(target=second_start)
        waiting.start()
        time.sleep(6)  # three health checks that time out
        assert waiting.is_alive(), outcome
        assert prefect_servers_of(running) == [status["pid"]]
    finally:
        os.killpg(status["pid"], signal.SIGCONT)
    waiting.join(120)
    assert "error" not in outcome, outcome
    assert outcome["url"] == status["api_url"]
    assert local_server.server_status(running)["pid"] == status["pid"]
    assert prefect_servers_of(running) == [status["pid"]]


def test_start_status_stop_beside_a_foreign_listener_and_a_stale_record(tmp_path):
    # Something that is not ours listens on the default port (started here when the port is free).
    foreign = None
    if port_is_free(local_server.DEFAULT_PORT):
        foreign = subprocess.Popen(
            [sys.executable, "-m", "http.server", str(local_server.DEFAULT_PORT), "--bind", "127.0.0.1"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while port_is_free(local_server.DEFAULT_PORT):
            assert time.monotonic() < deadline and foreign.poll() is None
            time.sleep(0.1)
    # A record of a server whose process is gone, pointing at that port.
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / local_server.SERVER_STATE).write_text(
        json.dumps({"api_url": f"http://127.0.0.1:{local_server.DEFAULT_PORT}/api", "pid": gone.pid, "start_time": 1.0})
    )
    try:
        started = invoke(tmp_path, "start")
        assert started.exit_code == 0, started.output
        assert "Started the local Prefect server" in started.stdout
        status = local_server.server_status(tmp_path)
        port = int(status["url"].rsplit(":", 1)[1])
        assert port != local_server.DEFAULT_PORT and status["pid"] != gone.pid
        assert json.loads(invoke(tmp_path, "status", "--json").stdout)["url"] == f"http://127.0.0.1:{port}"

        stopped = invoke(tmp_path, "stop")
        assert stopped.exit_code == 0, stopped.output
        assert f"pid {status['pid']}" in stopped.stdout
        # stop returns only once the whole group is gone, and with it the port.
        assert processes.process_group_members(status["pid"]) == []
        assert processes_of(tmp_path) == {}
        assert port_is_free(port)
        assert not (tmp_path / local_server.SERVER_STATE).exists()

        after = invoke(tmp_path, "status")
        assert after.exit_code == 1 and "no local server is running" in after.stdout
        assert json.loads(invoke(tmp_path, "status", "--json").stdout) == {"running": False, "home": str(tmp_path)}
        assert invoke(tmp_path, "stop").exit_code == 0
        if foreign is not None:
            assert foreign.poll() is None  # never taken for ours, never stopped
    finally:
        local_server.stop_local_server(tmp_path)
        if foreign is not None:
            foreign.terminate()
            foreign.wait(10)


def test_a_server_that_exits_during_start_up_leaves_no_process(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_SERVER_DATABASE_CONNECTION_URL", "sqlite+aiosqlite:////nonexistent/dir/prefect.db")
    began = time.monotonic()
    try:
        with pytest.raises(local_server.ServerError) as failure:
            local_server.ensure_local_server(tmp_path, timeout=START_TIMEOUT)
        assert time.monotonic() - began < 90
        message = str(failure.value)
        assert "\n" not in message
        assert "exited with code" in message and "unable to open database file" in message
        assert message.endswith(f"see {tmp_path / local_server.SERVER_LOG}")
        assert processes_of(tmp_path) == {}
        assert not (tmp_path / local_server.SERVER_STATE).exists()
    finally:
        local_server.stop_local_server(tmp_path)


def test_a_server_that_does_not_answer_in_time_is_ended_with_its_group(tmp_path):
    try:
        with pytest.raises(local_server.ServerError, match=r"did not answer within 1s; see .*featuresum-server\.log$"):
            local_server.ensure_local_server(tmp_path, timeout=1)
        assert processes_of(tmp_path) == {}
        assert not (tmp_path / local_server.SERVER_STATE).exists()
    finally:
        local_server.stop_local_server(tmp_path)


def test_a_server_that_loses_its_port_to_another_program_starts_on_another(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    with socket.socket() as taken:  # another program binds the port between our probe and the server's bind
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        lost = taken.getsockname()[1]
        ports = iter([lost])
        real = local_server._free_port
        monkeypatch.setattr(local_server, "_free_port", lambda default=True: next(ports, None) or real(default=False))
        # By the time we look, the other program may have let go again: only the server's own error tells.
        monkeypatch.setattr(local_server, "_port_is_free", lambda port: True)
        try:
            url = local_server.ensure_local_server(home, timeout=START_TIMEOUT)
            assert url != f"http://127.0.0.1:{lost}/api" and local_server.api_health(url) == "ok"
            assert "already in use" in (home / local_server.SERVER_LOG).read_text().lower()
        finally:
            local_server.stop_local_server(home)

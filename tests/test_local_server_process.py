"""The local Prefect server: every task run reaches the database; process identity, groups and the rotating log."""

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import pytest

from featuresum.flows import local_server, processes, server_log


def test_every_task_run_of_a_many_task_flow_is_recorded(cli):
    script = Path(__file__).with_name("many_tasks_flow.py")
    result = subprocess.run(
        [sys.executable, str(script), "120"], env=cli.env, cwd=Path(__file__).parents[1],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    for bad in ("ERROR", "Traceback", "database is locked"):
        assert bad not in result.stderr
    flow_run_ids = result.stdout.split()
    assert len(flow_run_ids) == 2

    home = Path(cli.env["PREFECT_HOME"])
    status = local_server.server_status(home)
    assert status["api_url"].startswith("http://127.0.0.1:")
    # Its records stay bounded: the server's vacuum deletes old flow runs as well as old events.
    with urllib.request.urlopen(f"{status['api_url']}/admin/settings", timeout=10) as response:
        vacuum = json.load(response)["server"]["services"]["db_vacuum"]
    assert {"events", "flow_runs"} <= set(vacuum["enabled"]) and vacuum["retention_period"], vacuum
    with sqlite3.connect(home / "prefect.db") as db:
        for flow_run_id in flow_run_ids:
            states = db.execute(
                "SELECT state_type, count(*) FROM task_run WHERE flow_run_id = ? GROUP BY state_type", (flow_run_id,)
            ).fetchall()
            assert states == [("COMPLETED", 120)]


def test_the_rotating_log_caps_each_file_and_keeps_the_newest_lines(tmp_path):
    lines = [f"line {i:04d}\n".encode() for i in range(1000)]  # 10 bytes each
    read_end, write_end = os.pipe()
    with os.fdopen(write_end, "wb") as writer:
        writer.write(b"".join(lines))
    log = tmp_path / "server.log"
    with os.fdopen(read_end, "rb") as stream:
        server_log.copy_to_rotating_log(stream, log, max_bytes=100, backups=2)

    files = [log.with_name(f"{log.name}.2"), log.with_name(f"{log.name}.1"), log]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["server.log", "server.log.1", "server.log.2"]
    assert all(path.stat().st_size <= 100 for path in files)
    kept = b"".join(path.read_bytes() for path in files)
    assert kept == b"".join(lines[-30:])


def test_the_rotating_log_counts_what_an_earlier_server_wrote(tmp_path):
    log = tmp_path / "server.log"
    log.write_bytes(b"x" * 95 + b"\n")
    read_end, write_end = os.pipe()
    with os.fdopen(write_end, "wb") as writer:
        writer.write(b"new line\n")
    with os.fdopen(read_end, "rb") as stream:
        server_log.copy_to_rotating_log(stream, log, max_bytes=100, backups=2)
    assert log.read_bytes() == b"new line\n"
    assert log.with_name("server.log.1").read_bytes() == b"x" * 95 + b"\n"


SAYS_BYE_ON_SIGTERM = """
import signal, sys, time
def bye(*_):
    print("last words", flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, bye)
print("started", flush=True)
time.sleep(120)
"""


def wait_for(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def with_group_killed(process: subprocess.Popen) -> None:
    """Leave nothing of `process`'s group behind, whatever a test did."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(10)


def test_a_logged_command_and_its_log_copier_form_one_process_group(tmp_path):
    log = tmp_path / "command.log"
    process = server_log.spawn_logged([sys.executable, "-c", SAYS_BYE_ON_SIGTERM], log, dict(os.environ))
    try:
        wait_for(lambda: b"started" in log.read_bytes())
        members = processes.process_group_members(process.pid)
        assert len(members) == 2 and process.pid in members
        copier = next(pid for pid in members if pid != process.pid)
        assert "run_log_copier" in " ".join(psutil.Process(copier).cmdline())
        assert os.getpgid(copier) == process.pid
    finally:
        processes.stop_process_group(process.pid, timeout=20)
    assert processes.process_group_members(process.pid) == []
    # The copier outlived SIGTERM long enough to record what the command said on its way out.
    assert log.read_bytes() == b"started\nlast words\n"


def test_a_process_group_that_ignores_sigterm_is_killed(tmp_path):
    ignores = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(120)"
    )
    log = tmp_path / "stubborn.log"
    process = server_log.spawn_logged([sys.executable, "-c", ignores], log, dict(os.environ))
    try:
        wait_for(lambda: b"up" in log.read_bytes())
        processes.stop_process_group(process.pid, timeout=1)
        assert processes.process_group_members(process.pid) == []
    finally:
        with_group_killed(process)


@contextmanager
def answering_health() -> Iterator[str]:
    """An HTTP server that is not Prefect but answers 200 on /api/health; yields its API URL."""

    class Health(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/api/health" else 404)
            self.end_headers()
            self.wfile.write(b"true")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/api"
    finally:
        server.shutdown()
        server.server_close()


def record(home: Path, **state) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / local_server.SERVER_STATE).write_text(json.dumps(state))


def test_the_health_check_tells_ok_from_refused_from_silent():
    with answering_health() as url:
        assert local_server.api_health(url) == "ok"
        assert local_server.api_health(url.removesuffix("/api") + "/other") == "silent"  # answers 404
    with socket.socket() as closed:  # bound, not listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        assert local_server.api_health(f"http://127.0.0.1:{closed.getsockname()[1]}/api") == "refused"
    with socket.socket() as mute:  # listening, never answering
        mute.bind(("127.0.0.1", 0))
        mute.listen()
        assert local_server.api_health(f"http://127.0.0.1:{mute.getsockname()[1]}/api", timeout=0.5) == "silent"


def test_a_record_without_a_matching_start_time_is_ours_only_while_its_pid_listens_on_the_port(tmp_path):
    # This process listens on the recorded port (the health server runs in one of its threads).
    with answering_health() as url:
        for older in ({"start_ticks": 12345}, {}, {"start_time": 1.0}):  # earlier versions; a stepped clock
            record(tmp_path, api_url=url, pid=os.getpid(), **older)
            status = local_server.server_status(tmp_path)
            assert status is not None and status["pid"] == os.getpid() and status["healthy"], older
            assert status["uptime_seconds"] > 0
    stranger = subprocess.Popen(["sleep", "120"], start_new_session=True)
    try:
        with answering_health() as url:
            for older in ({"start_ticks": 12345}, {}):
                record(tmp_path, api_url=url, pid=stranger.pid, **older)
                assert local_server.server_status(tmp_path) is None, older
            assert local_server.stop_local_server(tmp_path) is False
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


def test_a_foreign_answer_on_the_recorded_url_is_not_our_server_when_its_pid_is_gone(tmp_path):
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    with answering_health() as url:
        assert local_server.api_health(url) == "ok"
        record(tmp_path, api_url=url, pid=finished.pid, start_time=1.0)
        assert local_server.server_status(tmp_path) is None
        assert local_server.stop_local_server(tmp_path) is False
    assert not (tmp_path / local_server.SERVER_STATE).exists()


def test_a_reused_pid_is_never_taken_for_our_server_nor_stopped(tmp_path):
    stranger = subprocess.Popen(["sleep", "120"], start_new_session=True)
    try:
        started = processes.process_start_time(stranger.pid)
        assert started is not None
        with answering_health() as url:
            record(tmp_path, api_url=url, pid=stranger.pid, start_time=started - 1)
            assert local_server.server_status(tmp_path) is None
            assert local_server.stop_local_server(tmp_path) is False
        assert stranger.poll() is None
        assert processes.process_start_time(stranger.pid) == started
    finally:
        stranger.kill()
        stranger.wait()


def test_our_running_process_is_not_serving_while_another_program_holds_its_port(tmp_path):
    ours = subprocess.Popen(["sleep", "120"], start_new_session=True)
    try:
        with answering_health() as url:
            record(tmp_path, api_url=url, pid=ours.pid, start_time=processes.process_start_time(ours.pid))
            status = local_server.server_status(tmp_path)
            assert status is not None and status["pid"] == ours.pid
            assert status["healthy"] is False
        assert local_server.stop_local_server(tmp_path) is True
        assert processes.process_group_members(ours.pid) == []
    finally:
        with_group_killed(ours)


def test_a_process_that_exited_counts_as_gone_before_its_parent_collects_it():
    child = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    try:
        assert processes.process_start_time(os.getpid()) is not None
        wait_for(lambda: psutil.Process(child.pid).status() == psutil.STATUS_ZOMBIE)
        assert processes.process_start_time(child.pid) is None
        assert processes.process_group_members(child.pid) == []
    finally:
        child.wait()


@pytest.mark.server
def test_the_vacuum_deletes_a_flow_run_that_ended_before_the_retention_period(tmp_path, monkeypatch):
    """Prefect's records stay bounded: featuresum's local server deletes a run that ended 91 days ago."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Completed

    monkeypatch.setenv("PREFECT_SERVER_SERVICES_DB_VACUUM_LOOP_SECONDS", "1")  # not once an hour
    home = tmp_path / "home"
    try:
        url = local_server.ensure_local_server(home)
        with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
            old, recent = (client.create_flow_run(flow(name="vacuumed")(lambda: None), state=Completed()) for _ in "ab")
            with sqlite3.connect(home / "prefect.db") as db:  # as if it had ended 91 days ago
                ended = db.execute("SELECT end_time FROM flow_run WHERE id = ?", (str(old.id),)).fetchone()[0]
                assert ended, "the run has an end time"
                earlier = (date.fromisoformat(ended[:10]) - timedelta(days=91)).isoformat() + ended[10:]
                db.execute("UPDATE flow_run SET end_time = ? WHERE id = ?", (earlier, str(old.id)))

            def vacuumed() -> bool:
                try:
                    client.read_flow_run(old.id)
                except ObjectNotFound:
                    return True
                time.sleep(0.5)
                return False

            deadline = time.monotonic() + 60
            while not vacuumed():
                assert time.monotonic() < deadline, "the vacuum never deleted the old run"
            assert client.read_flow_run(recent.id).state.is_completed()
    finally:
        local_server.stop_local_server(home)

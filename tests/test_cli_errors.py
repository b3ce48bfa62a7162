"""The command line without a Prefect server: options, help, version, and errors as one line with their exit code."""

import json
import os
import subprocess
import sys
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from featuresum.flows import cli

COMMANDS = ["run", "train", "score", "backfill", "serve", "gc", "server", "models"]


def featuresum(capsys, *args):
    """Run the real entry point in this process; returns (exit code, stdout, stderr lines)."""
    old = sys.argv
    sys.argv = ["featuresum", *args]
    try:
        with pytest.raises(SystemExit) as ended:
            cli.main()
    finally:
        sys.argv = old
    out, err = capsys.readouterr()
    return ended.value.code, out, err.strip().splitlines()


def one_error_line(code, lines, expected_code, *fragments):
    assert code == expected_code, lines
    assert len(lines) == 1, lines
    assert lines[0].startswith("featuresum: error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_help_explains_every_command():
    runner = CliRunner()
    top = runner.invoke(cli.app, ["--help"])
    assert top.exit_code == 0, top.output
    for command in COMMANDS:
        assert command in top.output
        result = runner.invoke(cli.app, [command, "--help"])
        assert result.exit_code == 0, result.output
        assert "Usage:" in result.output
    assert "--train-samples" in runner.invoke(cli.app, ["run", "--help"]).output
    assert "--cron" in runner.invoke(cli.app, ["serve", "--help"]).output


def test_run_help_says_a_local_server_is_started_and_how_to_stop_it():
    text = " ".join(CliRunner().invoke(cli.app, ["run", "--help"], terminal_width=200).output.split())
    assert "local Prefect server" in text
    assert "featuresum server stop" in text


def test_version(capsys):
    code, out, _ = featuresum(capsys, "--version")
    assert code == 0
    assert out.startswith("featuresum 0.")


@pytest.mark.parametrize(
    "args",
    [
        ["run", "--epochs", "0"],
        ["run", "--device", "tpu"],
        ["run", "--lr", "abc"],
        ["run", "--no-such-option"],
        ["score", "--samples", "5"],  # no --model
    ],
)
def test_bad_options_give_one_line_and_exit_code_2(capsys, args):
    code, _, lines = featuresum(capsys, *args)
    one_error_line(code, lines, 2)


def test_score_takes_exactly_one_of_input_and_samples(capsys, checkpoint, tmp_path):
    both = featuresum(capsys, "score", "--model", str(checkpoint), "--input", "x.parquet", "--samples", "3")
    one_error_line(both[0], both[2], 2, "exactly one of --input PARQUET or --samples N")
    neither = featuresum(capsys, "score", "--model", str(checkpoint))
    one_error_line(neither[0], neither[2], 2, "exactly one of --input PARQUET or --samples N")


def test_an_output_that_is_an_input_is_refused(capsys, checkpoint, tmp_path):
    features = tmp_path / "rows.parquet"
    features.write_bytes(b"PAR1")
    for target in (features, checkpoint):
        args = ["score", "--model", str(checkpoint), "--input", str(features), "--output", str(target)]
        code, _, lines = featuresum(capsys, *args)
        one_error_line(code, lines, 2, str(target), "also an input")
    assert checkpoint.stat().st_size > 1000


def test_a_folder_that_cannot_be_created_fails_at_once(capsys, tmp_path):
    (tmp_path / "a-file").write_text("")
    code, _, lines = featuresum(capsys, "run", "--artifacts-dir", str(tmp_path / "a-file" / "artifacts"))
    one_error_line(code, lines, 2, "a-file/artifacts", "cannot create")


@pytest.mark.parametrize("command", [["run"], ["train"], ["backfill", "--from", "2026-01-01", "--to", "2026-01-02"]])
def test_rows_that_no_way_of_training_holds_stop_the_command_before_it_starts(capsys, tmp_path, command):
    folders = ["--data-dir", str(tmp_path / "data"), "--artifacts-dir", str(tmp_path / "artifacts")]
    code, _, lines = featuresum(capsys, *command, "--train-memory-mb", "50", *folders)
    one_error_line(code, lines, 2, "even when streaming", "50 MB budget", "--train-memory-mb")
    assert not (tmp_path / "data").exists() and not (tmp_path / "artifacts").exists()


def environment(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return {**env, "PREFECT_HOME": str(tmp_path / "home"), **extra}


def run_cli(tmp_path, *args, **env):
    executable = Path(sys.executable).parent / "featuresum"
    return subprocess.run(
        [str(executable), *args], cwd=tmp_path, env=environment(tmp_path, **env),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def last_line(result):
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr, result.stderr
    return lines[-1]


def test_an_api_url_that_points_to_nothing_is_one_line_and_exit_code_1(tmp_path):
    with socket_nobody_listens_on() as url:
        result = run_cli(tmp_path, "train", "--epochs", "1", PREFECT_API_URL=url)
    assert result.returncode == 1, result.stderr
    assert (
        last_line(result)
        == f"featuresum: error: the Prefect API at {url} does not answer; start it or unset PREFECT_API_URL"
    )


@contextmanager
def socket_nobody_listens_on():
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    yield f"http://127.0.0.1:{port}/api"


@contextmanager
def failing_api(status: int):
    """An HTTP endpoint whose health check passes and whose every other call answers `status`."""

    class Handler(BaseHTTPRequestHandler):
        def answer(self):
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            code = 200 if self.path.endswith("/health") else status
            body = json.dumps(True if code == 200 else {"detail": "failing on purpose"}).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = answer

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/api"
    finally:
        server.shutdown()
        server.server_close()


def test_an_api_answering_an_http_error_is_one_line_and_exit_code_1(tmp_path):
    with failing_api(500) as url:
        result = run_cli(tmp_path, "train", "--epochs", "1", PREFECT_API_URL=url)
    assert result.returncode == 1, result.stderr
    assert last_line(result).startswith(f"featuresum: error: the Prefect API at {url} answered HTTP 500")


def test_an_api_refusing_the_credentials_is_the_users_to_fix(tmp_path):
    with failing_api(401) as url:
        result = run_cli(tmp_path, "train", "--epochs", "1", PREFECT_API_URL=url)
    assert result.returncode == 2, result.stderr
    assert last_line(result) == (
        f"featuresum: error: the Prefect API at {url} refused us (401); set PREFECT_API_AUTH_STRING"
    )


def test_waiting_for_task_runs_that_never_arrive_ends_in_one_line(monkeypatch):
    """The wait is bounded; running out of time is the environment's failure (exit code 1), not a traceback."""

    def never(flow_run_id, task_run_ids):
        raise TimeoutError(f"{len(task_run_ids)} task runs of flow run {flow_run_id} were not recorded in 120.0s")

    from featuresum.flows.cli import _flow_runs

    monkeypatch.setattr(_flow_runs.local_server, "wait_for_task_runs", never)
    with pytest.raises(cli.EnvironmentFailure) as raised:
        _flow_runs._wait_for_task_runs({"flow_run_id": "run-1", "task_runs": {"task-1": "Completed"}})
    assert cli._exit_code(raised.value) == (1, str(raised.value))
    assert "1 task runs of flow run run-1 were not recorded" in str(raised.value)


def test_exit_codes_by_kind_of_error():
    from prefect.exceptions import TerminationSignal

    assert cli._exit_code(KeyboardInterrupt())[0] == 130
    assert cli._exit_code(typer.Abort())[0] == 130
    assert cli._exit_code(TerminationSignal(15))[0] == 143
    assert cli._exit_code(cli.InputError("x"))[0] == 2
    assert cli._exit_code(cli.EnvironmentFailure("x"))[0] == 1
    assert cli._exit_code(PermissionError(13, "Permission denied", "/x"))[0] == 2
    assert cli._exit_code(OSError(5, "Input/output error", "/x"))[0] == 1
    assert cli._exit_code(ValueError("a bug")) == (0, None)  # a bug keeps its traceback


def test_a_project_of_its_own_with_tasks_and_flows_modules_does_not_shadow_featuresum(tmp_path, checkpoint):
    for name in ("tasks.py", "flows.py"):
        (tmp_path / name).write_text("raise ImportError('a project module was imported instead of featuresum')\n")
    imported = subprocess.run(
        [sys.executable, "-c", "import featuresum.flows.cli, featuresum.flows.pipeline, featuresum.tasks.storage"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert imported.returncode == 0, imported.stderr
    (tmp_path / "bad.pt").write_text("not a model")
    result = run_cli(tmp_path, "score", "--model", "bad.pt", "--samples", "3")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "featuresum: error: bad.pt: refused: not a featuresum checkpoint (not a PyTorch archive; nothing was loaded)"
    ]


@pytest.mark.server
def test_a_local_server_that_fails_to_start_is_one_line_and_exit_code_1(tmp_path):
    broken = f"sqlite+aiosqlite:///{tmp_path}/no-such-folder/prefect.db"
    result = run_cli(tmp_path, "train", "--epochs", "1", PREFECT_SERVER_DATABASE_CONNECTION_URL=broken)
    assert result.returncode == 1, result.stderr
    line = last_line(result)
    assert line.startswith("featuresum: error: the local Prefect server"), line
    assert str(tmp_path / "home" / "featuresum-server.log") in line


@pytest.mark.parametrize(
    ("options", "fragment"),
    [(["--notify", "notaurl"], "'notaurl' is not an http(s) URL"), (["--cron", "61 * * * *"], "--cron/--timezone")],
)
def test_serve_refuses_a_bad_notify_url_or_cron_before_it_starts_anything(capsys, tmp_path, options, fragment):
    code, _, lines = featuresum(capsys, "serve", *options, "--artifacts-dir", str(tmp_path / "a"))
    one_error_line(code, lines, 2, fragment)
    assert not (tmp_path / "a").exists()

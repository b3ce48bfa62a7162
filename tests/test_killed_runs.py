"""Killed and stopped runs: a SIGKILLed training resumes from its last epoch, a signal or a dying
server ends the run in a final state with one line, and the next run resumes."""

import os
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import run_json

from featuresum.flows import local_server
from featuresum.tasks.checkpoint import load_checkpoint


def wait_for(predicate, process, timeout=300):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_killed_training_resumes_from_its_last_epoch(cli, tmp_path):
    args = [
        "train", "--train-samples", "20000", "--holdout-samples", "1000", "--epochs", "3", "--batch-size", "64",
        "--data-dir", str(tmp_path / "data"), "--artifacts-dir", str(tmp_path / "artifacts"),
    ]  # fmt: skip
    command = [cli.executable, *args, "--json"]
    process = subprocess.Popen(command, env=cli.env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        # First kill: while the training set is being written, before it is renamed into place.
        wait_for(lambda: list((tmp_path / "data").glob("train-*/date=*/.part-0.parquet.*.tmp")), process)
        process.send_signal(signal.SIGKILL)
        process.wait()
    finally:
        process.kill()
    assert not list((tmp_path / "data").glob("train-*/date=*/part-0.parquet"))

    process = subprocess.Popen(command, env=cli.env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        # Second kill: after at least one complete epoch, in the middle of the next.
        partials = lambda: list((tmp_path / "artifacts").glob("model-*.partial.pt"))  # noqa: E731
        wait_for(partials, process)
        process.send_signal(signal.SIGKILL)
        process.wait()
    finally:
        process.kill()
    [partial] = partials()
    killed_at = torch.load(partial, weights_only=True)["epoch"]
    assert 1 <= killed_at < 3
    assert not list((tmp_path / "artifacts").glob("model-*[0-9a-f].pt"))

    summary = run_json(cli(*args, "--json"))
    assert summary["start_epoch"] == killed_at
    assert summary["epochs_completed"] == 3
    checkpoint = load_checkpoint(Path(summary["checkpoint"]))
    assert [h["epoch"] for h in checkpoint["history"]] == [1, 2, 3]
    assert not partials()


@contextmanager
def api_client(home):
    """A client of the local server recorded under `home`."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = local_server.server_status(home)["api_url"]
    with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
        yield client


TRAIN_LONG = ["--train-samples", "40000", "--holdout-samples", "1000", "--epochs", "4", "--batch-size", "64"]


def _default_sigint() -> None:
    # A shell starts background jobs with SIGINT ignored, and children inherit that: a test run
    # started with `&` would otherwise start a featuresum that rightly ignores Ctrl-C.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_training(cli, tmp_path, env=None):
    args = ["train", *TRAIN_LONG, "--data-dir", str(tmp_path / "data"), "--artifacts-dir", str(tmp_path / "artifacts")]
    process = subprocess.Popen(
        [cli.executable, *args, "--json"], env=env or cli.env, cwd=tmp_path,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint,
    )  # fmt: skip
    partials = lambda: list((tmp_path / "artifacts").glob("model-*.partial.pt"))  # noqa: E731
    wait_for(partials, process)
    return args, process


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stopped_run_ends_in_a_final_state_in_the_api(cli, tmp_path, signum, code):
    _, process = start_training(cli, tmp_path)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == code, stderr
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] in ("featuresum: error: interrupted", "featuresum: error: terminated")

    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    with api_client(Path(cli.env["PREFECT_HOME"])) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=["cli-train"])))
        [run] = [run for run in runs if run.parameters.get("artifacts_dir") == str(tmp_path / "artifacts")]
        assert run.state.name in ("Crashed", "Cancelled"), run.state
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [run.id]}))
        assert task_runs and all(task_run.state.is_final() for task_run in task_runs)
        assert any(task_run.state.name in ("Crashed", "Cancelled") for task_run in task_runs)


def test_a_server_dying_mid_training_ends_the_run_promptly_and_the_next_run_resumes(cli, tmp_path):
    home = tmp_path / "home"
    env = {**cli.env, "PREFECT_HOME": str(home)}
    try:
        args, process = start_training(cli, tmp_path, env)
        server = local_server.server_status(home)
        os.killpg(server["pid"], signal.SIGKILL)
        killed = time.monotonic()
        stdout, stderr = process.communicate(timeout=120)
        took = time.monotonic() - killed
        assert process.returncode == 1, stderr
        assert took < 30, took
        assert "Traceback" not in stderr, stderr
        assert "stopped answering" in stderr.strip().splitlines()[-1]
        [partial] = (tmp_path / "artifacts").glob("model-*.partial.pt")
        finished = torch.load(partial, weights_only=True)["epoch"]

        again = subprocess.run(
            [cli.executable, *args, "--json"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600
        )
        assert again.returncode == 0, again.stderr
        summary = run_json(again)
        assert summary["start_epoch"] == finished >= 1
        assert summary["epochs_completed"] == 4
        assert local_server.server_status(home)["pid"] != server["pid"]
    finally:
        local_server.stop_local_server(home)

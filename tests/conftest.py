"""Shared fixtures: a Prefect test harness for in-process flows, a real local server for the CLI."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from featuresum.flows import runtime
from featuresum.tasks import data, training
from featuresum.tasks.checkpoint import save_checkpoint

runtime.quiet_defaults()
# Fixtures that start a Prefect API: a test that uses one belongs to the server tier.
SERVER_FIXTURES = {"harness", "prefect", "cli_home", "cli", "object_store"}


def pytest_collection_modifyitems(items):
    """Mark every test that needs a Prefect server, so `pytest -m "not server"` is the fast tier."""
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.server)


@pytest.fixture(scope="session")
def harness():
    """A temporary Prefect API for flows run inside the test process."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def prefect(harness, tmp_path):
    """The harness, with result storage (and so the task cache) private to this test."""
    from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings

    with temporary_settings({PREFECT_RESULTS_LOCAL_STORAGE_PATH: tmp_path / "results"}):
        yield


@pytest.fixture(scope="session")
def cli_home(tmp_path_factory):
    """A PREFECT_HOME whose local server the CLI starts on first use; stopped after the session."""
    home = tmp_path_factory.mktemp("prefect-home")
    yield home
    runtime.stop_local_server(home)


@pytest.fixture
def cli(cli_home, tmp_path):
    """Run the installed `featuresum` command in a subprocess, as a user does."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(cli_home)

    executable = str(Path(sys.executable).parent / "featuresum")

    def run(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
        command = [executable, *args]
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
        if check:
            assert result.returncode == 0, result.stderr
        return result

    run.env = env
    run.executable = executable
    run.cwd = tmp_path
    return run


def run_json(result: subprocess.CompletedProcess) -> dict:
    """The single JSON object a `--json` command printed on stdout."""
    return json.loads(result.stdout)


SMALL = ["--train-samples", "4000", "--holdout-samples", "1000", "--score-samples", "700", "--epochs", "2"]


def small_run_args(tmp: Path, *extra: str) -> list[str]:
    """`featuresum run` options for a fast run writing under `tmp`."""
    return ["run", *SMALL, "--data-dir", str(tmp / "data"), "--artifacts-dir", str(tmp / "artifacts"), *extra]


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """A real (briefly trained) checkpoint, made with the plain training code."""
    config = training.TrainConfig(epochs=1, batch_size=256, seed=0)
    shard = data.generate_shard(0, "train", 0, 2000)
    x, y = shard.features.T.contiguous(), shard.label
    state = training.new_training_state(config, 8, torch.device("cpu"))
    training.fit(state, (x, y), (x[:200], y[:200]), config)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_checkpoint(path, training.to_checkpoint(state, config, {"metrics": {}}))
    return path


@pytest.fixture(scope="session")
def object_store(tmp_path_factory):
    """A real S3 API (moto's server) on loopback, with AWS_* settings that reach it; stopped after the session."""
    from object_store import moto_server

    with moto_server(tmp_path_factory.mktemp("moto")) as store:
        yield store


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs: a real full disk (needs root, as in CI)."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        if os.environ.get("FEATURESUM_REQUIRE_ALL") == "1":
            pytest.fail("a full-disk test needs root to mount a tmpfs")
        pytest.skip("a full-disk test needs root to mount a tmpfs")
    mount = tmp_path / "tiny"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", str(mount)], check=True)

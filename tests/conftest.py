"""Shared fixtures: a Prefect test harness for in-process flows, a real local server for the CLI.

The suite never touches the files of the person running it: it runs in a temporary working folder
with a PREFECT_HOME of its own and none of the caller's PREFECT_* settings, and fails if anything
under the checkout's data/ and artifacts/ or the caller's PREFECT_HOME changed while it ran.
"""

import atexit
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent
CALLER_HOME = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()
for name in [name for name in os.environ if name.startswith("PREFECT_")]:
    del os.environ[name]
SUITE_HOME = Path(tempfile.mkdtemp(prefix="featuresum-tests-"))
atexit.register(shutil.rmtree, SUITE_HOME, ignore_errors=True)  # in every process that imports this file
os.environ["PREFECT_HOME"] = str(SUITE_HOME / "prefect-home")
# torch on one thread in the tests and every command they start: four workers on a machine of two
# cores would otherwise run several threads per core, and spend a quarter of the suite's time on it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from featuresum.flows import local_server  # noqa: E402
from featuresum.tasks import data, training  # noqa: E402
from featuresum.tasks.checkpoint import save_checkpoint  # noqa: E402

local_server.quiet_defaults()
# Fixtures that start a Prefect API: a test that uses one belongs to the server tier.
SERVER_FIXTURES = {"harness", "prefect", "cli_home", "cli", "object_store"}


# The date every pipeline run in the tests processes (given explicitly, so no result depends on the
# day the suite runs); a test about the default date compares with the day it runs instead.
DAY = "2026-03-02"
# A running server of the caller's rewrites these files on its own; its flow runs are counted instead.
SERVER_FILES = {"prefect.db", "prefect.db-wal", "prefect.db-shm", "prefect.db-journal"}


def _snapshot(root: Path, skip: set[str] = frozenset()) -> dict[str, str]:
    """{relative path: content hash} of every file under `root` (nothing when it does not exist)."""
    files = {}
    for path in sorted(root.rglob("*")) if root.is_dir() else ():
        if path.is_file() and path.name not in skip and not path.name.startswith(local_server.SERVER_LOG):
            files[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def _flow_runs(home: Path) -> int | None:
    """How many flow runs the caller's local Prefect database holds, read without writing to it."""
    database = home / "prefect.db"
    if not database.is_file():
        return None
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=30) as connection:
        try:
            return connection.execute("SELECT count(*) FROM flow_run").fetchone()[0]
        except sqlite3.OperationalError:  # no tables yet
            return None


def _caller_state() -> dict[str, object]:
    state = {folder: _snapshot(CHECKOUT / folder) for folder in ("data", "artifacts")}
    return {**state, "PREFECT_HOME": _snapshot(CALLER_HOME, SERVER_FILES), "flow runs": _flow_runs(CALLER_HOME)}


def pytest_configure(config):
    config.caller_state = _caller_state()


def pytest_sessionfinish(session):
    if hasattr(session.config, "workerinput"):  # an xdist worker: the controller checks once
        return
    before, after = session.config.caller_state, _caller_state()
    changed = [name for name in before if before[name] != after[name]]
    if changed:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        where = {"data": CHECKOUT / "data", "artifacts": CHECKOUT / "artifacts", "PREFECT_HOME": CALLER_HOME}
        print(f"\nthe tests changed the caller's files: {', '.join(str(where.get(n, n)) for n in changed)}")


def pytest_collection_modifyitems(items):
    """Mark every test that needs a Prefect server, so `pytest -m "not server"` is the fast tier."""
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.server)


@pytest.fixture(scope="session", autouse=True)
def suite_working_folder(tmp_path_factory):
    """The servers and harness of the session start in the suite's own folder, not in the checkout."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path_factory.mktemp("session-cwd"))
        yield


@pytest.fixture(autouse=True)
def own_working_folder(suite_working_folder, tmp_path_factory, monkeypatch):
    """Each test starts in an empty folder of its own, so default relative paths are private to it."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


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
    local_server.stop_local_server(home)


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
SMALL += ["--date", DAY]


def small_run_args(tmp: Path, *extra: str) -> list[str]:
    """`featuresum run` options for a fast run writing under `tmp`."""
    return ["run", *SMALL, "--data-dir", str(tmp / "data"), "--artifacts-dir", str(tmp / "artifacts"), *extra]


def train_checkpoint(path: Path, seed: int) -> Path:
    """A real (briefly trained) checkpoint, made with the plain training code."""
    config = training.TrainConfig(epochs=1, batch_size=256, seed=seed)
    shard = data.generate_shard(seed, "train", 0, 2000)
    x, y = shard.features.T.contiguous(), shard.label
    state = training.new_training_state(config, 8, torch.device("cpu"))
    training.fit(state, (x, y), (x[:200], y[:200]), config)
    save_checkpoint(path, training.to_checkpoint(state, config, {"metrics": {}}))
    return path


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """A real (briefly trained) checkpoint."""
    return train_checkpoint(tmp_path_factory.mktemp("model") / "model.pt", seed=0)


def score_at_once_into_one_output(cli, models, rows, local_rows, output, artifacts_dir):
    """`featuresum score` with each model into one `--output`, all at the same time, and what must hold:
    each command ends with its own model's numbers (in --json and the monitoring history) or one error
    line, at least one succeeds, and the output holds one model's predictions whole."""
    from featuresum.tasks import monitoring, scoring, storage
    from featuresum.tasks.checkpoint import load_checkpoint, model_from_checkpoint

    expected = {}
    for model in models:
        summary = scoring.ScoreSummary()
        network = model_from_checkpoint(load_checkpoint(model), torch.device("cpu"))
        predictions = scoring.score_batches(
            network, storage.iter_feature_batches(local_rows), torch.device("cpu"), summary
        )
        table = pa.Table.from_batches(list(predictions))
        confidence = float(table.column("confidence").to_numpy().astype("float64").mean())
        expected[str(model)] = (summary.accuracy, table.column("predicted_class").to_pylist(), confidence)
    common = ["--input", str(rows), "--output", str(output), "--artifacts-dir", str(artifacts_dir)]
    common += ["--shard-rows", "500"]
    processes = [
        subprocess.Popen(
            [cli.executable, "score", "--model", str(model), *common, "--json"],
            env=cli.env,
            cwd=cli.cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for model in models
    ]
    succeeded, ours = 0, {}
    for model, process in zip(models, processes, strict=True):
        stdout, stderr = process.communicate(timeout=600)
        assert "Traceback" not in stderr, stderr
        if process.returncode != 0:
            assert process.returncode == 1, stderr
            assert [line for line in stderr.splitlines() if line.startswith("featuresum: error:")] == [
                stderr.strip().splitlines()[-1]
            ], stderr
            continue
        succeeded += 1
        summary = json.loads(stdout)
        assert summary["metrics"]["score_accuracy"] == pytest.approx(expected[str(model)][0])
        ours[summary["flow_run_id"]] = (expected[str(model)][0], expected[str(model)][2])
    assert succeeded >= 1
    # The history's figures read from the predictions file are those of the run's own model.
    history = monitoring.read_history(artifacts_dir)
    recorded = {row["flow_run_id"]: (row["accuracy"], row["mean_confidence"]) for row in history}
    for run, (accuracy, confidence) in ours.items():
        assert recorded[run][0] == pytest.approx(accuracy) and recorded[run][1] == pytest.approx(confidence, rel=1e-5)
    written = pq.ParquetFile(storage.open_input(storage.at(str(output)))).read().column("predicted_class").to_pylist()
    assert written in [classes for _, classes, _ in expected.values()]


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

"""The pipeline against a real `prefect server start`: runs, artifacts, serve, prefect.yaml, auth.

What the database stores (runs, task runs, artifacts, schedules, events and automations) is tested
once on SQLite and once on PostgreSQL (FEATURESUM_TEST_POSTGRES_URL, a database the tests may create
others next to); what only featuresum's own code decides (run dates, backfills, stopping serve) on
SQLite alone. Each backend gets one server for the whole module.
"""

import asyncio
import base64
import json
import math
import urllib.request
import uuid
from contextlib import contextmanager
from datetime import UTC
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from prefect_servers import (
    UUID,
    clean_environment,
    http_status,
    prefect_server,
    require_service,
    run_command,
    serve_command,
    stop_process_group,
    wait_until,
)

from featuresum.tasks.registry import Registry

pytestmark = pytest.mark.server

REPO = Path(__file__).resolve().parents[1]
SMALL = {"train_samples": 4000, "holdout_samples": 1000, "score_samples": 700, "epochs": 2}
TINY = {"train_samples": 2000, "holdout_samples": 500, "score_samples": 300, "epochs": 1}
SERVED = "served-retraining"
CRON = "0 3 * * *"
TIMEZONE = "Europe/Berlin"
RUN_TIMEOUT = 300.0


def options(sizes: dict[str, int]) -> list[str]:
    """`featuresum` options for the given sizes."""
    return [arg for key, value in sizes.items() for arg in (f"--{key.replace('_', '-')}", str(value))]


def deployment_parameters(sizes: dict[str, int | str]) -> list[str]:
    """`prefect deployment run` options for the given parameters."""
    return [arg for key, value in sizes.items() for arg in ("-p", f"{key}={value}")]


@contextmanager
def postgres_database(url: str):
    """A fresh database next to the one in `url`, dropped afterwards, so every run starts empty."""
    import asyncpg
    from sqlalchemy.engine import make_url

    admin = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    name = f"featuresum_test_{uuid.uuid4().hex[:12]}"

    async def execute(statement: str) -> None:
        connection = await asyncpg.connect(admin)
        try:
            await connection.execute(statement)
        finally:
            await connection.close()

    asyncio.run(execute(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(url).set(database=name).render_as_string(hide_password=False)
    finally:
        asyncio.run(execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


# For tests of featuresum's own logic, which no database backend changes.
SQLITE_ONLY = pytest.mark.parametrize("server", ["sqlite"], indirect=True)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def server(request, tmp_path_factory):
    """One Prefect server per database backend for the whole module."""
    home = tmp_path_factory.mktemp(f"prefect-{request.param}")
    if request.param == "sqlite":
        with prefect_server(home) as server:
            yield server
        return
    url = require_service("FEATURESUM_TEST_POSTGRES_URL", "PostgreSQL database")
    with postgres_database(url) as database_url, prefect_server(home, database_url=database_url) as server:
        yield server


@pytest.fixture
def client(server):
    from prefect.client.orchestration import get_client

    with server.settings(), get_client(sync_client=True) as client:
        yield client


def final_task_runs(client, flow_run_id, count: int) -> list:
    """The task runs of a finished flow run, once exactly `count` are recorded, all in a final state.

    Task runs reach the server as events, after the flow run itself has finished.
    """
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    runs_filter = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))

    def recorded():
        runs = client.read_task_runs(flow_run_filter=runs_filter)
        assert len(runs) <= count, [r.name for r in runs]
        return runs if len(runs) == count and all(r.state and r.state.is_final() for r in runs) else None

    return wait_until(recorded, 120, f"the {count} final task runs of flow run {flow_run_id}")


# A fresh pipeline run: generate train, held-out and score sets, train, score one shard, combine, monitor.
PIPELINE_TASK_RUNS = 7
# Modules named like featuresum's own folders, in the folder a command runs from: they must not shadow it.
SHADOWS = {"tasks.py": "raise ImportError('a project tasks.py was imported')\n", "flows.py": "raise ImportError('x')\n"}


def shadowed_folder(folder: Path) -> Path:
    """`folder`, holding a tasks.py and a flows.py of its own, as many projects do."""
    for name, text in SHADOWS.items():
        (folder / name).write_text(text)
    return folder


def finished_flow_run(client, flow_run_id, timeout: float = RUN_TIMEOUT):
    """The flow run once it is in a final state."""

    def final():
        run = client.read_flow_run(flow_run_id)
        return run if run.state and run.state.is_final() else None

    return wait_until(final, timeout, f"flow run {flow_run_id} to finish", interval=1)


def artifacts_by_key(client, flow_run_id) -> dict:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    found = client.read_artifacts(
        artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
    )
    return {artifact.key or artifact.type: artifact for artifact in found}


def trigger(server, deployment: str, parameters: dict, cwd: Path, *options: str) -> str:
    """Run `prefect deployment run` as a user does; returns the new flow run's id."""
    result = run_command(
        "prefect", "deployment", "run", deployment, *deployment_parameters(parameters), *options,
        env=server.client_env, cwd=cwd,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return UUID.search(result.stdout.split("UUID:", 1)[1]).group()


# --- One-off runs through the CLI ----------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_run(server, tmp_path_factory):
    """`featuresum run --json` with small sizes against the server; its JSON summary."""
    work = shadowed_folder(tmp_path_factory.mktemp("cli-run"))
    dirs = ["--data-dir", str(work / "data"), "--artifacts-dir", str(work / "artifacts")]
    result = run_command("featuresum", "run", "--json", *options(SMALL), *dirs, env=server.client_env, cwd=work)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_cli_run_is_recorded_with_its_task_runs(client, cli_run):
    run = client.read_flow_run(cli_run["flow_run_id"])
    assert run.state.name == "Completed"
    assert run.name == f"pipeline-{cli_run['run_date']}-seed0"
    assert f"date-{cli_run['run_date']}" in run.tags
    assert {"featuresum", "cli-run", "seed-0"} <= set(run.tags)
    task_runs = final_task_runs(client, run.id, len(cli_run["task_states"]))
    assert {r.name: r.state.name for r in task_runs} == cli_run["task_states"]
    assert all(r.state.is_completed() for r in task_runs)


def test_cli_run_artifacts_hold_the_runs_figures(client, cli_run):
    artifacts = artifacts_by_key(client, cli_run["flow_run_id"])

    history = json.loads(artifacts["featuresum-training-history"].data)
    assert [row["epoch"] for row in history] == list(range(1, SMALL["epochs"] + 1))
    assert all(math.isfinite(row["train_loss"]) and row["train_loss"] > 0 for row in history)
    assert all(0.0 <= row["val_accuracy"] <= 1.0 for row in history)
    assert history[-1]["train_loss"] == pytest.approx(cli_run["metrics"]["train_loss"], abs=1e-4)

    report = artifacts["featuresum-training-report"].data
    assert f"**{cli_run['metrics']['val_accuracy']:.4f}**" in report
    assert f"on {SMALL['holdout_samples']} rows" in report
    assert cli_run["checkpoint"] in report

    predictions = artifacts["featuresum-predictions"]
    histogram = json.loads(predictions.data)
    assert [row["predicted_class"] for row in histogram] == list(range(10))
    assert sum(row["rows"] for row in histogram) == SMALL["score_samples"] == cli_run["predicted_rows"]
    assert cli_run["predictions"] in predictions.description
    assert f"{cli_run['metrics']['score_accuracy']:.4f}" in predictions.description

    assert float(artifacts["progress"].data) == 100.0

    (monitored,) = json.loads(artifacts["featuresum-monitoring"].data)
    assert (monitored["run_date"], monitored["level"]) == (cli_run["run_date"], cli_run["drift"]["level"])
    assert monitored["rows"] == SMALL["score_samples"]


def drift_events(server) -> list[dict]:
    """The featuresum.drift.detected events the server holds, read back from its events API."""
    body = json.dumps({"filter": {"event": {"name": ["featuresum.drift.detected"]}}, "limit": 50}).encode()
    request = urllib.request.Request(
        f"{server.api_url}/events/filter", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)["events"]


def test_an_undrifted_batch_is_monitored_and_emits_no_event(server, cli_run):
    assert cli_run["drift"]["level"] == "ok" and cli_run["drift"]["feature_sum_psi"] < 0.1
    run_resource = f"prefect.flow-run.{cli_run['flow_run_id']}"
    related = [resource["prefect.resource.id"] for event in drift_events(server) for resource in event["related"]]
    assert run_resource not in related


# --- featuresum serve ----------------------------------------------------------------------------


def serving(server, work: Path, name: str, *extra: str):
    """`featuresum serve` of the small pipeline on the test cron, without catching up; see `serve_command`."""
    settings = ["--cron", CRON, "--timezone", TIMEZONE, *options(SMALL), "--data-dir", "data", "--artifacts-dir"]
    return serve_command(server, work, name, *settings, "artifacts", "--catch-up", "0", *extra)


@pytest.fixture(scope="module")
def served(server, tmp_path_factory):
    """`featuresum serve` from a folder with modules of its own; yields (process, its folder, the deployment)."""
    work = shadowed_folder(tmp_path_factory.mktemp("served"))
    with serving(server, work, SERVED, "--retrain-on-drift") as (process, deployment):
        yield process, work, deployment


def test_serve_creates_the_cron_deployment(served):
    _, work, deployment = served
    (schedule,) = deployment.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone, schedule.active) == (CRON, TIMEZONE, True)
    assert deployment.paused is False
    assert deployment.entrypoint == "featuresum.flows.pipeline.pipeline_flow"
    assert {"featuresum", "scheduled"} <= set(deployment.tags)
    assert deployment.parameters == {
        **SMALL,
        "batch_size": 256,
        "lr": 0.003,
        "weight_decay": 0.1,
        "schedule": "onecycle",
        "seed": 0,
        "shuffle_rows": 131072,
        "train_memory_mb": None,
        # Folders are made absolute where serve starts, since runs execute in subprocesses.
        "data_dir": str(work / "data"),
        "artifacts_dir": str(work / "artifacts"),
        "window_days": 1,
        "drift": 0.0,
        "init": "scratch",
        "device": "auto",
        "min_improvement": 0.0,
        "drift_warn": 0.1,
        "drift_alert": 0.25,
        "shard_rows": 262144,
        "refresh": False,
        "keep_days": None,
    }


def test_server_schedules_runs_at_the_cron_time_in_the_timezone(client, served):
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateName,
    )

    deployment = served[2]
    upcoming = FlowRunFilter(state=FlowRunFilterState(name=FlowRunFilterStateName(any_=["Scheduled"])))
    only_this = DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))

    def scheduled():
        return client.read_flow_runs(flow_run_filter=upcoming, deployment_filter=only_this)

    runs = wait_until(scheduled, 120, "the server to schedule runs of the deployment", interval=2)
    local_times = sorted(run.expected_start_time.astimezone(ZoneInfo(TIMEZONE)) for run in runs)
    assert all((t.hour, t.minute) == (3, 0) for t in local_times), local_times
    assert len({t.date() for t in local_times}) == len(local_times)
    assert all(run.parameters == {} or run.parameters == deployment.parameters for run in runs)


@SQLITE_ONLY
def test_runs_for_two_scheduled_dates_train_two_versions_one_at_a_time(server, client, served):
    """Each run processes the date it was scheduled for (both are already due, so both start now)."""
    process, work, deployment = served
    days = ["2026-05-01", "2026-05-02"]
    run_ids = [
        trigger(server, f"featuresum-pipeline/{SERVED}", TINY, work, "--start-at", f"{day} 03:00:00 UTC")
        for day in days
    ]
    runs = sorted((finished_flow_run(client, run_id) for run_id in run_ids), key=lambda run: run.start_time)

    for run in runs:
        assert run.state.name == "Completed", run.state.message
        assert run.deployment_id == deployment.id
        day = run.expected_start_time.astimezone(UTC).date().isoformat()
        assert run.name == f"pipeline-{day}-seed0"
        assert {f"date-{day}", "scheduled"} <= set(run.tags)
        assert run.parameters["data_dir"] == str(work / "data")
    # The first run finds no champion; the second is gated against the first (one more task run).
    for run, count in zip(runs, (PIPELINE_TASK_RUNS, PIPELINE_TASK_RUNS + 1), strict=True):
        task_runs = final_task_runs(client, run.id, count)
        assert all(r.state.is_completed() for r in task_runs), [(r.name, r.state.name) for r in task_runs]
    # Both runs were due at once; the serve process (limit 1) ran them one after the other.
    first, second = runs
    assert first.end_time <= second.start_time, [(r.start_time, r.end_time) for r in runs]
    assert process.poll() is None

    registry = Registry(work / "artifacts")
    versions = [version for version in registry.versions() if version.flow_run_id in {str(run.id) for run in runs}]
    assert sorted(version.run_date for version in versions) == days
    history = registry.history()
    assert history[0].reason == "first model: there was no champion"
    assert [change.previous for change in history] == [None, *[change.version for change in history[:-1]]]


@SQLITE_ONLY
def test_a_backfill_on_the_served_deployment_runs_each_date_once(server, client, served):
    process, work, _ = served
    command = [
        "backfill",
        "--deployment",
        f"featuresum-pipeline/{SERVED}",
        "--from",
        "2026-05-03",
        "--to",
        "2026-05-04",
    ]
    result = run_command("featuresum", *command, "--json", env=server.client_env, cwd=work)
    assert result.returncode == 0, result.stderr
    backfilled = json.loads(result.stdout)
    assert [(run["run_date"], run["state"]) for run in backfilled["runs"]] == [
        ("2026-05-03", "Completed"),
        ("2026-05-04", "Completed"),
    ]
    registry = Registry(work / "artifacts")
    by_run = {version.flow_run_id: version for version in registry.versions()}
    assert [by_run[run["flow_run_id"]].run_date for run in backfilled["runs"]] == ["2026-05-03", "2026-05-04"]
    assert [run["model_version"] for run in backfilled["runs"]] == [
        by_run[run["flow_run_id"]].version for run in backfilled["runs"]
    ]
    assert backfilled["champion_version"] == registry.alias().version
    assert {run["drift"]["level"] for run in backfilled["runs"]} <= {"ok", "warn"}
    assert [run["ui"] for run in backfilled["runs"]] == [
        f"{server.url}/runs/flow-run/{run['flow_run_id']}" for run in backfilled["runs"]
    ]

    # Repeated: every date has its completed run, and no new run is created.
    again = json.loads(run_command("featuresum", *command, "--json", env=server.client_env, cwd=work).stdout)
    assert [run["state"] for run in again["runs"]] == ["Skipped", "Skipped"]
    assert [run["flow_run_id"] for run in again["runs"]] == [run["flow_run_id"] for run in backfilled["runs"]]

    # Prefect's runner, stopped while a run's process is still exiting, sets the Completed run Cancelled:
    # its date is still done.
    from prefect.states import Cancelled

    client.set_flow_run_state(backfilled["runs"][0]["flow_run_id"], Cancelled(message="Runner is shutting down."))
    assert client.read_flow_run(backfilled["runs"][0]["flow_run_id"]).state.is_cancelled()
    again = json.loads(run_command("featuresum", *command, "--json", env=server.client_env, cwd=work).stdout)
    assert [run["state"] for run in again["runs"]] == ["Skipped", "Skipped"]

    # Every date once more; repeated (after an interruption, say), that finds its runs instead of adding more.
    every = [*command, "--reprocess", "all", "--json"]
    rerun = json.loads(run_command("featuresum", *every, env=server.client_env, cwd=work).stdout)
    assert [run["state"] for run in rerun["runs"]] == ["Completed", "Completed"]
    assert not {run["flow_run_id"] for run in rerun["runs"]} & {run["flow_run_id"] for run in backfilled["runs"]}
    repeated = json.loads(run_command("featuresum", *every, env=server.client_env, cwd=work).stdout)
    assert [run["flow_run_id"] for run in repeated["runs"]] == [run["flow_run_id"] for run in rerun["runs"]]
    assert process.poll() is None


@SQLITE_ONLY
def test_a_drifted_batch_emits_the_event_and_the_trigger_retrains_for_its_date(server, client, served):
    """serve --retrain-on-drift: an alert on a batch scored with the deployment's models starts a retraining run."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter, FlowRunFilterTags

    process, work, deployment = served
    day = "2026-06-02"
    folders = ["--data-dir", "data", "--artifacts-dir", "artifacts"]

    def featuresum(*args: str) -> dict:
        result = run_command("featuresum", *args, *folders, "--json", env=server.client_env, cwd=work)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    sizes = {key: value for key, value in TINY.items() if key != "score_samples"}
    featuresum("train", *options(sizes), "--date", "2026-06-01")
    # Every feature's mean 0.002 higher per day since 2026-01-01: far from the champion's undrifted training rows.
    scored = featuresum("score", "--model", "champion", "--samples", "300", "--date", day, "--drift", "0.002")
    assert scored["drift"]["level"] == "alert"

    def emitted():
        return [event for event in drift_events(server) if event["payload"]["batch"] == scored["score_input"]]

    (event,) = wait_until(emitted, 60, "the drift event to reach the server")
    assert event["resource"]["prefect.resource.id"] == f"featuresum.model.{scored['model_version']}"
    assert event["resource"]["featuresum.artifacts-dir"] == str(work / "artifacts")
    assert event["resource"]["featuresum.scored-by"] == "score"
    assert event["payload"]["date"] == day and event["payload"]["level"] == "alert"
    assert event["payload"]["feature_sum_psi"] == pytest.approx(scored["drift"]["feature_sum_psi"])
    assert f"prefect.flow-run.{scored['flow_run_id']}" in {r["prefect.resource.id"] for r in event["related"]}

    only_this = DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
    retraining = FlowRunFilter(tags=FlowRunFilterTags(all_=["retrain-on-drift", f"date-{day}"]))
    started = lambda: client.read_flow_runs(flow_run_filter=retraining, deployment_filter=only_this)  # noqa: E731
    (run,) = wait_until(started, 120, "the trigger to start a retraining run", interval=1)
    run = finished_flow_run(client, run.id)
    assert run.state.name == "Completed", run.state.message
    assert run.parameters["run_date"] == day and run.created_by.type == "AUTOMATION"
    assert "scheduled" not in run.tags
    (version,) = [v for v in Registry(work / "artifacts").versions() if v.flow_run_id == str(run.id)]
    assert version.run_date == day
    assert process.poll() is None


@SQLITE_ONLY
def test_stopping_serve_pauses_the_schedule(server, client, tmp_path):
    with serving(server, tmp_path, "stopped-by-test") as (process, deployment):
        assert client.read_deployment(deployment.id).paused is False
        stop_process_group(process)
        assert process.returncode == 0
    wait_until(lambda: client.read_deployment(deployment.id).paused, 30, "the schedule to be paused")


# --- Basic auth ------------------------------------------------------------------------------------

AUTH = "featuresum:correct-horse-battery"


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """A SQLite-backed server that requires HTTP basic auth."""
    with prefect_server(tmp_path_factory.mktemp("prefect-auth"), auth=AUTH) as server:
        yield server


@pytest.fixture
def auth_client(auth_server):
    from prefect.client.orchestration import get_client

    with auth_server.settings(), get_client(sync_client=True) as client:
        yield client


def basic(credentials: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(credentials.encode()).decode()}


def test_auth_server_refuses_requests_without_the_credentials(auth_server):
    api = auth_server.api_url
    assert http_status(f"{api}/health") == 200
    assert http_status(f"{api}/flows/filter", data=b"{}") == 401
    assert http_status(f"{api}/flows/filter", data=b"{}", headers=basic("featuresum:wrong")) == 401
    assert http_status(f"{api}/flows/filter", data=b"{}", headers=basic(AUTH)) == 200


def test_cli_runs_against_the_auth_server_only_with_the_auth_string(auth_server, auth_client, tmp_path):
    dirs = ["--data-dir", str(tmp_path / "data"), "--artifacts-dir", str(tmp_path / "artifacts")]
    command = ["run", "--json", *options(TINY), *dirs]

    result = run_command("featuresum", *command, env=auth_server.client_env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert auth_client.read_flow_run(summary["flow_run_id"]).state.name == "Completed"
    task_runs = final_task_runs(auth_client, summary["flow_run_id"], len(summary["task_states"]))
    assert all(r.state.is_completed() for r in task_runs)

    anonymous = clean_environment(PREFECT_HOME=str(tmp_path / "anonymous"), PREFECT_API_URL=auth_server.api_url)
    refused = run_command("featuresum", *command, env=anonymous, cwd=tmp_path)
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.strip().splitlines() == [
        f"featuresum: error: the Prefect API at {auth_server.api_url} refused us (401); set PREFECT_API_AUTH_STRING"
    ]


# --- prefect.yaml and a process work pool ---------------------------------------------------------


def test_prefect_yaml_deploys_and_a_process_worker_runs_it(auth_server, auth_client, tmp_path):
    """The work-pool way, against the auth-protected server: deploy, worker and CLI all authenticate."""
    server, client = auth_server, auth_client

    def prefect(*args: str, cwd: Path = tmp_path, timeout: float = 600) -> str:
        result = run_command("prefect", *args, env=server.client_env, cwd=cwd, timeout=timeout)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    prefect("work-pool", "create", "featuresum", "--type", "process")
    # From the repository root, as README says; it records the root as the runs' working directory.
    prefect("--no-prompt", "deploy", "--all", cwd=REPO)

    deployment = client.read_deployment_by_name("featuresum-pipeline/scheduled-retraining")
    (schedule,) = deployment.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone, schedule.active) == (CRON, "UTC", True)
    assert deployment.work_pool_name == "featuresum"
    assert deployment.entrypoint == "flows/pipeline.py:pipeline_flow"
    assert deployment.parameters == {
        "seed": 0,
        "data_dir": "data",
        "artifacts_dir": "artifacts",
        "device": "auto",
        "refresh": False,
    }
    assert deployment.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
    assert deployment.global_concurrency_limit.limit == 1
    (automation,) = client.read_resource_related_automations(f"prefect.deployment.{deployment.id}")
    assert automation.name == "featuresum: retrain on drift (scheduled-retraining)"
    assert automation.trigger.expect == {"featuresum.drift.detected"}
    assert "{{ event.payload.date }}" in json.dumps(automation.actions[0].parameters["run_date"])

    dirs = {"data_dir": str(tmp_path / "data"), "artifacts_dir": str(tmp_path / "artifacts")}
    run_id = trigger(server, "featuresum-pipeline/scheduled-retraining", {**TINY, **dirs}, tmp_path)
    prefect("worker", "start", "--pool", "featuresum", "--run-once", timeout=RUN_TIMEOUT)
    run = finished_flow_run(client, run_id)
    assert run.state.name == "Completed", run.state.message
    assert run.work_pool_name == "featuresum"
    assert all(r.state.is_completed() for r in final_task_runs(client, run.id, PIPELINE_TASK_RUNS))
    assert len(list((tmp_path / "artifacts").glob("predictions-*.parquet"))) == 1

"""Running unattended, against a real `prefect server start`: catch-up, dead runs, notifications, champion events.

One SQLite-backed server for the module. Every client sends flow-run heartbeats every 30 s (the
least Prefect takes), so a run whose process is killed is marked Crashed within about 75 s.
"""

import contextlib
import json
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from prefect_servers import free_port, prefect_server, run_command, serve_command, wait_until

from featuresum.tasks.registry import Registry

pytestmark = pytest.mark.server

HEARTBEAT = {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"}
# Enough rows that a run is still training a few seconds after it starts, so it can be killed mid-run.
SIZES = ["--train-samples", "30000", "--holdout-samples", "1000", "--score-samples", "500", "--epochs", "1"]
FOLDERS = ["--data-dir", "data", "--artifacts-dir", "artifacts"]
CRON = ["--cron", "0 3 * * *", "--timezone", "UTC"]
# Heartbeat bound (75 s) plus the time the server's trigger service takes to see the silence.
CRASH_TIMEOUT = 180.0
RUN_TIMEOUT = 300.0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with prefect_server(tmp_path_factory.mktemp("operations-server")) as started:
        started.client_env.update(HEARTBEAT)
        yield started


@pytest.fixture
def client(server):
    from prefect.client.orchestration import get_client

    with server.settings(), get_client(sync_client=True) as client:
        yield client


def runs_of(client, deployment_id) -> list:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    only = DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
    return client.read_flow_runs(deployment_filter=only, sort=FlowRunSort.EXPECTED_START_TIME_ASC)


def catch_up_lines(log: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if line.startswith("catch-up ")]


def final(client, flow_run_id, timeout: float = RUN_TIMEOUT):
    def ended():
        run = client.read_flow_run(flow_run_id)
        return run if run.state and run.state.is_final() else None

    return wait_until(ended, timeout, f"flow run {flow_run_id} to end", interval=1)


def test_catch_up_runs_missed_dates_oldest_first_and_reruns_a_killed_one(server, client, tmp_path):
    from featuresum.flows.serve import cron_schedule, fire_times

    due = fire_times(cron_schedule("0 3 * * *", "UTC"), 3, datetime.now(UTC))
    days = [day.isoformat() for day in due]
    assert len(days) == 3
    options = [*CRON, *SIZES, *FOLDERS, "--catch-up", "3"]

    with serve_command(server, tmp_path, "caught-up", *options) as (process, deployment):
        created = [f"catch-up {day}: no completed run, created run pipeline-{day}-seed0" for day in days]
        assert catch_up_lines(tmp_path / "serve.log") == created
        runs = [run for run in runs_of(client, deployment.id) if "catch-up" in run.tags]
        assert [run.parameters["run_date"] for run in runs] == days
        assert [run.expected_start_time for run in runs] == list(due.values())

        # Kill serve and the run it executes, as a reboot would.
        def running():
            found = [client.read_flow_run(run.id) for run in runs]
            return next((run for run in found if run.state.is_running() and run.infrastructure_pid), None)

        killed = wait_until(running, RUN_TIMEOUT, "a catch-up run to start", interval=0.2)
        # serve first, so that it cannot report its run's death: only the missing heartbeats tell.
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
        with contextlib.suppress(ProcessLookupError):  # in serve's process group it is gone already
            os.kill(int(killed.infrastructure_pid.rpartition(":")[2]), signal.SIGKILL)  # host:pid

    killed = final(client, killed.id, CRASH_TIMEOUT)
    assert killed.state.name == "Crashed" and "no heartbeat for 75 s" in killed.state.message
    others = {
        run.parameters["run_date"]: client.read_flow_run(run.id).state.name for run in runs if run.id != killed.id
    }
    assert set(others.values()) <= {"Scheduled", "Late", "Completed"}, others  # Late: scheduled, past due

    with serve_command(server, tmp_path, "caught-up", *options) as (process, deployment):
        lines = dict(line.split(": ", 1) for line in catch_up_lines(tmp_path / "serve.log")[3:])
        assert list(lines) == [f"catch-up {day}" for day in days]
        for day in days:
            line = lines[f"catch-up {day}"]
            if day == killed.parameters["run_date"]:
                assert line.startswith("no completed run, created run"), lines
            else:
                told = "completed" if others[day] == "Completed" else "left to it"
                assert line.startswith("run ") and line.endswith(told), lines
        latest = {}
        for run in runs_of(client, deployment.id):
            if "catch-up" in run.tags and run.id != killed.id:
                latest[run.parameters["run_date"]] = run
        assert sorted(latest) == days
        ended = {day: final(client, run.id).state.name for day, run in latest.items()}
        assert ended == dict.fromkeys(days, "Completed")
        assert {v.run_date for v in Registry(tmp_path / "artifacts").versions()} == set(days)

    # A third start finds every date completed and creates no run (Prefect's scheduler may add
    # its own runs for future fire times: those carry no catch-up tag).
    before = [run.id for run in runs_of(client, deployment.id) if "catch-up" in run.tags]
    with serve_command(server, tmp_path, "caught-up", *options):
        lines = catch_up_lines(tmp_path / "serve.log")[6:]
        seen = [(r.name, r.parameters.get("run_date"), r.state.name, r.tags) for r in runs_of(client, deployment.id)]
        assert [line.split(": ", 1)[1].endswith(" completed") for line in lines] == [True] * 3, (lines, seen)
        assert [run.id for run in runs_of(client, deployment.id) if "catch-up" in run.tags] == before, seen


@contextmanager
def receiver() -> Iterator[tuple[str, list[dict]]]:
    """A local HTTP server that records the JSON body of every POST; yields (its URL, the bodies)."""
    received: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    http = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{http.server_port}/hook", received
    finally:
        http.shutdown()


PROMOTED = "featuresum.model.promoted"
FIELDS = {"event", "deployment", "flow_run_id", "flow_run_name", "run_date", "state", "message", "model_version", "ui"}


def test_notify_posts_a_failed_run_a_drift_alert_and_a_promotion_once_each(server, client, tmp_path):
    from prefect.deployments import run_deployment

    name = "featuresum-pipeline/notified"
    small = ["--train-samples", "3000", "--holdout-samples", "500", "--score-samples", "400", "--epochs", "1"]
    with receiver() as (url, received), server.settings():
        with serve_command(server, tmp_path, "notified", *CRON, *small, *FOLDERS, "--catch-up", "0", "--notify", url):
            good = run_deployment(name, parameters={"run_date": "2026-06-01"}, timeout=RUN_TIMEOUT)
            bad = run_deployment(name, parameters={"run_date": "2026-13-45"}, timeout=RUN_TIMEOUT)
            assert good.state.name == "Completed" and bad.state.is_final() and not bad.state.is_completed()
            # Every feature's mean 0.002 higher per day since 2026-01-01: far from the champion's training rows.
            drifted = ["--model", "champion", "--samples", "300", "--date", "2026-06-02", "--drift", "0.002", "--json"]
            scored = run_command("featuresum", "score", *drifted, *FOLDERS, env=server.client_env, cwd=tmp_path)
            assert scored.returncode == 0, scored.stderr
            scored = json.loads(scored.stdout)
            assert scored["drift"]["level"] == "alert"
            wait_until(lambda: len(received) >= 3, 120, "three notifications")
            time.sleep(10)  # and no more than one of each
        by_event = {body["event"]: body for body in received}
        assert len(received) == 3 and set(by_event) == {
            "featuresum.model.promoted", "featuresum.drift.detected", f"prefect.flow-run.{bad.state.name}",
        }, received  # fmt: skip
        assert all(set(body) == FIELDS and body["deployment"] == name for body in received)

        promoted = by_event["featuresum.model.promoted"]
        assert (promoted["flow_run_id"], promoted["run_date"], promoted["model_version"]) == (
            str(good.id),
            "2026-06-01",
            1,
        )
        assert promoted["ui"].endswith(f"/runs/flow-run/{good.id}")
        drift = by_event["featuresum.drift.detected"]
        assert (drift["flow_run_id"], drift["run_date"], drift["model_version"]) == (
            scored["flow_run_id"],
            "2026-06-02",
            1,
        )
        assert "drifted to level alert" in drift["message"]
        ended = by_event[f"prefect.flow-run.{bad.state.name}"]
        assert (ended["flow_run_id"], ended["flow_run_name"], ended["state"]) == (str(bad.id), bad.name, bad.state.name)
        assert ended["run_date"] == "2026-13-45" and ended["ui"].endswith(f"/runs/flow-run/{bad.id}")
        assert bad.state.name == "Failed" and "run_date '2026-13-45' is not a date" in ended["message"], ended
        assert bad.name == "pipeline-2026-13-45-seed0"

        names = {automation.name for automation in client.read_automations()}
        assert {n for n in names if n.endswith("(featuresum-pipeline/notified)")} and len(names) >= 4
        with serve_command(server, tmp_path, "notified", *CRON, *small, *FOLDERS, "--catch-up", "0"):
            left = {automation.name for automation in client.read_automations()}
        assert not {n for n in left if n.endswith("(featuresum-pipeline/notified)")}, left


def test_deployments_whose_names_differ_in_punctuation_notify_their_own_urls(server, client):
    import uuid

    from featuresum.flows import automations

    urls = {"featuresum-pipeline/x_1": "http://127.0.0.1:9/one", "featuresum-pipeline/x-1": "http://127.0.0.1:9/two"}
    for name, url in urls.items():
        automations.notify(client, str(uuid.uuid4()), name, "/somewhere", [url], "")
    for name, url in urls.items():
        for automation_name in automations._notify_names(name):
            (automation,) = client.read_automations_by_name(automation_name)
            (action,) = automation.actions
            block = client.read_block_document(action.block_document_id, include_secrets=True)
            assert block.data["url"] == url, (name, automation_name)
        automations.notify(client, "unused", name, "/somewhere", [], "")


def champion_events(server, folder: Path) -> list[dict]:
    """The champion events of one artifacts folder the server holds, oldest first, read from its events API."""
    import urllib.request

    names = ["featuresum.model.promoted", "featuresum.model.rolled-back"]
    since = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    body = {"filter": {"event": {"name": names}, "occurred": {"since": since}, "order": "ASC"}, "limit": 50}
    request = urllib.request.Request(
        f"{server.api_url}/events/filter", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        events = json.load(response)["events"]
    return [e for e in events if e["resource"].get("featuresum.artifacts-dir") == str(folder)]


def test_promote_and_rollback_by_hand_send_their_events(server, tmp_path):
    artifacts = tmp_path / "artifacts"
    registry = Registry(artifacts)
    for n in (1, 2):
        registry.register(f"model-{n}.pt", f"fp-{n}", config={}, metrics={"val_accuracy": 0.9 + n / 100})
    registry.set_alias(1, "first")

    def models(*args: str, env: dict) -> list[str]:
        result = run_command("featuresum", "models", *args, "--artifacts-dir", str(artifacts), env=env, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert "Still processing" not in result.stderr, result.stderr  # Prefect's drain chatter stays out
        return result.stderr.splitlines()

    assert (
        models("promote", "2", env=server.client_env)[-1] == f"event featuresum.model.promoted sent to {server.api_url}"
    )
    assert models("rollback", env=server.client_env)[-1].startswith("event featuresum.model.rolled-back sent to ")
    events = wait_until(lambda: len(champion_events(server, artifacts)) == 2 and champion_events(server, artifacts), 60,
                        "the two champion events")  # fmt: skip
    promoted, rolled_back = events
    assert promoted["event"] == "featuresum.model.promoted"
    assert {k: promoted["payload"][k] for k in ("old_version", "new_version", "old_accuracy", "new_accuracy")} == {
        "old_version": 1, "new_version": 2, "old_accuracy": 0.91, "new_accuracy": 0.92,
    }  # fmt: skip
    assert promoted["payload"]["reason"] == "promoted by hand"
    assert rolled_back["event"] == "featuresum.model.rolled-back"
    assert (rolled_back["payload"]["old_version"], rolled_back["payload"]["new_version"]) == (2, 1)
    assert rolled_back["payload"]["reason"] == "rolled back by hand"

    # --json says where the event went.
    promoted = run_command(
        "featuresum", "models", "promote", "2", "--json", "--artifacts-dir", str(artifacts), env=server.client_env,
        cwd=tmp_path,
    )  # fmt: skip
    report = json.loads(promoted.stdout)
    assert (report["version"], report["event"], report["event_sent_to"]) == (2, PROMOTED, server.api_url)

    # With no server configured and none of featuresum's running, the move is made and said to be unsent.
    alone = {k: v for k, v in server.client_env.items() if k != "PREFECT_API_URL"}
    alone["PREFECT_HOME"] = str(tmp_path / "no-server-home")
    assert re.fullmatch(
        r"no Prefect server is up: no featuresum\.model\.promoted event sent", models("promote", "1", env=alone)[-1]
    )
    assert Registry(artifacts).alias().version == 1

"""`featuresum backfill`: one run per date, oldest first; repeats run nothing; the registry ends as one-by-one runs."""

import json

from conftest import run_json

from featuresum.flows.backfill import dates_between, to_run
from featuresum.tasks import monitoring
from featuresum.tasks.registry import Registry

DATES = ["2026-04-01", "2026-04-02", "2026-04-03"]
TINY = ["--train-samples", "3000", "--holdout-samples", "800", "--score-samples", "300", "--epochs", "1"]


def folders(tmp_path, artifacts):
    return ["--data-dir", str(tmp_path / "data"), "--artifacts-dir", str(tmp_path / artifacts)]


def test_a_many_date_backfill_matches_running_the_dates_one_by_one(cli, tmp_path):
    command = ["backfill", "--from", DATES[0], "--to", DATES[-1], *TINY, *folders(tmp_path, "backfilled")]
    result = cli(*command, "--json")
    backfilled = json.loads(result.stdout)
    assert [run["run_date"] for run in backfilled["runs"]] == DATES
    assert {run["state"] for run in backfilled["runs"]} == {"Completed"}
    assert [run["model_version"] for run in backfilled["runs"]] == [1, 2, 3]
    assert backfilled["runs"][0]["promoted"] is True
    progress = [line for line in result.stderr.splitlines() if line.startswith("2026-04-")]
    assert [line.split(":")[0] for line in progress] == DATES
    # Each date's batch is monitored against the champion that scored it; the source does not drift.
    history = monitoring.read_history(tmp_path / "backfilled")
    assert [row["run_date"] for row in history] == DATES
    for run, row in zip(backfilled["runs"], history, strict=True):
        assert run["drift"] == {key: row[key] for key in ("feature_sum_psi", "predicted_class_psi", "level")}
        assert row["flow_run_id"] == run["flow_run_id"] and run["drift"]["level"] in ("ok", "warn")
    assert all(
        f"drift {run['drift']['level']} (" in line for run, line in zip(backfilled["runs"], progress, strict=True)
    )

    for day in DATES:
        summary = run_json(cli("run", *TINY, "--date", day, *folders(tmp_path, "one-by-one"), "--json"))
        assert summary["run_date"] == day
    one_by_one, filled = Registry(tmp_path / "one-by-one"), Registry(tmp_path / "backfilled")
    assert [(v.run_date, v.fingerprint) for v in filled.versions()] == [
        (v.run_date, v.fingerprint) for v in one_by_one.versions()
    ]
    assert filled.alias().version == one_by_one.alias().version == backfilled["champion_version"]
    assert [(c.version, c.previous) for c in filled.history()] == [
        (c.version, c.previous) for c in one_by_one.history()
    ]

    # Repeated, the backfill finds every date done and runs nothing.
    again = json.loads(cli(*command, "--json").stdout)
    assert {run["state"] for run in again["runs"]} == {"Skipped"}
    assert [run["flow_run_id"] for run in again["runs"]] == [run["flow_run_id"] for run in backfilled["runs"]]
    assert len(filled.versions()) == len(DATES)


def test_reprocess_decides_which_earlier_dates_run_again():
    from datetime import date
    from types import SimpleNamespace

    from prefect.states import Completed, Crashed, Failed, Running

    days = dates_between(date(2026, 4, 1), date(2026, 4, 5))
    assert days[0] == date(2026, 4, 1) and days[-1] == date(2026, 4, 5) and len(days) == 5
    earlier = {
        "2026-04-01": SimpleNamespace(state=Completed()),
        "2026-04-02": SimpleNamespace(state=Failed()),
        "2026-04-03": SimpleNamespace(state=Crashed()),
        "2026-04-04": SimpleNamespace(state=Running()),  # still in flight: left to it
    }
    assert to_run(days, earlier, "missing") == [days[1], days[2], days[4]]
    assert to_run(days, earlier, "failed") == [days[1], days[2]]
    assert to_run(days, earlier, "all") == days


def test_a_run_in_flight_whose_process_is_gone_counts_as_crashed():
    import os
    import socket
    import subprocess
    import sys
    from datetime import UTC, datetime
    from types import SimpleNamespace

    from prefect.states import Completed, Running

    from featuresum.flows.backfill import process_gone

    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host, now = socket.gethostname(), datetime.now(UTC)

    def run(pid, state=None, host=host, started=now):
        return SimpleNamespace(state=state or Running(), infrastructure_pid=f"{host}:{pid}", start_time=started)

    assert process_gone(run(ended.stdout.strip()))
    assert not process_gone(run(os.getpid(), started=now))  # in flight
    assert process_gone(run(os.getpid(), started=now.replace(year=2000)))  # the pid of a process started later
    assert not process_gone(run(ended.stdout.strip(), host="elsewhere"))  # another host: cannot tell
    assert not process_gone(run(ended.stdout.strip(), state=Completed()))
    assert not process_gone(SimpleNamespace(state=Running(), infrastructure_pid=None, start_time=now))


def test_a_backfill_killed_mid_date_reruns_that_date_when_repeated(cli, tmp_path):
    import signal
    import subprocess

    from test_killed_runs import wait_for

    # Enough rows and epochs that the first date is still training a while after its first epoch.
    sizes = ["--train-samples", "20000", "--holdout-samples", "800", "--score-samples", "300", "--epochs", "3"]
    command = ["backfill", "--from", DATES[0], "--to", DATES[1], *sizes, *folders(tmp_path, "artifacts")]
    process = subprocess.Popen([cli.executable, *command], env=cli.env, cwd=tmp_path, stderr=subprocess.PIPE)
    # Killed once the first date's model is training, with no word to the API: its run stays Running there.
    wait_for(lambda: list((tmp_path / "artifacts").glob("model-*.partial.pt")), process)
    process.send_signal(signal.SIGKILL)
    process.wait()

    again = json.loads(cli(*command, "--json").stdout)
    assert [(run["run_date"], run["state"]) for run in again["runs"]] == [(day, "Completed") for day in DATES[:2]]
    repeated = json.loads(cli(*command, "--reprocess", "failed", "--json").stdout)
    assert {run["state"] for run in repeated["runs"]} == {"Skipped"}
    # Every run, the ones run and the ones skipped, carries its page in the UI.
    for run, skipped in zip(again["runs"], repeated["runs"], strict=True):
        assert run["ui"].endswith(f"/runs/flow-run/{run['flow_run_id']}") and run["ui"].startswith("http://127.0.0.1:")
        assert skipped["ui"] == run["ui"]


def test_two_projects_with_relative_folders_on_one_server_keep_their_own_runs(cli, tmp_path):
    import subprocess

    for project in ("a", "b"):
        (tmp_path / project).mkdir()

    def featuresum(project, *args):
        result = subprocess.run(
            [cli.executable, *args], env=cli.env, cwd=tmp_path / project, capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, result.stderr
        return result

    featuresum("a", "run", *TINY, "--date", DATES[0])
    filled = json.loads(featuresum("b", "backfill", "--from", DATES[0], "--to", DATES[0], *TINY, "--json").stdout)
    assert [run["state"] for run in filled["runs"]] == ["Completed"]
    assert [v.run_date for v in Registry(tmp_path / "b" / "artifacts").versions()] == [DATES[0]]


def test_a_deployments_relative_folder_is_read_where_its_runs_work():
    from types import SimpleNamespace

    from featuresum.flows.cli.backfill import deployment_folder

    step = {"prefect.deployments.steps.set_working_directory": {"directory": "/srv/project"}}
    from_yaml = SimpleNamespace(pull_steps=[step], path=None)
    assert deployment_folder(from_yaml, "artifacts") == "/srv/project/artifacts"
    served = SimpleNamespace(pull_steps=None, path="/home/me/work")
    assert deployment_folder(served, "artifacts") == "/home/me/work/artifacts"
    assert deployment_folder(served, "/data/artifacts") == "/data/artifacts"
    assert deployment_folder(served, "s3://bucket/artifacts") == "s3://bucket/artifacts"


def test_an_option_an_earlier_run_was_not_given_counts_as_the_flows_default():
    from featuresum.flows.backfill import _same_options
    from featuresum.flows.presets import SHARD_ROWS

    assert _same_options({"seed": 0}, {"seed": 0, "shard_rows": SHARD_ROWS})
    assert not _same_options({"seed": 0}, {"seed": 0, "shard_rows": 1000})
    assert not _same_options({"seed": 1, "shard_rows": SHARD_ROWS}, {"seed": 0, "shard_rows": SHARD_ROWS})

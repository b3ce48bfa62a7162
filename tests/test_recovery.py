"""Faults: transient write errors are retried, bad input is not, concurrent runs coexist."""

import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import run_json, small_run_args
from test_flows import SMALL
from test_killed_runs import api_client

from featuresum.flows.pipeline import pipeline_flow, score_flow
from featuresum.tasks import data, storage
from featuresum.tasks.checkpoint import load_checkpoint
from featuresum.tasks.registry import Registry
from featuresum.tasks.storage import files


def task_runs(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {run.name: run for run in runs}


def test_transient_write_failure_is_retried(prefect, tmp_path, monkeypatch):
    real_replace, failures = os.replace, []

    def flaky_replace(src, dst):
        if str(dst).endswith(".parquet") and not failures:
            failures.append(dst)
            raise OSError(5, "Input/output error (injected)")
        return real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", flaky_replace)
    summary = pipeline_flow(**SMALL, data_dir=str(tmp_path / "d"), artifacts_dir=str(tmp_path / "a"))
    assert len(failures) == 1
    runs = task_runs(summary["flow_run_id"])
    assert runs[f"generate-train-{summary['run_date']}-{SMALL['train_samples']}rows-seed0"].run_count == 2
    assert {run.state.name for run in runs.values()} == {"Completed"}
    assert not list((tmp_path / "d").glob(".*.tmp"))


def test_bad_input_fails_once_without_retry(prefect, tmp_path):
    summary = pipeline_flow(**SMALL, data_dir=str(tmp_path / "d"), artifacts_dir=str(tmp_path / "a"))
    table = pq.read_table(summary["score_input"])
    column = table.column("f010").to_numpy().copy()
    column[3] = np.nan
    bad = tmp_path / "bad.parquet"
    pq.write_table(table.set_column(table.schema.get_field_index("f010"), "f010", [column]), bad)
    output = tmp_path / "predictions.parquet"

    with pytest.raises(storage.InputError, match="NaN"):
        score_flow(model=summary["checkpoint"], input=str(bad), output=str(output))

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName, TaskRunFilterStateName

    failed_shard = TaskRunFilter(
        name=TaskRunFilterName(any_=["score-shard-0"]), state={"name": TaskRunFilterStateName(any_=["Failed"])}
    )

    def failed_score_runs():
        with get_client(sync_client=True) as client:
            return client.read_task_runs(task_run_filter=failed_shard)

    deadline = time.monotonic() + 60
    while not failed_score_runs() and time.monotonic() < deadline:
        time.sleep(0.2)
    [run] = failed_score_runs()
    assert run.state.name == "Failed" and run.run_count == 1
    assert not output.exists()


def test_atomic_write_leaves_nothing_under_the_final_name(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError), storage.atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []


def start_runs(cli, tmp_path, *options: list[str]) -> list[subprocess.Popen]:
    """`featuresum run --json` with small sizes, once per list of options, all at the same time."""
    command = [cli.executable, *small_run_args(tmp_path), "--json"]
    return [
        subprocess.Popen(
            [*command, *extra], env=cli.env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for extra in options
    ]


def test_concurrent_runs_identical_or_not_all_succeed(cli, tmp_path):
    """Two identical runs at once (a scheduled and a manual one, say) and one with another seed."""
    processes = start_runs(cli, tmp_path, *(["--seed", str(seed)] for seed in (11, 11, 12)))
    summaries = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr
        summaries.append(run_json(subprocess.CompletedProcess([], 0, stdout, stderr)))
    for key in ("train_data", "checkpoint", "score_input", "predictions"):
        assert summaries[0][key] == summaries[1][key]
        assert summaries[2][key] != summaries[0][key]
    for summary in summaries:
        predictions = Path(summary["predictions"])
        manifest = json.loads(storage.manifest_path(predictions).read_text())
        assert storage.is_intact(predictions, manifest["key"])
        scored = pq.read_table(predictions)
        batch = pq.read_table(summary["score_input"], columns=["sample_id"])
        assert scored.column("sample_id").equals(batch.column("sample_id"))
        load_checkpoint(Path(summary["checkpoint"]))
        assert summary["epochs_completed"] == 2
    assert not list(tmp_path.rglob("*.partial.pt")) and not list(tmp_path.rglob("*.tmp"))
    assert not list(tmp_path.rglob("*.parts"))


def test_a_failed_run_has_its_task_runs_recorded_when_the_command_ends(cli, tmp_path):
    summary = run_json(cli(*small_run_args(tmp_path), "--json"))
    table = pq.read_table(summary["score_input"])
    column = table.column("f010").to_numpy().copy()
    column[3] = np.nan
    bad = tmp_path / "bad.parquet"
    pq.write_table(table.set_column(table.schema.get_field_index("f010"), "f010", [column]), bad)
    result = cli("score", "--model", summary["checkpoint"], "--input", str(bad), "--output", "p.parquet", check=False)
    assert result.returncode == 2, result.stderr
    assert "NaN" in result.stderr.strip().splitlines()[-1]

    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    # Read at once, with no waiting: the command itself waited until every task run was recorded.
    with api_client(Path(cli.env["PREFECT_HOME"])) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=["cli-score"])))
        [run] = [run for run in runs if run.parameters.get("input") == str(bad)]
        assert run.state.name == "Failed"
        states = {
            r.name: r.state.name for r in client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [run.id]}))
        }
        assert states["score-shard-0"] == "Failed"
        assert len(states) == 3 and sum(state == "Failed" for state in states.values()) == 1  # no write-predictions


def test_a_full_disk_ends_the_run_at_once_with_one_line(cli, tiny_disk, tmp_path):
    started = time.monotonic()
    result = cli("run", *small_run_args(tmp_path)[1:], "--data-dir", str(tiny_disk), check=False)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"featuresum: error: disk full: no space left in {tiny_disk}/train-"), last
    assert last.endswith("; free space or use another folder")
    assert time.monotonic() - started < 60  # no retries with backoff


def test_three_runs_for_different_dates_at_once_all_register(cli, tmp_path):
    days = ["2026-06-01", "2026-06-02", "2026-06-03"]
    processes = start_runs(cli, tmp_path, *(["--date", day] for day in days))
    summaries = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr
        summaries.append(run_json(subprocess.CompletedProcess([], 0, stdout, stderr)))
    registry = Registry(tmp_path / "artifacts")
    versions = registry.versions()
    assert sorted(v.run_date for v in versions) == days
    assert sorted(v.version for v in versions) == [1, 2, 3]
    assert sorted(summary["model_version"] for summary in summaries) == [1, 2, 3]
    assert registry.alias().version in {1, 2, 3}
    history = registry.history()
    assert [change.previous for change in history] == [None, *[change.version for change in history[:-1]]]


def test_two_scores_into_one_output_with_other_models_give_each_its_own_numbers(cli, checkpoint, tmp_path):
    from conftest import score_at_once_into_one_output, train_checkpoint

    rows = tmp_path / "rows.parquet"
    batches = [storage.shard_to_batch(shard) for shard in data.generate_dataset(3, "score", 3000)]
    pq.write_table(pa.Table.from_batches(batches), rows, row_group_size=500)
    models = [checkpoint, train_checkpoint(tmp_path / "other.pt", seed=1)]
    score_at_once_into_one_output(cli, models, rows, rows, tmp_path / "p.parquet", tmp_path / "artifacts")

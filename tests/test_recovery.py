"""Faults: transient write errors are retried, bad input is not, killed runs resume, concurrent runs coexist."""

import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import run_json, small_run_args
from test_flows import SMALL

from featuresum.flows.pipeline import pipeline_flow, score_flow
from featuresum.tasks import storage
from featuresum.tasks.checkpoint import load_checkpoint


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

    monkeypatch.setattr(storage.os, "replace", flaky_replace)
    summary = pipeline_flow(**SMALL, data_dir=str(tmp_path / "d"), artifacts_dir=str(tmp_path / "a"))
    assert len(failures) == 1
    runs = task_runs(summary["flow_run_id"])
    assert runs[f"generate-train-{SMALL['train_samples']}rows-seed0"].run_count == 2
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


def wait_for(predicate, process, timeout=300):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_killed_training_resumes_from_its_last_epoch(cli, tmp_path):
    args = [
        "train", "--train-samples", "40000", "--holdout-samples", "1000", "--epochs", "5", "--batch-size", "64",
        "--data-dir", str(tmp_path / "data"), "--artifacts-dir", str(tmp_path / "artifacts"),
    ]  # fmt: skip
    command = [cli.executable, *args, "--json"]
    process = subprocess.Popen(command, env=cli.env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        # First kill: while the training set is being written, before it is renamed into place.
        wait_for(lambda: list((tmp_path / "data").glob(".train-*.tmp")), process)
        process.send_signal(signal.SIGKILL)
        process.wait()
    finally:
        process.kill()
    assert not list((tmp_path / "data").glob("train-*.parquet"))

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
    assert 1 <= killed_at < 5
    assert not list((tmp_path / "artifacts").glob("model-*[0-9a-f].pt"))

    summary = run_json(cli(*args, "--json"))
    assert summary["start_epoch"] == killed_at
    assert summary["epochs_completed"] == 5
    checkpoint = load_checkpoint(Path(summary["checkpoint"]))
    assert [h["epoch"] for h in checkpoint["history"]] == [1, 2, 3, 4, 5]
    assert not partials()


def test_concurrent_runs_with_different_seeds_all_succeed(cli, tmp_path):
    processes = [
        subprocess.Popen(
            [cli.executable, *small_run_args(tmp_path), "--seed", str(seed), "--json"],
            env=cli.env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for seed in (11, 12, 13)
    ]
    summaries = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr
        summaries.append(run_json(subprocess.CompletedProcess([], 0, stdout, stderr)))
    for key in ("train_data", "checkpoint", "score_input", "predictions"):
        assert len({summary[key] for summary in summaries}) == 3
    for summary in summaries:
        assert storage.is_intact(Path(summary["predictions"]))
        scored = pq.read_table(summary["predictions"])
        batch = pq.read_table(summary["score_input"], columns=["sample_id"])
        assert scored.column("sample_id").equals(batch.column("sample_id"))
        load_checkpoint(Path(summary["checkpoint"]))

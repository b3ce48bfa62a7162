"""The flows, run in-process against Prefect's test harness, checked through their Parquet outputs."""

import json
import logging

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import DAY

from featuresum.flows.pipeline import pipeline_flow, score_flow
from featuresum.tasks import data, monitoring, storage
from featuresum.tasks.checkpoint import load_checkpoint

# A fixed run date (conftest.DAY): no result depends on the day the suite runs.
SMALL = {
    "train_samples": 3000, "holdout_samples": 800, "score_samples": 600, "epochs": 2, "batch_size": 128, "run_date": DAY
}  # fmt: skip


def run_pipeline(tmp_path, **overrides):
    options = {**SMALL, "data_dir": str(tmp_path / "data"), "artifacts_dir": str(tmp_path / "artifacts")}
    return pipeline_flow(**{**options, **overrides})


def read_features(path):
    table = pq.read_table(path)
    features = np.stack([table.column(name).to_numpy() for name in storage.FEATURE_COLUMNS], axis=1)
    return table, features


@pytest.fixture
def first_run(prefect, tmp_path):
    return run_pipeline(tmp_path)


def test_pipeline_writes_consistent_parquet_outputs(first_run):
    train, train_features = read_features(first_run["train_data"])
    assert train.num_rows == SMALL["train_samples"]
    sums = torch.from_numpy(train_features.astype(np.float64).sum(axis=1))
    assert train.column("label").to_pylist() == data.label_rule(sums).tolist()

    batch, batch_features = read_features(first_run["score_input"])
    predictions = pq.read_table(first_run["predictions"])
    assert predictions.schema == storage.PREDICTIONS_SCHEMA
    assert predictions.num_rows == batch.num_rows == SMALL["score_samples"]
    assert predictions.column("sample_id").to_pylist() == batch.column("sample_id").to_pylist()
    np.testing.assert_allclose(
        predictions.column("feature_sum").to_numpy(), batch_features.astype(np.float64).sum(axis=1), rtol=1e-9
    )
    classes = predictions.column("predicted_class").to_numpy()
    assert classes.min() >= 0 and classes.max() < data.NUM_CLASSES
    confidence = predictions.column("confidence").to_numpy()
    assert ((confidence >= 1 / data.NUM_CLASSES) & (confidence <= 1)).all()
    expected_accuracy = (classes == batch.column("label").to_numpy()).mean()
    assert first_run["metrics"]["score_accuracy"] == pytest.approx(expected_accuracy)


def test_checkpoint_records_honest_held_out_metrics(first_run):
    checkpoint = load_checkpoint(storage.Path(first_run["checkpoint"]))
    assert checkpoint["epoch"] == SMALL["epochs"] == first_run["epochs_completed"]
    assert first_run["start_epoch"] == 0
    assert checkpoint["metrics"]["val_accuracy"] == first_run["metrics"]["val_accuracy"]
    assert checkpoint["metrics"]["holdout_rows"] == SMALL["holdout_samples"]
    assert checkpoint["data_fingerprint"] != checkpoint["holdout_fingerprint"]
    assert [h["epoch"] for h in checkpoint["history"]] == [1, 2]


def states(summary):
    return sorted(summary["task_runs"].values())


def test_rerun_is_served_from_cache(first_run, tmp_path):
    assert states(first_run) == ["Completed"] * 7
    again = run_pipeline(tmp_path)
    # The predictions file is still the one these inputs give, so no shard runs at all; monitoring always runs.
    assert states(again) == ["Cached"] * 5 + ["Completed"]
    assert {k: again[k] for k in ("checkpoint", "predictions")} == {
        k: first_run[k] for k in ("checkpoint", "predictions")
    }


def test_refresh_recomputes_everything_but_a_registered_model(first_run, tmp_path):
    outputs = [storage.Path(first_run[key]) for key in ("score_input", "predictions")]
    written = [path.stat().st_mtime_ns for path in outputs]
    model = storage.Path(first_run["checkpoint"])
    weights, model_written = model.read_bytes(), model.stat().st_mtime_ns
    again = run_pipeline(tmp_path, refresh=True)
    assert states(again) == ["Cached"] + ["Completed"] * 6
    # Every file was written again, not found and reused; the registered version's checkpoint is never rewritten.
    assert all(path.stat().st_mtime_ns > before for path, before in zip(outputs, written, strict=True))
    assert (model.read_bytes(), model.stat().st_mtime_ns) == (weights, model_written)
    assert again["model_version"] == 1


@pytest.mark.parametrize("damage", ["delete", "truncate", "replace"])
def test_damaged_output_is_recomputed_not_served_from_cache(first_run, tmp_path, damage):
    predictions = storage.Path(first_run["predictions"])
    original = predictions.read_bytes()
    if damage == "delete":
        predictions.unlink()
    elif damage == "truncate":
        predictions.write_bytes(original[: len(original) // 2])
    else:
        other = storage.Path(first_run["score_input"]).read_bytes()
        predictions.write_bytes(other)
    again = run_pipeline(tmp_path)
    assert sorted(again["task_runs"].values()) == ["Cached"] * 4 + ["Completed"] * 3
    assert predictions.read_bytes() == original


def test_other_settings_never_overwrite_outputs(first_run, tmp_path):
    other = run_pipeline(tmp_path, seed=1)
    for key in ("train_data", "checkpoint", "score_input", "predictions"):
        assert other[key] != first_run[key]
        assert storage.Path(first_run[key]).exists()


def test_score_flow_scores_a_user_file(first_run, tmp_path):
    output = tmp_path / "mine.parquet"
    scored = score_flow(model=first_run["checkpoint"], input=first_run["score_input"], output=str(output))
    assert pq.read_table(output).equals(pq.read_table(first_run["predictions"]))
    assert scored["metrics"]["score_accuracy"] == first_run["metrics"]["score_accuracy"]


def test_task_results_are_small_json_documents(first_run, tmp_path):
    records = [path for path in (tmp_path / "results").rglob("*") if path.is_file()]
    assert len(records) >= 6
    for record in records:
        assert record.stat().st_size < 20_000, record
        stored = json.loads(record.read_text())
        assert stored["metadata"]["serializer"]["type"] == "json"


def test_every_scored_batch_is_monitored_against_its_models_reference(first_run, tmp_path, caplog):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    reference = load_checkpoint(storage.Path(first_run["checkpoint"]))["reference"]
    assert len(reference["feature_sum_edges"]) == 9 and sum(reference["feature_sum_counts"]) == SMALL["train_samples"]
    assert sum(reference["predicted_class_counts"]) == SMALL["holdout_samples"]
    assert first_run["drift"]["level"] == "ok" and first_run["drift"]["feature_sum_psi"] < 0.1

    dirs = {"data_dir": str(tmp_path / "data"), "artifacts_dir": str(tmp_path / "artifacts")}
    batch = {"model": first_run["checkpoint"], "samples": 600, **dirs}
    # Every feature's mean 0.06 higher 30 days after 2026-01-01: the sums move by about 1.7 standard deviations.
    logs = {}
    for name, thresholds in (("alert", {}), ("warn", {"drift_warn": 0.5, "drift_alert": 50.0})):
        caplog.clear()
        logs[name] = (
            score_flow(**batch, run_date="2026-01-31", drift=0.002, **thresholds),
            [(record.levelno, record.getMessage()) for record in caplog.records if record.name == "prefect.task_runs"],
        )
    (drifted, alerted), (tolerant, warned) = logs["alert"], logs["warn"]
    assert drifted["drift"]["level"] == "alert" and drifted["drift"]["feature_sum_psi"] > 1.0
    # The same batch judged again with other thresholds: the same figures, this run's level.
    assert tolerant["drift"] == {**drifted["drift"], "level": "warn"}
    for level_name, lines in (("alert", alerted), ("warn", warned)):
        assert any(
            level == logging.WARNING and "Drift in the batch of 2026-01-31" in text and f"level {level_name}" in text
            for level, text in lines
        ), lines
    # The event was sent once, by the first run that found the batch at level alert.
    assert any("Sent featuresum.drift.detected for model version 1" in text for _, text in alerted)
    assert not any("featuresum.drift.detected" in text for _, text in warned)

    history = monitoring.read_history(tmp_path / "artifacts")
    assert [row["run_date"] for row in history] == ["2026-01-31", first_run["run_date"]]
    assert (history[0]["level"], history[0]["drift_alert"], history[0]["alerted"]) == ("warn", 50.0, True)
    assert history[0]["flow_run_id"] == tolerant["flow_run_id"]
    first = history[-1]
    assert first["flow_run_id"] == first_run["flow_run_id"] and first["model_version"] == 1
    assert first["rows"] == first["labelled_rows"] == SMALL["score_samples"] == first_run["labelled_rows"]
    assert first["predictions"] == first_run["predictions"]
    assert first["accuracy"] == pytest.approx(first_run["metrics"]["score_accuracy"])
    assert first["feature_sum_psi"] == pytest.approx(first_run["drift"]["feature_sum_psi"])
    assert history[0]["feature_sum_mean"] > 40

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[drifted["flow_run_id"]]))
        )
    by_key = {artifact.key: artifact for artifact in artifacts}
    table = json.loads(by_key["featuresum-monitoring"].data)
    assert [(row["run_date"], row["level"]) for row in table] == [
        ("2026-01-31", "alert"),
        (first_run["run_date"], "ok"),
    ]
    assert "| 2026-01-31 | 1 |" in by_key["featuresum-monitoring-chart"].data
    levels = by_key["featuresum-drift-levels"].data
    assert levels.index("| 2026-01-31 | 🔴 **alert** |") < levels.index(f"| {first_run['run_date']} | 🟢 ok |")

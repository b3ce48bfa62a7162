"""Monitoring's plain code: PSI, levels, references, batch figures, and the history file under concurrent writers."""

import json
import math
import multiprocessing
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from prefect.client.schemas.objects import CreatedBy
from test_cli_errors import featuresum, one_error_line

from featuresum.tasks import monitoring, storage
from featuresum.tasks.errors import InputError


def test_training_figures_match_numpy_in_any_chunking():
    rows = np.random.default_rng(3).normal(0.5, 2.0, (1000, 784)).astype(np.float32)
    sums, spread = monitoring.training_figures([rows[:300], rows[300:]], chunk_rows=64)
    np.testing.assert_allclose(sums, rows.astype(np.float64).sum(axis=1), rtol=1e-12)
    assert spread == pytest.approx(rows.astype(np.float64).std(axis=0, ddof=1).mean(), rel=1e-9)
    assert monitoring.training_figures([rows], chunk_rows=1000)[1] == pytest.approx(spread, rel=1e-12)


def test_psi_of_identical_histograms_is_zero_whatever_their_scale():
    assert monitoring.psi([10, 20, 70], [10, 20, 70]) == 0.0
    assert monitoring.psi([10, 20, 70], [1, 2, 7]) == pytest.approx(0.0, abs=1e-12)


def test_psi_of_known_histograms():
    # (0.9 - 0.5) ln(0.9 / 0.5) + (0.1 - 0.5) ln(0.1 / 0.5)
    assert monitoring.psi([50, 50], [90, 10]) == pytest.approx(0.4 * math.log(1.8) + 0.4 * math.log(5))
    assert monitoring.psi([0.25] * 4, [0.1, 0.2, 0.3, 0.4]) == pytest.approx(
        sum((a - 0.25) * math.log(a / 0.25) for a in (0.1, 0.2, 0.3, 0.4))
    )
    # PSI is symmetric in its two histograms.
    assert monitoring.psi([90, 10], [50, 50]) == pytest.approx(monitoring.psi([50, 50], [90, 10]))


def test_psi_floors_empty_bins_instead_of_going_infinite():
    floor = monitoring.SHARE_FLOOR
    # Shares (1, 0) and (0, 1) become (1, floor) and (floor, 1).
    expected = 2 * (1 - floor) * math.log(1 / floor)
    assert monitoring.psi([100, 0], [0, 100]) == pytest.approx(expected)


def test_psi_of_an_empty_histogram_is_none_and_mismatched_bins_are_refused():
    assert monitoring.psi([1, 2], [0, 0]) is None
    assert monitoring.psi([0, 0], [1, 2]) is None
    with pytest.raises(ValueError, match="2 and 3 bins"):
        monitoring.psi([1, 2], [1, 2, 3])


@pytest.mark.parametrize(
    ("psis", "level"),
    [
        ((0.0, 0.0), "ok"),
        ((0.0999, 0.05), "ok"),
        ((0.1, 0.0), "warn"),
        ((0.02, 0.25), "warn"),
        ((0.2501, 0.0), "alert"),
        ((0.01, 3.0), "alert"),
        ((None, 0.3), "alert"),
        ((None, None), "unknown"),
    ],
)
def test_level_is_judged_on_the_largest_psi(psis, level):
    assert monitoring.level(psis, 0.1, 0.25) == level


def test_levels_follow_the_thresholds_given():
    assert monitoring.level((0.15,), 0.2, 0.5) == "ok"
    assert monitoring.level((0.15,), 0.05, 0.1) == "alert"
    monitoring.check_thresholds(0.2, 0.2)
    with pytest.raises(InputError, match="--drift-warn 0.3 is above --drift-alert 0.2"):
        monitoring.check_thresholds(0.3, 0.2)


def test_reference_bins_are_the_deciles_of_the_training_sums():
    reference = monitoring.reference(np.arange(1000.0), 1.5, [3, 0, 7])
    assert reference["feature_sum_edges"] == pytest.approx(np.quantile(np.arange(1000.0), np.arange(1, 10) / 10))
    assert reference["feature_sum_counts"] == [100] * 10
    assert reference["predicted_class_counts"] == [3, 0, 7]
    assert reference["rows"] == 1000
    assert reference["feature_sum_mean"] == pytest.approx(499.5)
    assert reference["feature_std"] == 1.5
    # Plain JSON types: it travels in a checkpoint loaded with weights_only and in the registry.
    json.dumps(reference)


def write_predictions(path: Path, sums: np.ndarray, classes: np.ndarray, confidence: np.ndarray) -> Path:
    columns = [pa.array(np.arange(len(sums))), pa.array(sums), pa.array(classes), pa.array(confidence)]
    storage.write_parquet(
        path, storage.PREDICTIONS_SCHEMA, [pa.RecordBatch.from_arrays(columns, schema=storage.PREDICTIONS_SCHEMA)]
    )
    return path


def test_batch_figures_compare_a_predictions_file_with_the_reference(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    reference = monitoring.reference(rng.normal(0, 28, 20_000), 1.0, [100] * 10)
    sums = rng.normal(10, 28, 5_000)
    classes = rng.integers(0, 10, 5_000)
    confidence = rng.uniform(0.5, 1, 5_000).astype(np.float32)
    path = write_predictions(tmp_path / "predictions.parquet", sums, classes, confidence)

    figures = monitoring.batch_figures(path, reference)
    edges = reference["feature_sum_edges"]
    expected_psi = monitoring.psi(reference["feature_sum_counts"], monitoring.bin_counts(sums, edges))
    assert figures["feature_sum_psi"] == pytest.approx(expected_psi)
    assert figures["predicted_class_psi"] == pytest.approx(monitoring.psi([1] * 10, np.bincount(classes, minlength=10)))
    assert figures["rows"] == 5_000
    assert figures["feature_sum_mean"] == pytest.approx(sums.mean())
    assert figures["feature_sum_std"] == pytest.approx(sums.std())
    assert figures["mean_confidence"] == pytest.approx(confidence.mean(dtype=np.float64))
    # A shift of a third of a standard deviation is drift worth a warning at least; none is none.
    assert figures["feature_sum_psi"] > 0.1
    same = write_predictions(tmp_path / "same.parquet", rng.normal(0, 28, 5_000), classes, confidence)
    assert monitoring.batch_figures(same, reference)["feature_sum_psi"] < 0.02

    # Read in small batches, the figures are the same: memory does not grow with the file.
    monkeypatch.setattr(monitoring, "READ_ROWS", 7)
    assert monitoring.batch_figures(path, reference) == pytest.approx(figures)


def test_batch_figures_without_a_reference_or_rows(tmp_path):
    path = write_predictions(tmp_path / "p.parquet", np.array([1.0, 3.0]), np.array([0, 1]), np.ones(2, np.float32))
    figures = monitoring.batch_figures(path, None)
    assert (figures["feature_sum_psi"], figures["predicted_class_psi"]) == (None, None)
    assert figures["feature_sum_mean"] == 2.0
    empty = write_predictions(tmp_path / "e.parquet", np.array([]), np.array([], np.int64), np.array([], np.float32))
    reference = monitoring.reference(np.arange(100.0), 1.0, [1] * 10)
    assert monitoring.batch_figures(empty, reference) == {
        "rows": 0,
        "feature_sum_psi": None,
        "predicted_class_psi": None,
        "feature_sum_mean": None,
        "feature_sum_std": None,
        "mean_confidence": None,
    }


def history_row(day: str, batch: str, psi: float = 0.05, model: str = "m1") -> dict:
    return {
        "run_date": day,
        "model_version": 1,
        "model_fingerprint": model,
        "batch": f"/data/{batch}.parquet",
        "batch_fingerprint": batch,
        "predictions": f"/artifacts/{batch}-predictions.parquet",
        "rows": 100,
        "feature_sum_psi": psi,
        "predicted_class_psi": 0.01,
        "feature_sum_mean": 0.5,
        "feature_sum_std": 28.0,
        "mean_confidence": 0.9,
        "accuracy": 0.93,
        "level": "ok",
        "flow_run_id": None,
    }


def test_history_keeps_one_row_per_batch_model_and_date_sorted_by_date(tmp_path):
    first = monitoring.record(tmp_path, history_row("2026-02-02", "b2"))
    assert first["batch_fingerprint"] == "b2" and first["alerted"] is False
    monitoring.record(tmp_path, history_row("2026-02-01", "b1"))
    # A later run of the same batch replaces the row with its own judgement, keeping when it was first seen.
    later = monitoring.record(tmp_path, {**history_row("2026-02-02", "b2"), "level": "alert", "flow_run_id": "run-2"})
    assert (later["level"], later["flow_run_id"], later["recorded"]) == ("alert", "run-2", first["recorded"])
    monitoring.record(tmp_path, history_row("2026-02-02", "b2", model="m2"))  # another model: another row
    monitoring.record(tmp_path, history_row("2026-02-03", "b2"))  # the same file scored for another date

    rows = monitoring.read_history(tmp_path)
    assert [(r["run_date"], r["batch_fingerprint"], r["model_fingerprint"], r["level"]) for r in rows] == [
        ("2026-02-01", "b1", "m1", "ok"),
        ("2026-02-02", "b2", "m1", "alert"),
        ("2026-02-02", "b2", "m2", "ok"),
        ("2026-02-03", "b2", "m1", "ok"),
    ]
    table = pd.read_parquet(monitoring.history_path(tmp_path))
    assert list(table.columns) == monitoring.HISTORY_SCHEMA.names


def test_a_sent_event_is_remembered_until_a_refresh(tmp_path):
    row = {**history_row("2026-02-02", "b2"), "level": "alert"}
    monitoring.record(tmp_path, row)
    monitoring.mark_alerted(tmp_path, row)
    assert monitoring.record(tmp_path, row)["alerted"] is True
    assert monitoring.record(tmp_path, row, refresh=True)["alerted"] is False
    assert [r["alerted"] for r in monitoring.read_history(tmp_path)] == [False]


def _write_rows(folder: str, writer: int, count: int) -> None:
    for index in range(count):
        monitoring.record(Path(folder), history_row(f"2026-03-{index + 1:02d}", f"w{writer}-b{index}"))


def test_history_loses_no_row_under_concurrent_writers(tmp_path):
    writers, rows = 4, 15
    context = multiprocessing.get_context("fork")
    processes = [context.Process(target=_write_rows, args=(str(tmp_path), w, rows)) for w in range(writers)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)
        assert process.exitcode == 0
    history = pd.read_parquet(monitoring.history_path(tmp_path))
    assert len(history) == writers * rows
    assert set(history["batch_fingerprint"]) == {f"w{w}-b{i}" for w in range(writers) for i in range(rows)}
    assert list(history["run_date"]) == sorted(history["run_date"])
    assert not list(tmp_path.glob(".*.tmp"))


def test_an_unreadable_history_is_one_clear_error(tmp_path):
    monitoring.history_path(tmp_path).write_text("not parquet")
    with pytest.raises(InputError, match="not a monitoring history"):
        monitoring.read_history(tmp_path)
    assert monitoring.read_history(tmp_path / "elsewhere") == []


def test_monitor_command_prints_the_history(capsys, tmp_path):
    monitoring.record(tmp_path, history_row("2026-02-01", "b1", psi=0.0123))
    monitoring.record(tmp_path, {**history_row("2026-02-16", "b2", psi=0.4), "level": "alert", "accuracy": None})

    code, out, _ = featuresum(capsys, "monitor", "--artifacts-dir", str(tmp_path))
    assert code == 0
    table, chart = out.split("\n\n", 1)
    header, first, second = table.splitlines()
    assert header.split() == [
        "run_date", "model_version", "rows", "feature_sum_psi", "predicted_class_psi", "feature_sum_mean",
        "mean_confidence", "accuracy", "level",
    ]  # fmt: skip
    assert first.split() == ["2026-02-01", "1", "100", "0.0123", "0.0100", "0.5000", "0.9000", "0.9300", "ok"]
    assert second.split()[0] == "2026-02-16" and second.split()[-2:] == ["-", "alert"]
    # Under the table, the drift chart (see test_drift_chart.py), with the default thresholds these rows lack.
    assert chart.startswith("Drift by date") and "warn from a PSI of 0.1, ┃ alert above 0.25" in chart

    code, out, _ = featuresum(capsys, "monitor", "--artifacts-dir", str(tmp_path), "--last", "1", "--json")
    assert code == 0
    (row,) = json.loads(out)
    assert (row["run_date"], row["feature_sum_psi"], row["level"]) == ("2026-02-16", 0.4, "alert")

    code, out, _ = featuresum(capsys, "monitor", "--artifacts-dir", str(tmp_path / "none"))
    assert code == 0 and out.startswith("no scored batches yet")

    monitoring.history_path(tmp_path).write_bytes(b"PAR1 broken")
    code, _, lines = featuresum(capsys, "monitor", "--artifacts-dir", str(tmp_path))
    one_error_line(code, lines, 2, "not a monitoring history")


def test_drift_thresholds_in_the_wrong_order_are_refused_before_any_run(capsys, tmp_path):
    for command in (
        ["run"],
        ["score", "--model", "m.pt", "--samples", "5"],
        ["backfill", "--from", "2026-01-01", "--to", "2026-01-02"],
    ):
        args = [*command, "--drift-warn", "0.5", "--drift-alert", "0.2", "--artifacts-dir", str(tmp_path)]
        code, _, lines = featuresum(capsys, *args)
        one_error_line(code, lines, 2, "--drift-warn 0.5 is above --drift-alert 0.2")


def test_only_runs_of_the_retrain_on_drift_automation_count_as_started_by_drift():
    import uuid

    ours = CreatedBy(id=uuid.uuid4(), type="AUTOMATION", display_value=f"{monitoring.RETRAIN_AUTOMATION} (daily)")
    other = CreatedBy(id=uuid.uuid4(), type="AUTOMATION", display_value="someone else's automation")
    assert monitoring.started_by_drift(ours)
    assert not monitoring.started_by_drift(other)
    assert not monitoring.started_by_drift(None)

"""Monitoring: drift and accuracy of every scored batch, against the reference of the model that scored it.

A model's reference is recorded when it is trained: quantile bins of its training rows' feature sums,
its predicted-class histogram on its held-out rows, and summary statistics of the features. A scored
batch is compared with it by the population stability index (PSI),

    PSI = sum over bins of (actual share - expected share) * ln(actual share / expected share),

which is 0 for identical histograms; below 0.1 is usually read as no shift, above 0.25 as a large one.
Every batch's figures are one row of the monitoring history, `monitoring.parquet` in the artifacts folder.
"""

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from featuresum.tasks import storage
from featuresum.tasks.errors import InputError
from featuresum.tasks.figures import format_figure

REFERENCE_BINS = 10
# The Prefect event a batch at level alert emits; `featuresum serve --retrain-on-drift` triggers on it.
DRIFT_EVENT = "featuresum.drift.detected"
# The automation that `serve --retrain-on-drift` creates is named after this; the runs it starts carry the tag.
RETRAIN_AUTOMATION = "featuresum: retrain on drift"
RETRAIN_TAG = "retrain-on-drift"
# An empty bin would make the PSI infinite; shares are floored at this, as is usual.
SHARE_FLOOR = 1e-4
HISTORY_FILE = "monitoring.parquet"
HISTORY_SCHEMA = pa.schema(
    [
        ("run_date", pa.string()),
        ("recorded", pa.string()),
        ("model_version", pa.int64()),
        ("model_fingerprint", pa.string()),
        ("batch", pa.string()),
        ("batch_fingerprint", pa.string()),
        ("predictions", pa.string()),
        ("rows", pa.int64()),
        ("labelled_rows", pa.int64()),
        ("feature_sum_psi", pa.float64()),
        ("predicted_class_psi", pa.float64()),
        ("feature_sum_mean", pa.float64()),
        ("feature_sum_std", pa.float64()),
        ("mean_confidence", pa.float64()),
        ("accuracy", pa.float64()),
        ("level", pa.string()),
        ("drift_warn", pa.float64()),
        ("drift_alert", pa.float64()),
        ("alerted", pa.bool_()),
        ("flow_run_id", pa.string()),
    ]
)
# What a batch of the history is: the model that scored it, the rows it scored, and their date. Both
# fingerprints are those the files' manifests record, or their content hashes (see storage.manifests).
HISTORY_KEY = ("model_fingerprint", "batch_fingerprint", "run_date")
# Columns of a predictions file that monitoring reads, in batches of this many rows.
PREDICTION_COLUMNS = ["feature_sum", "predicted_class", "confidence"]
READ_ROWS = 262_144


def reference(feature_sums: np.ndarray, feature_std: float, predicted_counts: Sequence[int]) -> dict[str, Any]:
    """A model's reference: decile bins of its training feature sums, held-out predictions, feature statistics.

    `feature_sums` are the training rows' sums, `feature_std` the mean standard deviation of a
    feature over them, `predicted_counts` the class histogram of its predictions on held-out rows.
    """
    sums = np.asarray(feature_sums, dtype=np.float64)
    edges = np.quantile(sums, np.arange(1, REFERENCE_BINS) / REFERENCE_BINS)
    return {
        "feature_sum_edges": edges.tolist(),
        "feature_sum_counts": bin_counts(sums, edges.tolist()).tolist(),
        "predicted_class_counts": [int(count) for count in predicted_counts],
        "rows": len(sums),
        "feature_sum_mean": float(sums.mean()),
        "feature_sum_std": float(sums.std()),
        "feature_std": float(feature_std),
    }


def training_figures(chunks: Iterable[np.ndarray], chunk_rows: int = 65_536) -> tuple[np.ndarray, float]:
    """Each row's feature sum (float64) and the mean standard deviation of a feature, over chunks of rows (n, 784).

    numpy, in chunks of rows, so streamed rows need not be held at once: on 1.6M training rows, torch
    took 17 s for the float64 row sums and 11 s for the column deviations; this takes about 3 s.
    """
    count, total, squares, sums = 0, 0.0, 0.0, []
    for rows in chunks:
        for start in range(0, len(rows), chunk_rows):
            chunk = rows[start : start + chunk_rows]
            total += np.add.reduce(chunk, axis=0, dtype=np.float64)
            squares += np.einsum("ij,ij->j", chunk, chunk, dtype=np.float64)
            sums.append(np.add.reduce(chunk, axis=1, dtype=np.float64))
            count += len(chunk)
    mean = total / max(count, 1)
    variance = np.maximum(squares - count * mean * mean, 0.0) / max(count - 1, 1)
    return (np.concatenate(sums) if sums else np.zeros(0)), float(np.sqrt(variance).mean())


def bin_counts(values: np.ndarray, edges: Sequence[float]) -> np.ndarray:
    """Counts of `values` in the bins that the interior `edges` make (the outer bins are open)."""
    return np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1)


def psi(expected: Sequence[float], actual: Sequence[float]) -> float | None:
    """Population stability index of the histogram `actual` against `expected` (counts or shares).

    None when either histogram is empty. Shares are floored at SHARE_FLOOR so an empty bin counts
    as a large shift instead of an infinite one.
    """
    expected, actual = np.asarray(expected, dtype=np.float64), np.asarray(actual, dtype=np.float64)
    if expected.shape != actual.shape:
        raise ValueError(f"histograms of {len(expected)} and {len(actual)} bins cannot be compared")
    if expected.sum() <= 0 or actual.sum() <= 0:
        return None
    e = np.maximum(expected / expected.sum(), SHARE_FLOOR)
    a = np.maximum(actual / actual.sum(), SHARE_FLOOR)
    return float(np.sum((a - e) * np.log(a / e)))


def check_thresholds(warn: float, alert: float) -> None:
    """Refuse thresholds that cannot order the levels."""
    if warn > alert:
        raise InputError(f"--drift-warn {warn:g} is above --drift-alert {alert:g}; the levels need 0 <= warn <= alert")
    if warn < 0:
        raise InputError(f"--drift-warn {warn:g} is below 0; the levels need 0 <= warn <= alert")


def level(psis: Sequence[float | None], warn: float, alert: float) -> str:
    """ok below `warn`, warn up to `alert`, alert above, judged on the largest PSI; unknown with none."""
    known = [value for value in psis if value is not None]
    if not known:
        return "unknown"
    worst = max(known)
    return "ok" if worst < warn else "warn" if worst <= alert else "alert"


def started_by_drift(created_by: Any) -> bool:
    """Whether a flow run's creator (Prefect's `created_by`) is a retrain-on-drift automation."""
    if created_by is None or created_by.type != "AUTOMATION":
        return False
    return (created_by.display_value or "").startswith(RETRAIN_AUTOMATION)


def _batches(predictions: storage.Location) -> Iterator[pa.RecordBatch]:
    file = pq.ParquetFile(storage.open_input(predictions), pre_buffer=False)
    yield from file.iter_batches(batch_size=READ_ROWS, columns=PREDICTION_COLUMNS)


def batch_figures(predictions: storage.Location, model_reference: dict[str, Any] | None) -> dict[str, Any]:
    """PSIs, mean and spread of the feature sums and mean confidence of a predictions file, read in batches.

    Memory stays bounded whatever the file's size. Without a reference (a checkpoint from before
    references were recorded) the PSIs are None.
    """
    edges = model_reference["feature_sum_edges"] if model_reference else []
    sum_bins = np.zeros(len(edges) + 1, dtype=np.int64)
    class_bins = np.zeros(len(model_reference["predicted_class_counts"]) if model_reference else 0, dtype=np.int64)
    rows, total, squares, confidence = 0, 0.0, 0.0, 0.0
    for batch in _batches(predictions):
        sums = storage.values(batch.column("feature_sum"))
        rows += len(sums)
        total += float(sums.sum())
        squares += float(np.square(sums).sum())
        confidence += float(storage.values(batch.column("confidence")).sum(dtype=np.float64))
        if model_reference:
            sum_bins += bin_counts(sums, edges)
            class_bins += np.bincount(storage.values(batch.column("predicted_class")), minlength=len(class_bins))
    mean = total / rows if rows else None
    figures = {
        "rows": rows,
        "feature_sum_psi": None,
        "predicted_class_psi": None,
        "feature_sum_mean": mean,
        "feature_sum_std": math.sqrt(max(squares / rows - mean * mean, 0.0)) if rows else None,
        "mean_confidence": confidence / rows if rows else None,
    }
    if model_reference:
        figures["feature_sum_psi"] = psi(model_reference["feature_sum_counts"], sum_bins)
        figures["predicted_class_psi"] = psi(model_reference["predicted_class_counts"], class_bins)
    return figures


def history_path(artifacts_dir: storage.Location) -> storage.Location:
    """The monitoring history of an artifacts folder."""
    return storage.join(storage.at(artifacts_dir), HISTORY_FILE)


def read_history(artifacts_dir: storage.Location) -> list[dict[str, Any]]:
    """Every row of the monitoring history, oldest first (none when nothing was scored yet)."""
    try:
        return _rows(history_path(artifacts_dir), storage.read_bytes(history_path(artifacts_dir)))
    except FileNotFoundError:
        return []


def _rows(path: storage.Location, content: bytes | None) -> list[dict[str, Any]]:
    if content is None:
        return []
    try:
        # ParquetFile, not read_table: the dataset API that read_table uses imports pandas.
        table = pq.ParquetFile(pa.BufferReader(content)).read()
    except pa.ArrowInvalid as error:
        raise InputError(f"{path}: not a monitoring history ({error}); move it aside") from None
    if missing := [name for name in (*HISTORY_KEY, "recorded") if name not in table.schema.names]:
        raise InputError(f"{path}: not a monitoring history (no column {missing[0]}); move it aside")
    return table.to_pylist()


def _key(row: dict[str, Any]) -> tuple:
    return tuple(row[name] for name in HISTORY_KEY)


def _rewrite(artifacts_dir: storage.Location, change: Callable[[list[dict[str, Any]]], list[dict[str, Any]]]) -> None:
    """Read, change and atomically replace the history (storage.update: a lock, or a conditional write).

    Concurrent runs never lose each other's rows, and a reader never sees half a file.
    """
    path = history_path(artifacts_dir)

    def rewrite(content: bytes | None) -> bytes:
        rows = change(_rows(path, content))
        rows.sort(key=lambda kept: (kept["run_date"] or "", kept["recorded"]))
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(rows, schema=HISTORY_SCHEMA), sink)
        return sink.getvalue().to_pybytes()

    storage.update(path, rewrite)


def record(artifacts_dir: storage.Location, row: dict[str, Any], refresh: bool = False) -> dict[str, Any]:
    """Put a scored batch's row in the history and return it as stored.

    One row per batch, model and date: a later run that monitors the same batch replaces the row
    with its own level, thresholds and flow run, but keeps when it was first recorded and whether
    its drift event was sent (unless `refresh`, which starts the row afresh).
    """
    stored = {name: row.get(name) for name in HISTORY_SCHEMA.names}
    stored.update(recorded=datetime.now(UTC).isoformat(timespec="seconds"), alerted=False)

    def change(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        earlier = [kept for kept in rows if _key(kept) == _key(stored)]
        if earlier and not refresh:
            stored.update(recorded=earlier[0]["recorded"], alerted=earlier[0]["alerted"])
        return [kept for kept in rows if _key(kept) != _key(stored)] + [stored]

    _rewrite(artifacts_dir, change)
    return stored


def mark_alerted(artifacts_dir: storage.Location, row: dict[str, Any]) -> None:
    """Note in the history that the drift event of this row's batch was sent."""

    def change(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{**kept, "alerted": True} if _key(kept) == _key(row) else kept for kept in rows]

    _rewrite(artifacts_dir, change)


# The drift chart draws each batch's larger PSI (the one its level is judged on) on a log scale: from
# CHART_FLOOR, one cell, up to a power of ten, so that 0.001 and 0.005 lie as far apart as 0.05 and 0.25.
CHART_CELLS = 36
CHART_FLOOR = 0.001
BAR, TRACK, WARN_MARK, ALERT_MARK = "█", "·", "┆", "┃"
# Levels from the mildest; a date's level in the UI is the worst of its batches'.
LEVELS = ("unknown", "ok", "warn", "alert")
LEVEL_MARKS = {"unknown": "⚪ unknown", "ok": "🟢 ok", "warn": "🟡 **warn**", "alert": "🔴 **alert**"}


def drift_psi(row: dict[str, Any]) -> float | None:
    """The larger of a history row's two PSIs, the one its level is judged on; None with neither."""
    known = [row[name] for name in ("feature_sum_psi", "predicted_class_psi") if row.get(name) is not None]
    return max(known, default=None)


def chart_top(rows: list[dict[str, Any]], alert: float) -> float:
    """The top of the chart's scale: the smallest power of ten from 1 up that holds every PSI and `alert`."""
    largest = max([drift_psi(row) or 0.0 for row in rows] + [alert, 1.0])
    return 10.0 ** math.ceil(math.log10(largest) - 1e-9)


def chart_position(value: float, top: float, cells: int = CHART_CELLS) -> float:
    """Where a PSI lies on the scale, in cells from its start: 0 up to CHART_FLOOR, `cells` at `top`."""
    if value <= CHART_FLOOR:
        return 0.0
    return min(cells * math.log(value / CHART_FLOOR) / math.log(top / CHART_FLOOR), float(cells))


def mark_cell(threshold: float, top: float, cells: int = CHART_CELLS) -> int:
    """The cell boundary where a threshold's mark lies: its mark sits just before this cell."""
    return round(chart_position(threshold, top, cells))


def bar_cells(value: float | None, top: float, warn: float, alert: float, cells: int = CHART_CELLS) -> int:
    """How many cells a PSI's bar fills: none without a PSI, at least one with any (below a mark at 0, none).

    A bar passes the warn mark exactly when its PSI is at warn or above, and the alert mark when it
    is above alert: near a mark, its length is moved by the cell that rounding leaves in doubt.
    """
    if value is None:
        return 0
    length = max(1, round(chart_position(value, top, cells)))
    for threshold, reached in ((warn, value >= warn), (alert, value > alert)):
        mark = mark_cell(threshold, top, cells)
        length = max(length, mark + 1) if reached else min(length, mark)
    return min(length, cells)


def track(value: float | None, top: float, warn: float, alert: float, cells: int = CHART_CELLS) -> str:
    """A PSI's bar on the scale, with the warn and alert marks between the cells where the thresholds lie.

    A mark lies between cells, so a bar that passes it keeps its length (its count of BAR characters).
    """
    marks = ((WARN_MARK, mark_cell(warn, top, cells)), (ALERT_MARK, mark_cell(alert, top, cells)))
    length, drawn = bar_cells(value, top, warn, alert, cells), []
    for cell in range(cells + 1):
        drawn += [mark for mark, at in marks if at == cell]
        if cell < cells:
            drawn.append(BAR if cell < length else TRACK)
    return "".join(drawn)


def chart_axis(top: float, warn: float, alert: float, cells: int = CHART_CELLS) -> str:
    """The scale's decades (0.001, 0.01, ...), each at the column of the track where it lies."""
    marks = [mark_cell(warn, top, cells), mark_cell(alert, top, cells)]
    line = ""
    for decade in range(round(math.log10(top / CHART_FLOOR)) + 1):
        value = CHART_FLOOR * 10**decade
        cell = mark_cell(value, top, cells)
        column = cell + sum(at < cell for at in marks)
        if column > len(line) or not line:
            line = line.ljust(column) + f"{value:g}"
    return line


def chart_legend(top: float, warn: float, alert: float, cells: int = CHART_CELLS) -> list[str]:
    """What the chart's bars and marks mean: the scale, and the thresholds with their values."""
    per_decade = cells / math.log10(top / CHART_FLOOR)
    return [
        f"Bars: each batch's larger PSI, log scale from {CHART_FLOOR:g} to {top:g},",
        f"a decade every {per_decade:.3g} cells; a PSI up to {CHART_FLOOR:g} fills one cell.",
        f"Marks: {WARN_MARK} warn from a PSI of {warn:g}, {ALERT_MARK} alert above {alert:g}.",
    ]


def text_chart(rows: list[dict[str, Any]], warn: float, alert: float, cells: int = CHART_CELLS) -> str:
    """The drift chart for a terminal, under 80 columns: a bar per batch by date, its marks, the legend."""
    top = chart_top(rows, alert)
    lines = ["Drift by date", *chart_legend(top, warn, alert, cells), ""]
    lines.append(f"{'date':<10}  {'PSI':>7}  {'':{cells + 2}}  {'level':<7}  model")
    for row in rows:
        psi_text = format_figure(drift_psi(row), "n/a")
        bar = track(drift_psi(row), top, warn, alert, cells)
        lines.append(f"{row['run_date']:<10}  {psi_text:>7}  {bar}  {row['level']:<7}  {_model(row)}")
    lines.append(" " * 21 + chart_axis(top, warn, alert, cells))
    return "\n".join(line.rstrip() for line in lines)


def chart(rows: list[dict[str, Any]], warn: float, alert: float, cells: int = CHART_CELLS) -> str:
    """The drift chart as markdown: the legend, then a table with a bar per batch by date, level and accuracy."""
    top = chart_top(rows, alert)
    lines = [" ".join(chart_legend(top, warn, alert, cells)), ""]
    lines += ["| date | model | feature-sum PSI | predicted-class PSI | drift | level | accuracy |", "|---" * 7 + "|"]
    for row in rows:
        bar = track(drift_psi(row), top, warn, alert, cells)
        psis = " | ".join(format_figure(row[name], "n/a") for name in ("feature_sum_psi", "predicted_class_psi"))
        accuracy = format_figure(row["accuracy"], "n/a")
        lines.append(f"| {row['run_date']} | {_model(row)} | {psis} | `{bar}` | {row['level']} | {accuracy} |")
    return "\n".join(lines)


def _model(row: dict[str, Any]) -> str:
    version = row.get("model_version")
    return str(version) if version is not None else (row.get("model_fingerprint") or "")[:8]


def recent_levels(rows: list[dict[str, Any]], dates: int) -> list[dict[str, Any]]:
    """The last `dates` dates of the history, oldest first, each as the row of its worst level (latest on ties)."""
    worst: dict[str, dict[str, Any]] = {}
    for row in sorted(rows, key=lambda kept: kept["recorded"] or ""):
        day = row["run_date"] or ""
        if day not in worst or LEVELS.index(row["level"]) >= LEVELS.index(worst[day]["level"]):
            worst[day] = row
    return [worst[day] for day in sorted(worst)[-dates:]]


def levels_markdown(rows: list[dict[str, Any]], dates: int) -> str:
    """A markdown table of the last `dates` dates' drift levels: date, level with its mark, PSI, model version."""
    lines = ["| date | level | PSI | model |", "|---|---|---|---|"]
    for row in recent_levels(rows, dates):
        mark = LEVEL_MARKS.get(row["level"], row["level"])
        lines.append(f"| {row['run_date']} | {mark} | {format_figure(drift_psi(row), 'n/a')} | {_model(row)} |")
    return "\n".join(lines)

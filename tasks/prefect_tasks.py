"""Prefect tasks: thin wrappers that add retries, caching, logging and artifacts to the plain code.

Every task returns a small JSON manifest (path, cache key, fingerprint, metadata), never data or
models. A task that writes a file holds a lock on it while it works and, once it holds the lock,
returns the file's manifest unchanged if an identical run already wrote it. How the tasks are cached
and retried is task_policy's; what training does is fitting's.

torch, and the modules built on it, are imported inside the tasks that compute, so a fully
cached run never loads it (about 1.2 s of a rerun's few seconds).
"""

import errno
from contextlib import closing
from dataclasses import asdict
from datetime import date
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext

from featuresum.tasks import cpu, data, handoff, monitoring, reports, retention, scoring, storage
from featuresum.tasks.drift_events import emit_drift, log_drift
from featuresum.tasks.errors import EnvironmentFailure, InputError
from featuresum.tasks.settings import TrainConfig
from featuresum.tasks.task_policy import FILE_RETRIES, file_task, identity_key, is_transient, own_key


def _reuse(path: storage.Location, key: str, refresh: bool) -> dict[str, Any] | None:
    """The manifest of `path` when an identical run already wrote it (call while holding its lock).

    None when asked to refresh: then the file is written again, whatever is on disk.
    """
    manifest = None if refresh else storage.read_manifest(path, key)
    if manifest is not None:
        get_run_logger().info("Reusing %s, written by an identical run", path)
    return manifest


@file_task(task_run_name="generate-{stream}-{day}-{rows}rows-seed{seed}")
def generate_dataset(
    stream: str, rows: int, seed: int, day: str, drift: float, path: str, refresh: bool = False
) -> dict[str, Any]:
    """Generate one date's partition of a labelled synthetic dataset and write it to Parquet."""
    target, key = storage.at(path), own_key()
    with storage.local_lock(target):
        if done := _reuse(target, key, refresh):
            return done
        get_run_logger().info("Generating %d %s rows for %s (seed %d) into %s", rows, stream, day, seed, path)
        shards = data.generate_dataset(seed, stream, rows, date.fromisoformat(day), drift, reuse=True)
        # A step of this process that trains on these rows is handed them as well (see handoff).
        collector = handoff.Collector(rows) if handoff.wanted(str(target)) else None
        # Each next shard is drawn (and collected) while the last is written.
        shards = cpu.ahead(collector.collect(shards) if collector else shards)
        # Training rows handed over are not read back soon: their file need not fill the page cache (the
        # held-out rows are: the promotion gate reads them again).
        batches = map(storage.shard_to_batch, shards)
        cached = collector is None or stream != "train"
        written = storage.write_parquet(target, storage.DATASET_SCHEMA, batches, cached=cached)
        # The file is a pure function of its specification, which its path already hashes: the key of that
        # specification identifies its content, and stands in for a hash of its bytes as its fingerprint.
        spec = {"stream": stream, "rows": rows, "seed": seed, "day": day, "drift": drift}
        spec["code"] = storage.code_version()
        manifest = storage.write_manifest(
            target, key, specification_key=storage.spec_key(spec), written=written, rows=written.rows, date=day
        )
        if collector:
            handoff.keep(manifest["path"], manifest["fingerprint"], collector.rows())
        return manifest


@file_task(task_run_name="fingerprint-{path}", cache_key_fn=identity_key)
def fingerprint_input(path: str, digest: str = "sha256") -> dict[str, Any]:
    """Hash a user's file, so caching follows its content, not its name; reused while the file is unchanged.

    A checkpoint is known by its SHA-256, as the registry records it; a feature file by its BLAKE3
    (digest="blake3"), several times faster on a large file. A file that a featuresum task wrote (a
    checkpoint, a generated batch) is not read again: while it is unchanged, the fingerprint in its
    manifest holds (a generated batch's is the key of its specification; see storage.manifests).
    """
    location = storage.at(path)
    if not storage.exists(location):
        raise InputError(f"{path}: no such file")
    manifest = storage.manifest_of(location)
    return {"path": path, "fingerprint": manifest["fingerprint"] if manifest else storage.fingerprint(location, digest)}


@file_task(task_run_name="train-model-{config[epochs]}epochs-seed{config[seed]}")
def train_model(
    train: list[dict[str, Any]],
    holdout: dict[str, Any],
    config: dict[str, Any],
    device: str,
    path: str,
    init: dict[str, Any] | None = None,
    memory_mb: int | None = None,
    refresh: bool = False,
) -> dict[str, Any]:
    """Train the classifier on the window's partitions, checkpointing every epoch so a killed or retried run resumes.

    With `init` (a checkpoint's path and fingerprint), training starts from that model's weights. The rows
    are streamed from disk when they do not fit `memory_mb`, which changes the speed, not the model.
    """
    target, key = storage.at(path), own_key()
    with storage.local_lock(target):
        if done := _reuse(target, key, refresh):
            return done
        from featuresum.tasks.fitting import train_checkpoint

        settings, progress = TrainConfig(**config), _Progress("Training")
        return train_checkpoint(
            train,
            holdout,
            settings,
            device,
            target,
            key,
            init,
            memory_mb,
            logger=get_run_logger(),
            on_progress=progress,
            on_report=reports.publish_training,
        )


class _Progress:
    """A progress artifact, created at the first percentage it is given and updated with each later one."""

    def __init__(self, description: str) -> None:
        self.description = description
        self.artifact: Any = None

    def __call__(self, percent: float) -> None:
        if self.artifact is None:
            self.artifact = create_progress_artifact(progress=percent, description=self.description)
        else:
            update_progress_artifact(self.artifact, progress=percent)


@file_task(task_run_name="score-shard-{index}")
def score_shard(
    model: dict[str, Any],
    features: dict[str, Any],
    row_groups: list[int],
    index: int,
    device: str,
    path: str,
    refresh: bool = False,
) -> dict[str, Any]:
    """Score some row groups of a feature file in streamed batches; write their predictions to Parquet."""
    target, key = storage.at(path), own_key()
    with storage.local_lock(target):
        if done := _reuse(target, key, refresh):
            return done
        import torch

        from featuresum.tasks.checkpoint import load_checkpoint, model_from_checkpoint

        where = torch.device(device)
        classifier = model_from_checkpoint(load_checkpoint(model["path"], model["fingerprint"]), where)
        summary = scoring.ScoreSummary()
        batches = storage.iter_feature_batches(storage.at(features["path"]), row_groups=row_groups, reuse=True)
        with closing(scoring.score_batches(classifier, batches, where, summary)) as predictions:
            written = storage.write_parquet(target, storage.PREDICTIONS_SCHEMA, predictions)
        logger = get_run_logger()
        logger.info("Scored %d rows of %s (row groups %s) into %s", summary.rows, features["path"], row_groups, path)
        return storage.write_manifest(target, key, written=written, **asdict(summary))


def _remove_parts(path: storage.Location, shards: list[dict[str, Any]] | None) -> None:
    """Delete this run's shards once the predictions file is complete, and what other runs left in the shard
    folder over an hour ago (older layouts, killed runs); another run writing the same output meanwhile
    keeps its own shards and locks."""
    for shard in shards or ():
        location = storage.at(shard["path"])
        storage.remove(location)
        storage.remove(storage.manifest_path(location))
        if not storage.is_remote(location):
            storage.remove(storage.lock_path(location))
    # Ages are measured against the predictions file just written: file times against file times.
    now = None if storage.is_remote(path) else Path(path).stat().st_mtime
    storage.remove_tree(storage.parts_dir(path), older_than=storage.LEFTOVER_AGE_SECONDS, now=now)


@file_task(task_run_name="write-predictions")
def write_predictions(
    model: dict[str, Any],
    features: dict[str, Any],
    device: str,
    shards: list[dict[str, Any]] | None,
    path: str,
    refresh: bool = False,
) -> dict[str, Any]:
    """Concatenate scored shards, in order, into the predictions Parquet file (keyed by what they score)."""
    target, key = storage.at(path), own_key()
    with storage.local_lock(target):
        if done := _reuse(target, key, refresh):
            _remove_parts(target, shards)
            return done
        if shards is None:
            raise FileNotFoundError(errno.ENOENT, "predictions changed while being reused; run again", path)
        summary = scoring.ScoreSummary()
        for shard in shards:
            summary.add(shard["rows"], shard["labelled"], shard["correct"], shard["class_counts"])
        batches = storage.iter_parquet_batches(shard["path"] for shard in shards)
        written = storage.write_parquet(target, storage.PREDICTIONS_SCHEMA, batches)
        get_run_logger().info(
            "Wrote %d predictions to %s (accuracy on labelled rows: %s)", written.rows, path, summary.accuracy
        )
        reports.publish_predictions(summary, path)
        accuracy, counts = summary.accuracy, summary.class_counts
        manifest = storage.write_manifest(
            target,
            key,
            written=written,
            rows=written.rows,
            labelled_rows=summary.labelled,
            score_accuracy=accuracy,
            class_counts=counts,
        )
        _remove_parts(target, shards)
        return manifest


@file_task(task_run_name="evaluate-model")
def evaluate_model(model: dict[str, Any], holdout: dict[str, Any], device: str) -> dict[str, Any]:
    """Accuracy of a checkpoint on held-out rows: how the promotion gate measures the champion."""
    import torch

    from featuresum.tasks import training
    from featuresum.tasks.checkpoint import load_checkpoint, model_from_checkpoint

    target = torch.device(device)
    classifier = model_from_checkpoint(load_checkpoint(model["path"], model["fingerprint"]), target)
    x, y = (t.to(target) for t in storage.read_dataset(storage.at(holdout["path"])))
    return {"accuracy": training.accuracy(training.evaluate(classifier, x, y)), "rows": len(y)}


@task(
    task_run_name="monitor-{run_date}",
    cache_policy=NO_CACHE,
    retries=FILE_RETRIES.retries,
    retry_condition_fn=is_transient,
)
def monitor_batch(
    model: dict[str, Any],
    batch: dict[str, Any],
    predictions: dict[str, Any],
    run_date: str,
    model_version: int | None,
    thresholds: dict[str, float],
    artifacts_dir: str,
    scored_by: str,
    refresh: bool = False,
) -> dict[str, Any]:
    """Drift and accuracy of a scored batch against its model's reference: a history row, artifacts, an event.

    `scored_by` is the flow that scored the batch: "pipeline" (which trained a challenger for the
    date first) or "score". The drift event of a batch is sent until it is sent once.
    """
    folder, scored = storage.at(artifacts_dir), storage.at(predictions["path"])

    def check_ours() -> None:  # another run writing the same output may have replaced the file meanwhile
        if storage.manifest_of(scored, predictions["fingerprint"]) is None:
            raise EnvironmentFailure(
                f"{scored}: another run replaced these predictions before they were monitored; run again"
            )

    check_ours()
    figures = monitoring.batch_figures(scored, _reference(model))
    check_ours()  # the file read is the one checked before: a replacement would have changed its identity
    psis = (figures["feature_sum_psi"], figures["predicted_class_psi"])
    row = {
        "run_date": run_date,
        "model_version": model_version,
        "model_fingerprint": model["fingerprint"],
        "batch": batch["path"],
        "batch_fingerprint": batch["fingerprint"],
        "predictions": predictions["path"],
        **figures,
        "accuracy": predictions.get("score_accuracy"),
        "labelled_rows": predictions.get("labelled_rows"),
        "level": monitoring.level(psis, thresholds["warn"], thresholds["alert"]),
        "drift_warn": thresholds["warn"],
        "drift_alert": thresholds["alert"],
        "flow_run_id": str(TaskRunContext.get().task_run.flow_run_id),
    }
    stored = monitoring.record(folder, row, refresh)
    log_drift(stored)
    if stored["level"] == "alert" and not stored["alerted"] and emit_drift(stored, folder, scored_by):
        monitoring.mark_alerted(folder, stored)
    reports.publish_monitoring(monitoring.read_history(folder), thresholds["warn"], thresholds["alert"])
    return {"drift": {"feature_sum_psi": psis[0], "predicted_class_psi": psis[1], "level": stored["level"]}}


def _reference(model: dict[str, Any]) -> dict[str, Any] | None:
    """The model's reference for drift: from its manifest when training wrote one, else from the checkpoint."""
    manifest = storage.manifest_of(storage.at(model["path"]), model["fingerprint"])
    if manifest is not None and "reference" in manifest:
        return manifest["reference"]
    from featuresum.tasks.checkpoint import load_checkpoint

    return load_checkpoint(model["path"], model["fingerprint"]).get("reference")


@task(
    task_run_name="retain-artifacts",
    cache_policy=NO_CACHE,
    retries=FILE_RETRIES.retries,
    retry_condition_fn=is_transient,
)
def retain_artifacts(data_dir: str, artifacts_dir: str, keep_days: int) -> dict[str, Any]:
    """Delete the partitions, predictions and checkpoints no run of the last `keep_days` dates can need (retention)."""
    report = retention.retain(data_dir, artifacts_dir, keep_days)
    get_run_logger().info(
        "Retention (%d days from %s): deleted %d files, %d bytes; pruned versions %s",
        keep_days,
        report["kept"].get("newest_date"),
        len(report["deleted"]),
        report["freed_bytes"],
        report["pruned_versions"] or "none",
    )
    return report

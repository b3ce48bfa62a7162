"""Prefect tasks: thin wrappers that add retries, caching, logging and artifacts to the plain code.

Every task returns a small JSON manifest (path, cache key, fingerprint, metadata), never data or
models. A task that writes a file holds a lock on it while it works and, once it holds the lock,
returns the file's manifest unchanged if an identical run already wrote it.

torch, and the modules built on it, are imported inside the tasks that compute, so a fully
cached run never loads it (about 1.2 s of a rerun's few seconds).
"""

import errno
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext
from prefect.filesystems import WritableFileSystem
from prefect.states import State
from prefect.tasks import Task, exponential_backoff

from featuresum.tasks import cpu, data, monitoring, reports, s3, scoring, storage
from featuresum.tasks.errors import EnvironmentFailure, InputError
from featuresum.tasks.settings import TrainConfig


@dataclass(frozen=True)
class RetrySettings:
    """How tasks that touch files retry transient failures: count, backoff, jitter."""

    retries: int = 3
    backoff_seconds: float = 1.0
    jitter_factor: float = 0.5


FILE_RETRIES = RetrySettings()
# Failures that can heal by themselves: a flaky disk or network filesystem, a busy or reset peer.
# A missing file, a permission, a read-only or full disk does not heal by waiting, so it fails at once.
TRANSIENT_ERRNOS = frozenset(
    {
        errno.EIO,
        errno.EAGAIN,
        errno.EINTR,
        errno.EBUSY,
        errno.ETIMEDOUT,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.ECONNREFUSED,
        errno.EPIPE,
        errno.ENETDOWN,
        errno.ENETUNREACH,
        errno.EHOSTUNREACH,
        errno.ESTALE,
    }
)
# Parameters that do not shape a task's output (the shards of write_predictions are a function of its spec).
# `refresh` asks for a recomputation; it does not change what the output is.
UNKEYED = frozenset({"shards", "refresh"})
# Where, under an artifacts prefix on object storage, Prefect's task results are kept.
RESULTS_PREFIX = ".prefect-results"


def is_transient_error(error: BaseException | None) -> bool:
    """Whether retrying can fix this failure: EIO, EAGAIN, timeouts, connection resets and the like."""
    if isinstance(error, InputError):
        return False
    if isinstance(error, ConnectionError | TimeoutError):
        return True
    if isinstance(error, OSError) and error.errno in TRANSIENT_ERRNOS:
        return True
    return s3.is_transient(error)


def is_transient(task: Task, task_run: Any, state: State) -> bool:
    """Retry condition of the file tasks: only failures that can heal are retried."""
    return is_transient_error(state.data if isinstance(state.data, BaseException) else None)


def task_key(name: str, parameters: dict[str, Any]) -> str:
    """Cache key of a run of task `name`: every parameter that shapes its output, and the code version."""
    return storage.spec_key({"task": name, **{k: v for k, v in parameters.items() if k not in UNKEYED}})


def cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """Prefect's cache key of a file task: the same key its output's manifest records."""
    return task_key(context.task.name, parameters)


def _own_key() -> str:
    context = TaskRunContext.get()
    return cache_key(context, context.parameters)


def file_task(**options: Any):
    """Decorator for a heavy task: cached across runs as JSON, retried on transient file errors; `options` override."""
    defaults = {
        "cache_key_fn": cache_key,
        "persist_result": True,
        "result_serializer": "json",
        "retries": FILE_RETRIES.retries,
        "retry_delay_seconds": exponential_backoff(backoff_factor=FILE_RETRIES.backoff_seconds),
        "retry_jitter_factor": FILE_RETRIES.jitter_factor,
        "retry_condition_fn": is_transient,
    }
    return task(**{**defaults, **options})


class ObjectStoreResults(WritableFileSystem):
    """Prefect's result storage under an `s3://` prefix: a task cached on one machine is cached on every other."""

    _block_type_name = "featuresum object store results"
    basepath: str

    def _resolve_path(self, path: str) -> str:
        return path if storage.is_remote(path) else str(storage.join(self.basepath, path)) if path else self.basepath

    # Prefect calls these with `_sync=True` from its synchronous engine, and the `a`-methods from its async one.
    def read_path(self, path: str, _sync: bool = True) -> bytes:
        """The stored result record under `path`."""
        return storage.read_bytes(self._resolve_path(path))

    def write_path(self, path: str, content: bytes, _sync: bool = True) -> str:
        """Store a result record under `path`, whole or not at all."""
        storage.write_bytes(self._resolve_path(path), content)
        return path

    async def aread_path(self, path: str) -> bytes:
        """read_path, for Prefect's async engine."""
        return self.read_path(path)

    async def awrite_path(self, path: str, content: bytes) -> str:
        """write_path, for Prefect's async engine."""
        return self.write_path(path, content)


def result_storage(artifacts_dir: str) -> ObjectStoreResults | None:
    """Where the tasks of a run whose artifacts are on object storage keep their results: beside the artifacts.

    Prefect takes only result storage saved as a block on the server. The block holds the prefix
    alone; every machine reads its credentials from its own environment.
    """
    if not storage.is_remote(artifacts_dir):
        return None  # Prefect's local result storage (PREFECT_RESULTS_LOCAL_STORAGE_PATH)
    basepath = str(storage.join(storage.resolve(artifacts_dir), RESULTS_PREFIX))
    results = ObjectStoreResults(basepath=basepath)
    results.save(f"featuresum-results-{storage.spec_key({'results': basepath})[:16]}", overwrite=True)
    return results


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
    target, key = storage.at(path), _own_key()
    with storage.local_lock(target):
        if done := _reuse(target, key, refresh):
            return done
        get_run_logger().info("Generating %d %s rows for %s (seed %d) into %s", rows, stream, day, seed, path)
        shards = data.generate_dataset(seed, stream, rows, date.fromisoformat(day), drift)
        written = storage.write_parquet(target, storage.DATASET_SCHEMA, map(storage.shard_to_batch, shards))
        # The file is a pure function of its specification, which its path already hashes.
        spec = {"stream": stream, "rows": rows, "seed": seed, "day": day, "drift": drift}
        spec["code"] = storage.code_version()
        return storage.write_manifest(target, key, storage.spec_key(spec), written, rows=written.rows, date=day)


def identity_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """Cache key of a user's file: its path and identity, so an unchanged file is never hashed twice."""
    path = storage.at(parameters["path"])
    try:
        current = storage.identity(path)
    except OSError:
        current = {"missing": True}
    return storage.spec_key({"task": context.task.name, "path": str(path), **current})


@file_task(task_run_name="fingerprint-{path}", cache_key_fn=identity_key)
def fingerprint_input(path: str) -> dict[str, Any]:
    """Hash a user's file, so caching follows its content, not its name; reused while the file is unchanged.

    A file that a featuresum task wrote (a checkpoint, a generated batch) is not read again: while
    it is unchanged, the fingerprint in its manifest holds.
    """
    location = storage.at(path)
    if not storage.exists(location):
        raise InputError(f"{path}: no such file")
    manifest = storage.manifest_of(location)
    return {"path": path, "fingerprint": manifest["fingerprint"] if manifest else storage.fingerprint(location)}


@file_task(task_run_name="train-model-{config[epochs]}epochs-seed{config[seed]}")
def train_model(
    train: list[dict[str, Any]],
    holdout: dict[str, Any],
    config: dict[str, Any],
    device: str,
    path: str,
    init: dict[str, Any] | None = None,
    refresh: bool = False,
) -> dict[str, Any]:
    """Train the classifier on the window's partitions, checkpointing every epoch so a killed or retried run resumes.

    With `init` (a checkpoint's path and fingerprint), training starts from that model's weights.
    """
    target, key = storage.at(path), _own_key()
    with storage.local_lock(target):
        if done := _reuse(target, key, refresh):
            return done
        return _train(train, holdout, TrainConfig(**config), device, target, key, init)


def _train(
    train: list[dict[str, Any]],
    holdout: dict[str, Any],
    settings: TrainConfig,
    device: str,
    path: storage.Location,
    key: str,
    init: dict[str, Any] | None,
) -> dict[str, Any]:
    import torch

    from featuresum.tasks import training
    from featuresum.tasks.checkpoint import load_checkpoint, save_checkpoint

    logger = get_run_logger()
    target = torch.device(device)
    # Created before the data is read, so the first reading covers that time.
    threads = cpu.ThreadPolicy.for_torch() if target.type == "cpu" else None
    x, y = (t.to(target) for t in storage.read_dataset([storage.at(part["path"]) for part in train]))
    holdout_data = tuple(t.to(target) for t in storage.read_dataset(storage.at(holdout["path"])))
    steps = -(-len(x) // settings.batch_size)
    state = training.new_training_state(settings, steps, target)
    if init is not None:
        state.model.load_state_dict(load_checkpoint(init["path"], init["fingerprint"])["model"])
        logger.info("Starting from the weights of %s", init["path"])
    partial = storage.partial_checkpoint_path(path)
    if storage.exists(partial):
        try:
            training.restore(load_checkpoint(partial), state)
            logger.info("Resuming from %s after epoch %d", partial, state.epoch)
        except InputError as error:
            logger.warning("Ignoring unusable partial checkpoint: %s", error)
            state = training.new_training_state(settings, steps, target)
    start_epoch = state.epoch
    progress = create_progress_artifact(progress=100 * start_epoch / settings.epochs, description="Training")
    provenance = {
        "data_fingerprint": storage.spec_key({"partitions": [part["fingerprint"] for part in train]}),
        "holdout_fingerprint": holdout["fingerprint"],
        "init_fingerprint": init["fingerprint"] if init else None,
    }

    def on_epoch(state: training.TrainingState) -> None:
        save_checkpoint(partial, training.to_checkpoint(state, settings, provenance))
        last = state.history[-1]
        logger.info(
            "Epoch %d/%d: train loss %.4f, held-out accuracy %.4f",
            state.epoch,
            settings.epochs,
            last["train_loss"],
            last["val_accuracy"],
        )
        update_progress_artifact(progress, progress=100 * state.epoch / settings.epochs)

    if threads is not None:
        threads.adjust()
    try:
        training.fit(state, (x, y), holdout_data, settings, on_epoch, threads)
    finally:
        if threads is not None:
            torch.set_num_threads(threads.limit)
    if threads is not None and threads.changes:
        moves = ", ".join(f"{count} (others busy on {others:.1f} cores)" for count, others in threads.changes)
        logger.info("CPU threads followed the load of other processes: %d, then %s", threads.limit, moves)
    confusion = training.evaluate(state.model, *holdout_data)
    metrics = {
        "train_loss": state.history[-1]["train_loss"] if state.history else None,
        "val_accuracy": training.accuracy(confusion),
        "holdout_rows": len(holdout_data[0]),
    }
    baseline = monitoring.reference(*monitoring.training_figures(x.cpu().numpy()), confusion.sum(dim=0).tolist())
    extra = {**provenance, "metrics": metrics, "reference": baseline}
    written = save_checkpoint(path, training.to_checkpoint(state, settings, extra))
    storage.remove(partial)
    reports.publish_training(state.history, metrics, confusion, str(path))
    return storage.write_manifest(
        path,
        key,
        written=written,
        metrics=metrics,
        start_epoch=start_epoch,
        epochs_completed=state.epoch,
        history=state.history,
        config=asdict(settings),
        reference=baseline,
    )


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
    target, key = storage.at(path), _own_key()
    with storage.local_lock(target):
        if done := _reuse(target, key, refresh):
            return done
        import torch

        from featuresum.tasks.checkpoint import load_checkpoint, model_from_checkpoint

        where = torch.device(device)
        classifier = model_from_checkpoint(load_checkpoint(model["path"], model["fingerprint"]), where)
        summary = scoring.ScoreSummary()
        batches = storage.iter_feature_batches(storage.at(features["path"]), row_groups=row_groups)
        predictions = scoring.score_batches(classifier, batches, where, summary)
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
    target, key = storage.at(path), _own_key()
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
    _log_drift(stored)
    if stored["level"] == "alert" and not stored["alerted"] and _emit_drift(stored, folder, scored_by):
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


def _psi(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _log_drift(row: dict[str, Any]) -> None:
    """One log line with the batch's level: info when ok, a warning otherwise."""
    logger = get_run_logger()
    described = (
        f"batch of {row['run_date']}: feature-sum PSI {_psi(row['feature_sum_psi'])}, "
        f"predicted-class PSI {_psi(row['predicted_class_psi'])}, level {row['level']}"
    )
    if row["level"] == "ok":
        logger.info("No drift in the %s", described)
    elif row["level"] == "unknown":
        why = "no rows were scored" if not row["rows"] else "the model's checkpoint holds no reference"
        logger.warning("No drift figures for the %s: %s", described, why)
    else:
        logger.warning(
            "Drift in the %s (warn from %g, alert above %g)", described, row["drift_warn"], row["drift_alert"]
        )


def _emit_drift(row: dict[str, Any], artifacts_dir: storage.Location, scored_by: str) -> bool:
    """Tell Prefect's event system (automations, deployment triggers) that a batch drifted; whether it was sent."""
    from prefect.events import emit_event

    version = row["model_version"]
    name = f"model version {version}" if version is not None else f"model {row['model_fingerprint'][:12]}"
    emitted = emit_event(
        event=monitoring.DRIFT_EVENT,
        resource={
            "prefect.resource.id": f"featuresum.model.{version if version is not None else row['model_fingerprint']}",
            "prefect.resource.name": name,
            "featuresum.artifacts-dir": str(storage.resolve(artifacts_dir)),
            "featuresum.scored-by": scored_by,
        },
        payload={
            "date": row["run_date"],
            "level": row["level"],
            "feature_sum_psi": row["feature_sum_psi"],
            "predicted_class_psi": row["predicted_class_psi"],
            "accuracy": row["accuracy"],
            "rows": row["rows"],
            "model_version": version,
            "batch": row["batch"],
        },
    )
    if emitted is None:
        get_run_logger().warning("Could not send %s for %s: no Prefect events client", monitoring.DRIFT_EVENT, name)
        return False
    get_run_logger().warning("Sent %s for %s", monitoring.DRIFT_EVENT, name)
    return True

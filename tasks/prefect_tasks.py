"""Prefect tasks: thin wrappers that add retries, caching, logging and artifacts to the plain code.

Every task returns a small JSON manifest (path, fingerprint, metadata), never data or models.
"""

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.context import TaskRunContext
from prefect.states import State
from prefect.tasks import Task, exponential_backoff

from featuresum.tasks import data, reports, scoring, storage, training
from featuresum.tasks.errors import InputError


@dataclass(frozen=True)
class RetrySettings:
    """How tasks that touch files retry transient failures (OSError): count, backoff, jitter."""

    retries: int = 3
    backoff_seconds: float = 1.0
    jitter_factor: float = 0.5


FILE_RETRIES = RetrySettings()


def is_transient(task: Task, task_run: Any, state: State) -> bool:
    """Retry OS-level failures; bad input, bad options and bad checkpoints fail at once."""
    error = state.data
    return isinstance(error, OSError) and not isinstance(error, InputError)


def cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """Key from the task name, every parameter (input fingerprints included) and the code version."""
    return storage.spec_key({"task": context.task.name, **parameters})


def file_task(**options: Any):
    """Decorator for a heavy task: cached across runs as JSON, retried on transient file errors."""
    return task(
        cache_key_fn=cache_key,
        persist_result=True,
        result_serializer="json",
        retries=FILE_RETRIES.retries,
        retry_delay_seconds=exponential_backoff(backoff_factor=FILE_RETRIES.backoff_seconds),
        retry_jitter_factor=FILE_RETRIES.jitter_factor,
        retry_condition_fn=is_transient,
        **options,
    )


@file_task(task_run_name="generate-{stream}-{rows}rows-seed{seed}")
def generate_dataset(stream: str, rows: int, seed: int, path: str) -> dict[str, Any]:
    """Generate a labelled synthetic dataset and write it to Parquet."""
    logger = get_run_logger()
    logger.info("Generating %d %s rows (seed %d) into %s", rows, stream, seed, path)
    shards = map(storage.shard_to_batch, data.generate_dataset(seed, stream, rows))
    written = storage.write_parquet(Path(path), storage.DATASET_SCHEMA, shards)
    # The file is a pure function of its specification, which its name already hashes.
    spec = {"stream": stream, "rows": rows, "seed": seed, "code": storage.code_version()}
    return storage.write_manifest(Path(path), content_key=storage.spec_key(spec), rows=written)


@task(
    task_run_name="fingerprint-{path}",
    retries=FILE_RETRIES.retries,
    retry_delay_seconds=exponential_backoff(backoff_factor=FILE_RETRIES.backoff_seconds),
    retry_condition_fn=is_transient,
)
def fingerprint_input(path: str) -> dict[str, Any]:
    """Check a user's file and hash its content, so caching follows the content, not the name."""
    return {"path": path, "fingerprint": storage.fingerprint(Path(path))}


@file_task(task_run_name="train-model-{config[epochs]}epochs-seed{config[seed]}")
def train_model(
    train: dict[str, Any], holdout: dict[str, Any], config: dict[str, Any], device: str, path: str
) -> dict[str, Any]:
    """Train the classifier, checkpointing every epoch so a killed or retried run resumes."""
    logger = get_run_logger()
    settings = training.TrainConfig(**config)
    target = torch.device(device)
    x, y = (t.to(target) for t in storage.read_dataset(Path(train["path"])))
    holdout_data = tuple(t.to(target) for t in storage.read_dataset(Path(holdout["path"])))
    steps = -(-len(x) // settings.batch_size)
    state = training.new_training_state(settings, steps, target)
    partial = storage.partial_checkpoint_path(Path(path))
    if partial.exists():
        try:
            training.restore(storage.load_checkpoint(partial), state)
            logger.info("Resuming from %s after epoch %d", partial, state.epoch)
        except InputError as error:
            logger.warning("Ignoring unusable partial checkpoint: %s", error)
            state = training.new_training_state(settings, steps, target)
    start_epoch = state.epoch
    progress = create_progress_artifact(progress=100 * start_epoch / settings.epochs, description="Training")
    provenance = {"data_fingerprint": train["fingerprint"], "holdout_fingerprint": holdout["fingerprint"]}

    def on_epoch(state: training.TrainingState) -> None:
        storage.save_checkpoint(partial, training.to_checkpoint(state, settings, provenance))
        last = state.history[-1]
        logger.info(
            "Epoch %d/%d: train loss %.4f, held-out accuracy %.4f",
            state.epoch,
            settings.epochs,
            last["train_loss"],
            last["val_accuracy"],
        )
        update_progress_artifact(progress, progress=100 * state.epoch / settings.epochs)

    training.fit(state, (x, y), holdout_data, settings, on_epoch)
    confusion = training.evaluate(state.model, *holdout_data)
    metrics = {
        "train_loss": state.history[-1]["train_loss"] if state.history else None,
        "val_accuracy": training.accuracy(confusion),
        "holdout_rows": len(holdout_data[0]),
    }
    checkpoint = training.to_checkpoint(state, settings, {**provenance, "metrics": metrics})
    storage.save_checkpoint(Path(path), checkpoint)
    partial.unlink(missing_ok=True)
    reports.publish_training(state.history, metrics, confusion, path)
    return storage.write_manifest(
        Path(path),
        metrics=metrics,
        start_epoch=start_epoch,
        epochs_completed=state.epoch,
        history=state.history,
        config=asdict(settings),
    )


@file_task(task_run_name="score-shard-{index}")
def score_shard(
    model: dict[str, Any], features: dict[str, Any], row_groups: list[int], index: int, device: str, path: str
) -> dict[str, Any]:
    """Score some row groups of a feature file in streamed batches; write their predictions to Parquet."""
    target = torch.device(device)
    classifier = training.model_from_checkpoint(storage.load_checkpoint(Path(model["path"])), target)
    summary = scoring.ScoreSummary()
    batches = storage.iter_feature_batches(Path(features["path"]), row_groups=row_groups)
    storage.write_parquet(
        Path(path), storage.PREDICTIONS_SCHEMA, scoring.score_batches(classifier, batches, target, summary)
    )
    get_run_logger().info("Scored %d rows (row groups %s) into %s", summary.rows, row_groups, path)
    return storage.write_manifest(Path(path), **asdict(summary))


@file_task(task_run_name="write-predictions")
def write_predictions(shards: list[dict[str, Any]], path: str) -> dict[str, Any]:
    """Concatenate scored shards, in order, into the predictions Parquet file."""
    summary = scoring.ScoreSummary()
    for shard in shards:
        summary.add(shard["rows"], shard["labelled"], shard["correct"], shard["class_counts"])
    batches = storage.iter_parquet_batches(shard["path"] for shard in shards)
    rows = storage.write_parquet(Path(path), storage.PREDICTIONS_SCHEMA, batches)
    get_run_logger().info("Wrote %d predictions to %s (accuracy on labelled rows: %s)", rows, path, summary.accuracy)
    reports.publish_predictions(summary, path)
    return storage.write_manifest(
        Path(path), rows=rows, score_accuracy=summary.accuracy, class_counts=summary.class_counts
    )

"""Training a checkpoint from feature files: resumed after a crash, measured on held-out rows, recorded.

The plain body of the `train_model` task: whoever calls it passes the logger to write to and the
callbacks that show progress and publish the report.
"""

import logging
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch

from featuresum.tasks import batches, cpu, handoff, memory, monitoring, storage, training
from featuresum.tasks.checkpoint import load_checkpoint, save_checkpoint
from featuresum.tasks.errors import InputError
from featuresum.tasks.settings import TrainConfig

Logger = logging.Logger | logging.LoggerAdapter
# Called with the history, the metrics, the held-out confusion matrix and the checkpoint's location.
Report = Callable[[list[dict[str, float]], dict[str, Any], torch.Tensor, str], None]
HeldOut = tuple[torch.Tensor, torch.Tensor]


def train_checkpoint(
    train: list[dict[str, Any]],
    holdout: dict[str, Any],
    settings: TrainConfig,
    device: str,
    path: storage.Location,
    key: str,
    init: dict[str, Any] | None = None,
    memory_mb: int | None = None,
    *,
    logger: Logger | None = None,
    on_progress: Callable[[float], None] = lambda percent: None,
    on_report: Report = lambda history, metrics, confusion, checkpoint: None,
) -> dict[str, Any]:
    """Train on the partitions `train` into the checkpoint `path`, checkpointing every epoch; returns its manifest.

    `train`, `holdout` and `init` are files as the tasks pass them (path and fingerprint); with `init`
    training starts from that model's weights, and a partial checkpoint beside `path` is resumed.
    `key` is the cache key the manifest records; `on_progress` gets the percentage of epochs done,
    first when training starts and then after each epoch. The rows are held in memory when they fit
    `memory_mb` (unset: most of what is available), else streamed: see memory.memory_plan.
    """
    logger = logger or logging.getLogger(__name__)
    target = torch.device(device)
    # Created before the data is read, so the first reading covers that time.
    threads = cpu.ThreadPolicy.for_torch() if target.type == "cpu" else None
    # Rows this process generated for the run are handed over rather than read back (see handoff).
    handed, handed_held_out = handoff.take(train), handoff.take([holdout])
    data = _training_rows(train, holdout, settings, memory_mb, target, logger, handed, handed_held_out)
    held_out = handed_held_out or storage.read_dataset(storage.at(holdout["path"]))
    held_out = tuple(t.to(target) for t in held_out)
    partial = storage.partial_checkpoint_path(path)
    state = _starting_state(settings, -(-len(data) // settings.batch_size), target, init, partial, logger)
    start_epoch = state.epoch
    on_progress(100 * start_epoch / settings.epochs)
    provenance = _provenance(train, holdout, init)
    on_epoch = _epoch_end(partial, settings, provenance, logger, on_progress)
    _fit(state, data, held_out, settings, on_epoch, threads, logger)
    confusion, metrics, baseline = _measure(state, data, held_out)
    extra = {**provenance, "metrics": metrics, "reference": baseline}
    written = save_checkpoint(path, training.to_checkpoint(state, settings, extra))
    storage.remove(partial)
    on_report(state.history, metrics, confusion, str(path))
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


def _training_rows(
    train: list[dict[str, Any]],
    holdout: dict[str, Any],
    settings: TrainConfig,
    memory_mb: int | None,
    target: torch.device,
    logger: Logger,
    handed: handoff.Rows | None = None,
    handed_held_out: handoff.Rows | None = None,
) -> batches.Rows:
    """The training rows, held in memory when the budget allows, else streamed; the log says which.

    `handed` are the training rows when generation handed them over: memory they already take counts
    as available, as it did when the run chose to keep them.
    """
    paths = [storage.at(part["path"]) for part in train]
    groups = batches.row_groups(paths)
    blocks = [rows for _, _, rows in groups]
    rows, holdout_rows = sum(blocks), storage.open_features(storage.at(holdout["path"])).metadata.num_rows
    held = sum(t.nbytes for t in (*(handed or ()), *(handed_held_out or ())))
    plan = memory.memory_plan(rows, holdout_rows, settings.shuffle_rows, memory_mb, max(blocks, default=0), held)
    where = ", handed over as generated" if handed and plan.mode == "memory" else ""
    logger.info("Training on %s%s", plan.describe(rows, settings.shuffle_rows), where)
    if plan.mode == "stream":
        return batches.Streamed(groups, target)
    x, y = handed or storage.read_dataset(paths)
    return batches.InMemory(x.to(target), y.to(target), blocks)


def _starting_state(
    settings: TrainConfig,
    steps: int,
    target: torch.device,
    init: dict[str, Any] | None,
    partial: storage.Location,
    logger: Logger,
) -> training.TrainingState:
    """A fresh state (from `init`'s weights when given), or the one a partial checkpoint saved."""
    state = training.new_training_state(settings, steps, target)
    if init is not None:
        state.model.load_state_dict(load_checkpoint(init["path"], init["fingerprint"])["model"])
        logger.info("Starting from the weights of %s", init["path"])
    if storage.exists(partial):
        try:
            training.restore(load_checkpoint(partial), state)
            logger.info("Resuming from %s after epoch %d", partial, state.epoch)
        except InputError as error:
            logger.warning("Ignoring unusable partial checkpoint: %s", error)
            state = training.new_training_state(settings, steps, target)
    return state


def _provenance(
    train: list[dict[str, Any]], holdout: dict[str, Any], init: dict[str, Any] | None
) -> dict[str, str | None]:
    """What a checkpoint was trained from, as the fingerprints of its files.

    `data_fingerprint` identifies the training rows: one key over the partitions' fingerprints, in
    window order (it hashes no file itself). The others are the held-out file's and the initial
    model's own fingerprints.
    """
    return {
        "data_fingerprint": storage.spec_key({"partitions": [part["fingerprint"] for part in train]}),
        "holdout_fingerprint": holdout["fingerprint"],
        "init_fingerprint": init["fingerprint"] if init else None,
    }


def _epoch_end(
    partial: storage.Location,
    settings: TrainConfig,
    provenance: dict[str, str | None],
    logger: Logger,
    on_progress: Callable[[float], None],
) -> Callable[[training.TrainingState], None]:
    """What follows each epoch: the partial checkpoint written, a log line, the progress shown."""

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
        on_progress(100 * state.epoch / settings.epochs)

    return on_epoch


def _measure(
    state: training.TrainingState, data: batches.Rows, held_out: HeldOut
) -> tuple[torch.Tensor, dict[str, Any], dict]:
    """The trained model's held-out confusion matrix, its metrics, and its reference for drift."""
    confusion = training.evaluate(state.model, *held_out)
    metrics = {
        "train_loss": state.history[-1]["train_loss"] if state.history else None,
        "val_accuracy": training.accuracy(confusion),
        "holdout_rows": len(held_out[0]),
    }
    figures = monitoring.training_figures(chunk.cpu().numpy() for chunk in data.feature_chunks())
    return confusion, metrics, monitoring.reference(*figures, confusion.sum(dim=0).tolist())


def _fit(
    state: training.TrainingState,
    data: batches.Rows,
    held_out: HeldOut,
    settings: TrainConfig,
    on_epoch: Callable[[training.TrainingState], None],
    threads: cpu.ThreadPolicy | None,
    logger: Logger,
) -> None:
    """training.fit, with the CPU thread count following the load of other processes when `threads` is given."""
    if threads is not None:
        threads.adjust()
    try:
        training.fit(state, data, held_out, settings, on_epoch, threads)
    finally:
        if threads is not None:
            torch.set_num_threads(threads.limit)
    if threads is not None and threads.changes:
        moves = ", ".join(f"{count} (others busy on {others:.1f} cores)" for count, others in threads.changes)
        logger.info("CPU threads followed the load of other processes: %d, then %s", threads.limit, moves)

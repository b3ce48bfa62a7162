"""The featuresum flows: train, score, and the whole pipeline that chains them."""

from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.tasks import Task

from featuresum.flows.presets import DEFAULT, SHARD_ROWS
from featuresum.tasks import storage
from featuresum.tasks.errors import InputError
from featuresum.tasks.prefect_tasks import (
    fingerprint_input,
    generate_dataset,
    score_shard,
    task_key,
    train_model,
    write_predictions,
)
from featuresum.tasks.training import TrainConfig, resolve_device

Device = Literal["auto", "cpu", "cuda"]
Schedule = Literal["onecycle", "constant"]
# Task runs started by each flow run of this process, {flow run id: {task run id: state name}}, so
# the CLI can wait for every one of them to be recorded, including those of a failed run.
TASK_RUNS: dict[str, dict[str, str]] = {}
# In-process shards run one at a time: torch already uses every core, and memory stays bounded.
IN_PROCESS = ThreadPoolTaskRunner(max_workers=1)


def _task_runs() -> dict[str, str]:
    """The task-run record of the current flow run (see TASK_RUNS)."""
    return TASK_RUNS.setdefault(str(flow_run.id), {})


def _call(task: Task, states: dict[str, str], **parameters: Any) -> dict:
    """Run a task, note its task run and final state, and return its result (raising if it failed)."""
    state = task(**parameters, return_state=True)
    states[str(state.state_details.task_run_id)] = state.name
    return state.result()


def _cached(task: Task, path: Path, refresh: bool, **parameters: Any) -> tuple[Task, dict[str, Any]]:
    """The task, forced to recompute unless `path` is the very file that a run with these parameters wrote.

    Prefect's cache record alone would be reused even when the file was since deleted, rewritten,
    or overwritten by a run with other inputs (the same --output, say); the manifest beside the
    file records the cache key of the run that wrote it, and must match.
    """
    parameters = {**parameters, "path": str(path)}
    fresh = storage.is_intact(path, task_key(task.name, parameters))
    return task.with_options(refresh_cache=refresh or not fresh), parameters


def _run_cached(task: Task, path: Path, refresh: bool, states: dict[str, str], **parameters: Any) -> dict:
    """Call a cached task in the flow's process and return its result."""
    task, parameters = _cached(task, path, refresh, **parameters)
    return _call(task, states, **parameters)


def _ref(manifest: dict[str, Any]) -> dict[str, str]:
    """What a downstream task needs of an upstream file: where it is and what it holds."""
    return {"path": manifest["path"], "fingerprint": manifest["fingerprint"]}


def _generate(stream: str, rows: int, seed: int, data_dir: str, refresh: bool, states: dict) -> dict:
    spec = {"stream": stream, "rows": rows, "seed": seed}
    path = storage.output_path(Path(data_dir).resolve(), stream, spec, ".parquet")
    return _run_cached(generate_dataset, path, refresh, states, **spec)


def _score(
    model: dict,
    features: dict,
    device: str,
    artifacts_dir: str,
    output: str | None,
    shard_rows: int,
    refresh: bool,
    states: dict,
) -> dict:
    """Score the feature file in shards of row groups on the flow's task runner, then combine them.

    When the predictions file is already the one these inputs give, no shard runs at all.
    """
    scored = {"model": _ref(model), "features": _ref(features), "device": device}
    if output:
        path = Path(output).resolve()
    else:
        path = storage.output_path(Path(artifacts_dir).resolve(), "predictions", scored, ".parquet")
    combine, combined = _cached(write_predictions, path, refresh, **scored, shards=None)
    if combine.refresh_cache:
        combined["shards"] = _score_shards(scored, path, shard_rows, refresh, states)
    return _call(combine, states, **combined)


def _score_shards(scored: dict, path: Path, shard_rows: int, refresh: bool, states: dict) -> list[dict]:
    futures = []
    for index, row_groups in enumerate(storage.row_group_shards(Path(scored["features"]["path"]), shard_rows)):
        shard = {**scored, "row_groups": row_groups, "index": index}
        part = storage.part_path(path, index, {**shard, "code": storage.code_version()})
        task, parameters = _cached(score_shard, part, refresh, **shard)
        futures.append(task.submit(**parameters))
    shards = []
    for future in futures:
        future.wait()
        states[str(future.task_run_id)] = future.state.name
        shard = future.result()
        shards.append({k: shard[k] for k in ("path", "fingerprint", "rows", "labelled", "correct", "class_counts")})
    return shards


def _sweep(*directories: str) -> None:
    """Remove temporary files that killed runs left behind (never a live run's)."""
    for directory in map(Path, directories):
        if directory.is_dir() and (removed := storage.sweep_leftovers(directory)):
            get_run_logger().info("Removed %d leftover temporary files of killed runs in %s", len(removed), directory)


def _device(requested: str) -> str:
    device, warning = resolve_device(requested)
    if warning:
        get_run_logger().warning(warning)
    return device


def _train(
    train_samples: int,
    holdout_samples: int,
    config: TrainConfig,
    data_dir: str,
    artifacts_dir: str,
    device: str,
    refresh: bool,
    states: dict,
) -> tuple[dict, dict]:
    """Generate the training and held-out sets, then train; returns (training data, checkpoint)."""
    train = _generate("train", train_samples, config.seed, data_dir, refresh, states)
    # A different stream name gives the held-out rows a seed of their own.
    holdout = _generate("holdout", holdout_samples, config.seed, data_dir, refresh, states)
    parameters = {"train": _ref(train), "holdout": _ref(holdout), "config": asdict(config), "device": device}
    path = storage.output_path(Path(artifacts_dir).resolve(), "model", parameters, ".pt")
    return train, _run_cached(train_model, path, refresh, states, **parameters)


def _summary(states: dict[str, str], **outputs: dict) -> dict[str, Any]:
    """Paths, metrics and task runs of a flow run, as the CLI reports them."""
    summary: dict[str, Any] = {"flow_run_id": str(flow_run.id), "task_runs": states, "metrics": {}}
    for key, manifest in outputs.items():
        summary[key] = manifest["path"]
        summary["metrics"].update(manifest.get("metrics", {}))
        if "score_accuracy" in manifest:
            summary["metrics"]["score_accuracy"] = manifest["score_accuracy"]
            summary["predicted_rows"] = manifest["rows"]
        if "start_epoch" in manifest:
            summary["start_epoch"] = manifest["start_epoch"]
            summary["epochs_completed"] = manifest["epochs_completed"]
    return summary


@flow(name="featuresum-train", flow_run_name="train-seed{seed}-{train_samples}rows-{epochs}epochs")
def train_flow(
    train_samples: int = DEFAULT.train_samples,
    holdout_samples: int = DEFAULT.holdout_samples,
    epochs: int = DEFAULT.epochs,
    batch_size: int = DEFAULT.batch_size,
    lr: float = DEFAULT.lr,
    weight_decay: float = DEFAULT.weight_decay,
    schedule: Schedule = DEFAULT.schedule,
    seed: int = 0,
    data_dir: str = "data",
    artifacts_dir: str = "artifacts",
    device: Device = "auto",
    refresh: bool = False,
) -> dict[str, Any]:
    """Generate training and held-out data, train, checkpoint and evaluate the model."""
    states = _task_runs()
    _sweep(data_dir, artifacts_dir)
    config = TrainConfig(epochs, batch_size, lr, weight_decay, schedule, seed)
    train, model = _train(
        train_samples, holdout_samples, config, data_dir, artifacts_dir, _device(device), refresh, states
    )
    return _summary(states, train_data=train, checkpoint=model)


def _refuse_overwriting_inputs(output: str | None, *inputs: str | None) -> None:
    """An output that is one of the run's own inputs would destroy it: refuse before anything runs."""
    if output is None:
        return
    for given in filter(None, inputs):
        if Path(output).resolve() == Path(given).resolve():
            raise InputError(f"{output}: the output would overwrite an input of this run; choose another --output")


@flow(name="featuresum-score", flow_run_name="score-seed{seed}", task_runner=IN_PROCESS)
def score_flow(
    model: str,
    input: str | None = None,
    samples: int | None = None,
    seed: int = 0,
    output: str | None = None,
    data_dir: str = "data",
    artifacts_dir: str = "artifacts",
    device: Device = "auto",
    shard_rows: int = SHARD_ROWS,
    refresh: bool = False,
) -> dict[str, Any]:
    """Score a Parquet file, or a freshly generated batch of `samples` rows, with a checkpoint."""
    states = _task_runs()
    _refuse_overwriting_inputs(output, model, input)
    _sweep(data_dir, artifacts_dir)
    fingerprint = fingerprint_input.with_options(refresh_cache=refresh)
    checkpoint = _call(fingerprint, states, path=str(Path(model).resolve()))
    if input is not None:
        features = _call(fingerprint, states, path=str(Path(input).resolve()))
    else:
        rows = DEFAULT.score_samples if samples is None else samples
        features = _generate("score", rows, seed, data_dir, refresh, states)
    device = _device(device)
    predictions = _score(checkpoint, features, device, artifacts_dir, output, shard_rows, refresh, states)
    return _summary(states, checkpoint=checkpoint, score_input=features, predictions=predictions)


@flow(
    name="featuresum-pipeline",
    flow_run_name="pipeline-seed{seed}-train{train_samples}-score{score_samples}",
    task_runner=IN_PROCESS,
)
def pipeline_flow(
    train_samples: int = DEFAULT.train_samples,
    holdout_samples: int = DEFAULT.holdout_samples,
    score_samples: int = DEFAULT.score_samples,
    epochs: int = DEFAULT.epochs,
    batch_size: int = DEFAULT.batch_size,
    lr: float = DEFAULT.lr,
    weight_decay: float = DEFAULT.weight_decay,
    schedule: Schedule = DEFAULT.schedule,
    seed: int = 0,
    data_dir: str = "data",
    artifacts_dir: str = "artifacts",
    device: Device = "auto",
    shard_rows: int = SHARD_ROWS,
    refresh: bool = False,
) -> dict[str, Any]:
    """Generate data, train and checkpoint the model, then score a new batch to predictions Parquet."""
    states = _task_runs()
    _sweep(data_dir, artifacts_dir)
    device = _device(device)
    config = TrainConfig(epochs, batch_size, lr, weight_decay, schedule, seed)
    train, model = _train(train_samples, holdout_samples, config, data_dir, artifacts_dir, device, refresh, states)
    batch = _generate("score", score_samples, seed, data_dir, refresh, states)
    predictions = _score(model, batch, device, artifacts_dir, None, shard_rows, refresh, states)
    return _summary(states, train_data=train, checkpoint=model, score_input=batch, predictions=predictions)

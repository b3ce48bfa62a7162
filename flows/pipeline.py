"""The featuresum flows: train, score, and the whole pipeline that chains them."""

from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.tasks import Task

from featuresum.tasks import storage
from featuresum.tasks.prefect_tasks import (
    fingerprint_input,
    generate_dataset,
    score_shard,
    train_model,
    write_predictions,
)
from featuresum.tasks.training import TrainConfig, resolve_device

Device = Literal["auto", "cpu", "cuda"]
Schedule = Literal["onecycle", "constant"]

# Named sets of sizes and optimiser settings; explicit options override a preset's values.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {
        "train_samples": 300_000,
        "holdout_samples": 20_000,
        "score_samples": 10_000,
        "epochs": 4,
        "batch_size": 256,
        "lr": 0.003,
        "weight_decay": 0.1,
        "schedule": "onecycle",
    },
    "full": {
        "train_samples": 800_000,
        "holdout_samples": 100_000,
        "score_samples": 100_000,
        "epochs": 6,
        "batch_size": 256,
        "lr": 0.003,
        "weight_decay": 0.1,
        "schedule": "onecycle",
    },
}
DEFAULTS = PRESETS["default"]
# Rows per scoring shard (whole row groups); each shard is one task run, in parallel on Dask.
SHARD_ROWS = 262_144
# In-process shards run one at a time: torch already uses every core, and memory stays bounded.
IN_PROCESS = ThreadPoolTaskRunner(max_workers=1)


def _call(task: Task, states: dict[str, str], **parameters: Any) -> dict:
    """Run a task, note its task run and final state, and return its result (raising if it failed)."""
    state = task(**parameters, return_state=True)
    states[str(state.state_details.task_run_id)] = state.name
    return state.result()


def _cached(task: Task, path: Path, refresh: bool) -> Task:
    """The task, forced to recompute when asked to or when its output file is no longer intact."""
    return task.with_options(refresh_cache=refresh or not storage.is_intact(path))


def _run_cached(task: Task, path: Path, refresh: bool, states: dict[str, str], **parameters: Any) -> dict:
    """Call a cached task in the flow's process and return its result."""
    return _call(_cached(task, path, refresh), states, path=str(path), **parameters)


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
    """Score the feature file in shards of row groups on the flow's task runner, then combine them."""
    parameters = {"model": _ref(model), "features": _ref(features), "device": device}
    if output:
        path = Path(output).resolve()
    else:
        path = storage.output_path(Path(artifacts_dir).resolve(), "predictions", parameters, ".parquet")
    futures = []
    for index, row_groups in enumerate(storage.row_group_shards(Path(features["path"]), shard_rows)):
        part = storage.part_path(path, index)
        task = _cached(score_shard, part, refresh)
        futures.append(task.submit(**parameters, row_groups=row_groups, index=index, path=str(part)))
    shards = []
    for future in futures:
        future.wait()
        states[str(future.task_run_id)] = future.state.name
        shard = future.result()
        shards.append({k: shard[k] for k in ("path", "fingerprint", "rows", "labelled", "correct", "class_counts")})
    return _run_cached(write_predictions, path, refresh, states, shards=shards)


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
    train_samples: int = DEFAULTS["train_samples"],
    holdout_samples: int = DEFAULTS["holdout_samples"],
    epochs: int = DEFAULTS["epochs"],
    batch_size: int = DEFAULTS["batch_size"],
    lr: float = DEFAULTS["lr"],
    weight_decay: float = DEFAULTS["weight_decay"],
    schedule: Schedule = DEFAULTS["schedule"],
    seed: int = 0,
    data_dir: str = "data",
    artifacts_dir: str = "artifacts",
    device: Device = "auto",
    refresh: bool = False,
) -> dict[str, Any]:
    """Generate training and held-out data, train, checkpoint and evaluate the model."""
    states: dict[str, str] = {}
    config = TrainConfig(epochs, batch_size, lr, weight_decay, schedule, seed)
    train, model = _train(
        train_samples, holdout_samples, config, data_dir, artifacts_dir, _device(device), refresh, states
    )
    return _summary(states, train_data=train, checkpoint=model)


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
    states: dict[str, str] = {}
    checkpoint = _call(fingerprint_input, states, path=str(Path(model).resolve()))
    if input is not None:
        features = _call(fingerprint_input, states, path=str(Path(input).resolve()))
    else:
        features = _generate("score", samples or DEFAULTS["score_samples"], seed, data_dir, refresh, states)
    device = _device(device)
    predictions = _score(checkpoint, features, device, artifacts_dir, output, shard_rows, refresh, states)
    return _summary(states, checkpoint=checkpoint, score_input=features, predictions=predictions)


@flow(
    name="featuresum-pipeline",
    flow_run_name="pipeline-seed{seed}-train{train_samples}-score{score_samples}",
    task_runner=IN_PROCESS,
)
def pipeline_flow(
    train_samples: int = DEFAULTS["train_samples"],
    holdout_samples: int = DEFAULTS["holdout_samples"],
    score_samples: int = DEFAULTS["score_samples"],
    epochs: int = DEFAULTS["epochs"],
    batch_size: int = DEFAULTS["batch_size"],
    lr: float = DEFAULTS["lr"],
    weight_decay: float = DEFAULTS["weight_decay"],
    schedule: Schedule = DEFAULTS["schedule"],
    seed: int = 0,
    data_dir: str = "data",
    artifacts_dir: str = "artifacts",
    device: Device = "auto",
    shard_rows: int = SHARD_ROWS,
    refresh: bool = False,
) -> dict[str, Any]:
    """Generate data, train and checkpoint the model, then score a new batch to predictions Parquet."""
    states: dict[str, str] = {}
    device = _device(device)
    config = TrainConfig(epochs, batch_size, lr, weight_decay, schedule, seed)
    train, model = _train(train_samples, holdout_samples, config, data_dir, artifacts_dir, device, refresh, states)
    batch = _generate("score", score_samples, seed, data_dir, refresh, states)
    predictions = _score(model, batch, device, artifacts_dir, None, shard_rows, refresh, states)
    return _summary(states, train_data=train, checkpoint=model, score_input=batch, predictions=predictions)

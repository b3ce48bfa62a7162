"""The featuresum flows: train, score, and the whole pipeline that chains them."""

from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.tasks import Task

from featuresum.flows.presets import DEFAULT, SHARD_ROWS
from featuresum.tasks import reports, storage
from featuresum.tasks.errors import InputError
from featuresum.tasks.prefect_tasks import (
    evaluate_model,
    fingerprint_input,
    generate_dataset,
    score_shard,
    task_key,
    train_model,
    write_predictions,
)
from featuresum.tasks.registry import Registry
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
) -> tuple[dict, dict, dict]:
    """Generate the training and held-out sets, then train; returns (training data, held-out data, checkpoint)."""
    train = _generate("train", train_samples, config.seed, data_dir, refresh, states)
    # A different stream name gives the held-out rows a seed of their own.
    holdout = _generate("holdout", holdout_samples, config.seed, data_dir, refresh, states)
    parameters = {"train": _ref(train), "holdout": _ref(holdout), "config": asdict(config), "device": device}
    path = storage.output_path(Path(artifacts_dir).resolve(), "model", parameters, ".pt")
    return train, holdout, _run_cached(train_model, path, refresh, states, **parameters)


def _gate(model: dict, holdout: dict, artifacts_dir: str, min_improvement: float, device: str, states: dict) -> dict:
    """Register the trained model as a version; make it the champion when there is none or it is better.

    The challenger's held-out accuracy is measured by training; the champion's on the same held-out
    rows by a cached task. A concurrent run that moves the champion meanwhile makes the gate decide
    again against the new champion (compare-and-set), so no promotion is lost or made blindly.
    """
    registry = Registry(Path(artifacts_dir).resolve())
    run_id = str(flow_run.id)
    challenger = registry.register(
        model["path"], model["fingerprint"], config=model["config"], metrics=model["metrics"], flow_run_id=run_id
    )
    challenger_accuracy = model["metrics"]["val_accuracy"]
    while True:
        champion, champion_accuracy = registry.alias(), None
        if champion is None:
            promoted, reason = True, "first model: there was no champion"
        elif champion.version == challenger.version:
            promoted, reason, champion_accuracy = False, "the challenger is the champion already", challenger_accuracy
        elif not Path(champion.checkpoint).is_file():
            promoted, reason = True, f"the champion's checkpoint {champion.checkpoint} is gone"
        else:
            reference = {"path": champion.checkpoint, "fingerprint": champion.fingerprint}
            measured = _call(evaluate_model, states, model=reference, holdout=_ref(holdout), device=device)
            champion_accuracy = measured["accuracy"]
            promoted = challenger_accuracy >= champion_accuracy + min_improvement
            comparison = ">=" if promoted else "<"
            reason = (
                f"held-out accuracy {challenger_accuracy:.4f} {comparison} champion's {champion_accuracy:.4f}"
                f" + min improvement {min_improvement:g}"
            )
        expected = champion.version if champion else None
        if not promoted or registry.set_alias(challenger.version, reason, flow_run_id=run_id, expected=expected):
            break
    now = registry.alias()
    decision = {
        "model_version": challenger.version,
        "champion_version": now.version,
        "previous_champion": champion.version if champion else None,
        "promoted": promoted,
        "challenger_accuracy": challenger_accuracy,
        "champion_accuracy": champion_accuracy,
        "reason": reason,
    }
    get_run_logger().info("Promotion gate: %s", decision)
    reports.publish_promotion(decision)
    return {**decision, "champion": {"path": now.checkpoint, "fingerprint": now.fingerprint}}


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


def _registered(summary: dict[str, Any], gate: dict[str, Any]) -> dict[str, Any]:
    """The summary with the trained model's version and the gate's decision, as `--json` reports them."""
    registry = {key: gate[key] for key in ("champion_version", "promoted", "challenger_accuracy", "champion_accuracy")}
    return {**summary, "model_version": gate["model_version"], "registry": {**registry, "reason": gate["reason"]}}


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
    min_improvement: float = 0.0,
    refresh: bool = False,
) -> dict[str, Any]:
    """Generate training and held-out data, train, checkpoint and evaluate the model, then gate it."""
    states = _task_runs()
    _sweep(data_dir, artifacts_dir)
    config = TrainConfig(epochs, batch_size, lr, weight_decay, schedule, seed)
    device = _device(device)
    train, holdout, model = _train(
        train_samples, holdout_samples, config, data_dir, artifacts_dir, device, refresh, states
    )
    gate = _gate(model, holdout, artifacts_dir, min_improvement, device, states)
    return _registered(_summary(states, train_data=train, holdout_data=holdout, checkpoint=model), gate)


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
    summary = _summary(states, checkpoint=checkpoint, score_input=features, predictions=predictions)
    if registered := Registry(Path(artifacts_dir).resolve()).find(checkpoint["fingerprint"]):
        summary["model_version"] = registered.version
    return summary


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
    min_improvement: float = 0.0,
    refresh: bool = False,
) -> dict[str, Any]:
    """Generate data, train and checkpoint a challenger, gate it, then score a new batch with the champion."""
    states = _task_runs()
    _sweep(data_dir, artifacts_dir)
    device = _device(device)
    config = TrainConfig(epochs, batch_size, lr, weight_decay, schedule, seed)
    train, holdout, model = _train(
        train_samples, holdout_samples, config, data_dir, artifacts_dir, device, refresh, states
    )
    gate = _gate(model, holdout, artifacts_dir, min_improvement, device, states)
    batch = _generate("score", score_samples, seed, data_dir, refresh, states)
    predictions = _score(gate["champion"], batch, device, artifacts_dir, None, shard_rows, refresh, states)
    outputs = {"train_data": train, "holdout_data": holdout, "checkpoint": model, "score_input": batch}
    summary = _summary(states, **outputs, predictions=predictions)
    return {**_registered(summary, gate), "scored_with": gate["champion"]["path"]}

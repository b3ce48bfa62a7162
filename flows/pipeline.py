"""The featuresum flows: train, score, and the whole pipeline that chains them."""

import os
import socket
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import asdict, dataclass
from datetime import UTC, date, timedelta
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.tasks import Task

from featuresum.flows.presets import DEFAULT, DRIFT_ALERT, DRIFT_WARN, SHARD_ROWS
from featuresum.tasks import monitoring, reports, storage
from featuresum.tasks.errors import EnvironmentFailure, InputError
from featuresum.tasks.prefect_tasks import (
    evaluate_model,
    fingerprint_input,
    generate_dataset,
    monitor_batch,
    result_storage,
    score_shard,
    task_key,
    train_model,
    write_predictions,
)
from featuresum.tasks.registry import Registry, changed_weights, refuse_managed_output
from featuresum.tasks.settings import TrainConfig, resolve_device

Device = Literal["auto", "cpu", "cuda"]
Schedule = Literal["onecycle", "constant"]
Init = Literal["scratch", "champion"]
# Task runs started by each flow run of this process, {flow run id: {task run id: state name}}, so
# the CLI can wait for every one of them to be recorded, including those of a failed run.
TASK_RUNS: dict[str, dict[str, str]] = {}
# In-process shards run one at a time: torch already uses every core, and memory stays bounded.
IN_PROCESS = ThreadPoolTaskRunner(max_workers=1)
# The result storage of the current flow run's tasks, when its artifacts are on object storage.
RESULTS: ContextVar[Any] = ContextVar("featuresum_results", default=None)


def _task_runs() -> dict[str, str]:
    """The task-run record of the current flow run (see TASK_RUNS)."""
    return TASK_RUNS.setdefault(str(flow_run.id), {})


def _stored(task: Task) -> Task:
    """The task, keeping its results where the run's artifacts are when they are on object storage.

    Set on each task rather than on the flow, so tasks on Dask workers, which share no disk with the
    flow, read and write the same cache records as every other machine.
    """
    results = RESULTS.get()
    return task if results is None else task.with_options(result_storage=results)


def _call(task: Task, states: dict[str, str], **parameters: Any) -> dict:
    """Run a task, note its task run and final state, and return its result (raising if it failed)."""
    state = _stored(task)(**parameters, return_state=True)
    states[str(state.state_details.task_run_id)] = state.name
    return state.result()


def _cached(task: Task, path: storage.Location, refresh: bool, **parameters: Any) -> tuple[Task, dict[str, Any]]:
    """The task, forced to recompute unless `path` is the very file that a run with these parameters wrote.

    Prefect's cache record alone would be reused even when the file was since deleted, rewritten,
    or overwritten by a run with other inputs (the same --output, say); the manifest beside the
    file records the cache key of the run that wrote it, and must match.
    """
    parameters = {**parameters, "path": str(path), "refresh": refresh}
    fresh = storage.is_intact(path, task_key(task.name, parameters))
    return task.with_options(refresh_cache=refresh or not fresh), parameters


def _run_cached(task: Task, path: storage.Location, refresh: bool, states: dict[str, str], **parameters: Any) -> dict:
    """Call a cached task in the flow's process and return its result."""
    task, parameters = _cached(task, path, refresh, **parameters)
    return _call(task, states, **parameters)


def _ref(manifest: dict[str, Any]) -> dict[str, str]:
    """What a downstream task needs of an upstream file: where it is and what it holds."""
    return {"path": manifest["path"], "fingerprint": manifest["fingerprint"]}


@dataclass(frozen=True)
class Source:
    """The synthetic source of a run's partitions: its seed, its drift per day, and the folder they go to."""

    seed: int
    drift: float
    data_dir: str


def _generate(stream: str, rows: int, day: date, source: Source, refresh: bool, states: dict) -> dict:
    """One date's partition of a stream (cached: a date already generated is never generated again)."""
    spec = {"stream": stream, "rows": rows, "seed": source.seed, "drift": source.drift}
    path = storage.partition_path(storage.resolve(source.data_dir), stream, spec, day)
    return _run_cached(generate_dataset, path, refresh, states, **spec, day=day.isoformat())


def run_day(run_date: str | None) -> date:
    """The date a run processes: the one given, else the day (UTC) of the run's scheduled start.

    A scheduled run that starts late or is retried still processes the date it was scheduled for.
    """
    if run_date:
        return date.fromisoformat(run_date)
    return flow_run.scheduled_start_time.astimezone(UTC).date()


def _run_name(kind: str) -> Callable[[], str]:
    """A flow run name with the run's date, for the UI's list of runs."""

    def name() -> str:
        parameters = flow_run.parameters
        return f"{kind}-{run_day(parameters.get('run_date'))}-seed{parameters.get('seed', 0)}"

    return name


def _describe_run(day: date) -> None:
    """Add the run's date to its tags, and record its process (host:pid), in one API call.

    The date tag lets the UI filter runs by the date they processed. A deployment run that a drift
    alert started (through the deployment's trigger) is tagged as such instead of `scheduled`, so
    the UI tells it from the runs of the schedule. The process lets a backfill tell a run in flight
    from one whose process died without a word (SIGKILL, out of memory, a reboot).
    """
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext

    # The run as the engine read it: `prefect.runtime.deployment.id` would ask the API again.
    run = FlowRunContext.get().flow_run
    tags = [*run.tags, f"date-{day}"]
    if run.deployment_id and monitoring.started_by_drift(run.created_by):
        tags = [tag for tag in tags if tag != "scheduled"] + [monitoring.RETRAIN_TAG]
    with get_client(sync_client=True) as client:
        client.update_flow_run(
            run.id, tags=list(dict.fromkeys(tags)), infrastructure_pid=f"{socket.gethostname()}:{os.getpid()}"
        )


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
        path = storage.resolve(output)
    else:
        path = storage.output_path(storage.resolve(artifacts_dir), "predictions", scored, ".parquet")
    combine, combined = _cached(write_predictions, path, refresh, **scored, shards=None)
    if combine.refresh_cache:
        combined["shards"] = _score_shards(scored, path, shard_rows, refresh, states)
    return _call(combine, states, **combined)


def _score_shards(scored: dict, path: storage.Location, shard_rows: int, refresh: bool, states: dict) -> list[dict]:
    futures = []
    for index, row_groups in enumerate(storage.row_group_shards(storage.at(scored["features"]["path"]), shard_rows)):
        shard = {**scored, "row_groups": row_groups, "index": index}
        part = storage.part_path(path, index, {**shard, "code": storage.code_version()})
        task, parameters = _cached(score_shard, part, refresh, **shard)
        futures.append(_stored(task).submit(**parameters))
    shards = []
    for future in futures:
        future.wait()
        states[str(future.task_run_id)] = future.state.name
        shard = future.result()
        shards.append({k: shard[k] for k in ("path", "fingerprint", "rows", "labelled", "correct", "class_counts")})
    return shards


def _monitor(
    model: dict,
    batch: dict,
    predictions: dict,
    day: date,
    thresholds: dict[str, float],
    artifacts_dir: str,
    scored_by: str,
    refresh: bool,
    states: dict,
) -> dict[str, Any]:
    """Drift and accuracy of the scored batch, added to the monitoring history; returns `--json`'s drift."""
    registered = Registry(storage.resolve(artifacts_dir)).find(model["fingerprint"])
    monitored = _call(
        monitor_batch,
        states,
        model=_ref(model),
        batch=_ref(batch),
        predictions={key: predictions.get(key) for key in ("path", "fingerprint", "score_accuracy", "labelled_rows")},
        run_date=day.isoformat(),
        model_version=registered.version if registered else None,
        thresholds=thresholds,
        artifacts_dir=str(storage.resolve(artifacts_dir)),
        scored_by=scored_by,
        refresh=refresh,
    )
    return monitored["drift"]


def _sweep(*directories: str) -> None:
    """Remove temporary files that killed runs left behind (never a live run's)."""
    for directory in directories:
        if storage.is_remote(directory):
            continue  # a killed upload leaves no object under a final key; see README on the store's lifecycle
        directory = Path(directory)
        if directory.is_dir() and (removed := storage.sweep_leftovers(directory)):
            get_run_logger().info("Removed %d leftover temporary files of killed runs in %s", len(removed), directory)


def _device(requested: str) -> str:
    device, warning = resolve_device(requested)
    if warning:
        get_run_logger().warning(warning)
    return device


@dataclass(frozen=True)
class Window:
    """The rows a run trains and is judged on: `train_samples` over the last `days` partitions up to `day`."""

    day: date
    days: int
    train_samples: int
    holdout_samples: int

    def dates(self) -> list[date]:
        """The window's dates, oldest first."""
        return [self.day - timedelta(days=back) for back in reversed(range(self.days))]

    def as_dict(self) -> dict[str, Any]:
        """The window as the registry records it."""
        return {"from": self.dates()[0].isoformat(), "to": self.day.isoformat(), "days": self.days}


def _train(
    window: Window,
    source: Source,
    config: TrainConfig,
    artifacts_dir: str,
    device: str,
    init: str,
    refresh: bool,
    states: dict,
) -> tuple[dict, dict, dict]:
    """Generate the window's training partitions and the date's held-out rows, then train a challenger.

    Returns (training data, held-out data, checkpoint). Each date holds an equal share of the
    training rows, so moving the window by a day generates one new partition and reuses the rest.
    """
    per_day = max(1, window.train_samples // window.days)
    train = [_generate("train", per_day, day, source, refresh, states) for day in window.dates()]
    # Streams of their own give the held-out rows (and the batch to score) seeds of their own.
    holdout = _generate("holdout", window.holdout_samples, window.day, source, refresh, states)
    parameters = {
        "train": [_ref(part) for part in train],
        "holdout": _ref(holdout),
        "config": asdict(config),
        "device": device,
        "init": _initial_weights(init, window.day, artifacts_dir),
    }
    path = storage.output_path(storage.resolve(artifacts_dir), "model", parameters, ".pt")
    registry = Registry(storage.resolve(artifacts_dir))
    if storage.exists(path) and (changed := registry.changed_at(path, storage.fingerprint(path))):
        raise EnvironmentFailure(
            f"{path}: the checkpoint of model version {changed.version} no longer holds its registered"
            " weights, and a registered version is never trained over: restore the file, or delete it"
            " to train it again"
        )
    if refresh and (kept := registry.at_checkpoint(path)) and storage.exists(path):
        get_run_logger().info("%s is model version %d: reused, never retrained over", path, kept[-1].version)
        refresh = False
    model = _run_cached(train_model, path, refresh, states, **parameters)
    folder = storage.parent(storage.parent(train[-1]["path"]))
    dataset = {"path": str(folder), "rows": sum(part["rows"] for part in train)}
    return dataset, holdout, model


def _initial_weights(init: str, day: date, artifacts_dir: str) -> dict[str, str] | None:
    """The checkpoint to start from with init="champion": the champion as it stood for `day`.

    That is the latest champion trained before `day`, as the alias history stood when the date's
    first version was registered (now, for a date run for the first time). Not simply the champion
    now: after this date's challenger is promoted, or another version by hand, a rerun of the date
    must start from the same weights as the first run did, so that it finds its model cached.
    None from scratch, or when there is no such champion yet.
    """
    if init == "scratch":
        return None
    registry = Registry(storage.resolve(artifacts_dir))
    first = min((v.created for v in registry.versions() if v.run_date == day.isoformat()), default=None)
    for change in reversed(registry.history()):
        if first is not None and change.changed > first:
            continue
        champion = registry.get(change.version)
        if (champion.run_date or "") < day.isoformat() and storage.exists(champion.checkpoint):
            return {"path": champion.checkpoint, "fingerprint": champion.fingerprint}
    get_run_logger().info("No champion from before %s to start from: training from scratch", day)
    return None


def _gate(
    model: dict, holdout: dict, window: Window, artifacts_dir: str, min_improvement: float, device: str, states: dict
) -> dict:
    """Register the trained model as a version; make it the champion when there is none or it is better.

    A run for an earlier date than the champion's (a rerun, a backfill of the past) is measured and its
    decision recorded, but it never takes the champion: the champion only moves forward in time.
    The challenger's held-out accuracy is measured by training; the champion's on the same held-out
    rows by a cached task. A concurrent run that moves the champion meanwhile makes the gate decide
    again against the new champion (compare-and-set), so no promotion is lost or made blindly.
    """
    registry = Registry(storage.resolve(artifacts_dir))
    run_id = str(flow_run.id)
    challenger = registry.register(
        model["path"],
        model["fingerprint"],
        config=model["config"],
        metrics=model["metrics"],
        run_date=window.day.isoformat(),
        window=window.as_dict(),
        flow_run_id=run_id,
    )
    challenger_accuracy = model["metrics"]["val_accuracy"]
    while True:
        champion, champion_accuracy = registry.alias(), None
        if champion is None:
            promoted, reason = True, "first model: there was no champion"
        elif champion.version == challenger.version:
            promoted, reason, champion_accuracy = False, "the challenger is the champion already", challenger_accuracy
        elif not storage.exists(champion.checkpoint):
            raise EnvironmentFailure(
                f"the champion (version {champion.version}) has no checkpoint at {champion.checkpoint}: restore"
                " the file, or make another version the champion with `featuresum models promote VERSION`"
            )
        elif storage.fingerprint(champion.checkpoint) != champion.fingerprint:
            raise EnvironmentFailure(
                f"the champion (version {champion.version}) checkpoint {champion.checkpoint} no longer holds its"
                " registered weights: restore the file, or make another version the champion with"
                " `featuresum models promote VERSION`"
            )
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
            if (champion.run_date or "") > window.day.isoformat():
                promoted = False
                reason += (
                    f"; kept out: the champion (version {champion.version}) was trained for {champion.run_date},"
                    f" after this run's date {window.day}, and a run never moves the champion back in time"
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
            summary["labelled_rows"] = manifest.get("labelled_rows")
        if "start_epoch" in manifest:
            summary["start_epoch"] = manifest["start_epoch"]
            summary["epochs_completed"] = manifest["epochs_completed"]
    return summary


def _registered(summary: dict[str, Any], gate: dict[str, Any]) -> dict[str, Any]:
    """The summary with the trained model's version and the gate's decision, as `--json` reports them."""
    registry = {key: gate[key] for key in ("champion_version", "promoted", "challenger_accuracy", "champion_accuracy")}
    return {**summary, "model_version": gate["model_version"], "registry": {**registry, "reason": gate["reason"]}}


def _refuse_overwriting_inputs(output: str | None, *inputs: str | None) -> None:
    """An output that is one of the run's own inputs would destroy it: refuse before anything runs."""
    if output is None:
        return
    for given in filter(None, inputs):
        if storage.resolve(output) == storage.resolve(given):
            raise InputError(f"{output}: the output would overwrite an input of this run; choose another --output")


def _begin(run_date: str | None, data_dir: str, artifacts_dir: str) -> date:
    """What every flow does first: find its date, tag the run with it, sweep leftovers, place task results."""
    RESULTS.set(result_storage(artifacts_dir))
    day = run_day(run_date)
    _describe_run(day)
    _sweep(data_dir, artifacts_dir)
    return day


@flow(name="featuresum-train", flow_run_name=_run_name("train"))
def train_flow(
    train_samples: int = DEFAULT.train_samples,
    holdout_samples: int = DEFAULT.holdout_samples,
    epochs: int = DEFAULT.epochs,
    batch_size: int = DEFAULT.batch_size,
    lr: float = DEFAULT.lr,
    weight_decay: float = DEFAULT.weight_decay,
    schedule: Schedule = DEFAULT.schedule,
    seed: int = 0,
    run_date: str | None = None,
    window_days: int = 1,
    drift: float = 0.0,
    init: Init = "scratch",
    data_dir: str = "data",
    artifacts_dir: str = "artifacts",
    device: Device = "auto",
    min_improvement: float = 0.0,
    refresh: bool = False,
) -> dict[str, Any]:
    """Train a challenger on the run date's window of partitions, checkpoint and evaluate it, then gate it."""
    states = _task_runs()
    day = _begin(run_date, data_dir, artifacts_dir)
    device = _device(device)
    window = Window(day, window_days, train_samples, holdout_samples)
    config = TrainConfig(epochs, batch_size, lr, weight_decay, schedule, seed)
    source = Source(seed, drift, data_dir)
    train, holdout, model = _train(window, source, config, artifacts_dir, device, init, refresh, states)
    gate = _gate(model, holdout, window, artifacts_dir, min_improvement, device, states)
    summary = _summary(states, train_data=train, holdout_data=holdout, checkpoint=model)
    return {**_registered(summary, gate), "run_date": day.isoformat()}


@flow(name="featuresum-score", flow_run_name=_run_name("score"), task_runner=IN_PROCESS)
def score_flow(
    model: str,
    input: str | None = None,
    samples: int | None = None,
    seed: int = 0,
    run_date: str | None = None,
    drift: float = 0.0,
    output: str | None = None,
    data_dir: str = "data",
    artifacts_dir: str = "artifacts",
    device: Device = "auto",
    shard_rows: int = SHARD_ROWS,
    drift_warn: float = DRIFT_WARN,
    drift_alert: float = DRIFT_ALERT,
    refresh: bool = False,
) -> dict[str, Any]:
    """Score a Parquet file, or the synthetic batch of `samples` rows of the run date, with a checkpoint; monitor it."""
    states = _task_runs()
    _refuse_overwriting_inputs(output, model, input)
    refuse_managed_output(output, artifacts_dir, data_dir)
    monitoring.check_thresholds(drift_warn, drift_alert)
    day = _begin(run_date, data_dir, artifacts_dir)
    fingerprint = fingerprint_input.with_options(refresh_cache=refresh)
    checkpoint = _call(fingerprint, states, path=str(storage.resolve(model)))
    registry = Registry(storage.resolve(artifacts_dir))
    registered = registry.find(checkpoint["fingerprint"])
    if changed := registry.changed_at(checkpoint["path"], checkpoint["fingerprint"]):
        raise EnvironmentFailure(changed_weights(model, changed.version))
    if input is not None:
        features = _call(fingerprint, states, path=str(storage.resolve(input)))
    else:
        rows = DEFAULT.score_samples if samples is None else samples
        features = _generate("score", rows, day, Source(seed, drift, data_dir), refresh, states)
    device = _device(device)
    predictions = _score(checkpoint, features, device, artifacts_dir, output, shard_rows, refresh, states)
    thresholds = {"warn": drift_warn, "alert": drift_alert}
    observed = _monitor(checkpoint, features, predictions, day, thresholds, artifacts_dir, "score", refresh, states)
    summary = _summary(states, checkpoint=checkpoint, score_input=features, predictions=predictions)
    if registered:
        summary["model_version"] = registered.version
    return {**summary, "run_date": day.isoformat(), "drift": observed}


@flow(name="featuresum-pipeline", flow_run_name=_run_name("pipeline"), task_runner=IN_PROCESS)
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
    run_date: str | None = None,
    window_days: int = 1,
    drift: float = 0.0,
    init: Init = "scratch",
    data_dir: str = "data",
    artifacts_dir: str = "artifacts",
    device: Device = "auto",
    shard_rows: int = SHARD_ROWS,
    min_improvement: float = 0.0,
    drift_warn: float = DRIFT_WARN,
    drift_alert: float = DRIFT_ALERT,
    refresh: bool = False,
) -> dict[str, Any]:
    """Train a challenger on the run date's data, gate it, score the date's batch with the champion, monitor it."""
    states = _task_runs()
    monitoring.check_thresholds(drift_warn, drift_alert)
    day = _begin(run_date, data_dir, artifacts_dir)
    device = _device(device)
    window = Window(day, window_days, train_samples, holdout_samples)
    config = TrainConfig(epochs, batch_size, lr, weight_decay, schedule, seed)
    source = Source(seed, drift, data_dir)
    train, holdout, model = _train(window, source, config, artifacts_dir, device, init, refresh, states)
    gate = _gate(model, holdout, window, artifacts_dir, min_improvement, device, states)
    batch = _generate("score", score_samples, day, source, refresh, states)
    predictions = _score(gate["champion"], batch, device, artifacts_dir, None, shard_rows, refresh, states)
    thresholds = {"warn": drift_warn, "alert": drift_alert}
    champion = gate["champion"]
    observed = _monitor(champion, batch, predictions, day, thresholds, artifacts_dir, "pipeline", refresh, states)
    outputs = {"train_data": train, "holdout_data": holdout, "checkpoint": model, "score_input": batch}
    summary = _summary(states, **outputs, predictions=predictions)
    scored = {"run_date": day.isoformat(), "scored_with": gate["champion"]["path"], "drift": observed}
    return {**_registered(summary, gate), **scored}

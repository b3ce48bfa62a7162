"""The steps the flows chain: cached task calls that generate partitions, train, score and monitor.

A step never trusts Prefect's cache record alone: a task is forced to recompute unless its output
is still the very file that a run with the same parameters wrote (its manifest says so).
"""

import os
import socket
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, timedelta
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.runtime import flow_run
from prefect.tasks import Task

from featuresum.flows.options import PipelineOptions
from featuresum.tasks import handoff, memory, monitoring, storage
from featuresum.tasks.errors import EnvironmentFailure, InputError
from featuresum.tasks.prefect_tasks import (
    generate_dataset,
    monitor_batch,
    retain_artifacts,
    score_shard,
    train_model,
    write_predictions,
)
from featuresum.tasks.registry import Registry
from featuresum.tasks.results import result_storage
from featuresum.tasks.settings import resolve_device
from featuresum.tasks.task_policy import task_key

# The attribute of an error that ends a flow run, holding the run's task-run record (see Run.reported).
TASK_RUNS = "featuresum_task_runs"


@dataclass
class Run:
    """What the steps of one flow run share: whether to refresh, where task results go, the task runs started.

    `task_runs` maps each task run's id to its state name, so the command that started the flow can
    wait until every one of them is recorded by the API, also when the run fails.
    """

    refresh: bool
    results: Any = None
    task_runs: dict[str, str] = field(default_factory=dict)

    def stored(self, task: Task) -> Task:
        """The task, keeping its results beside the run's artifacts when they are on object storage.

        Set on each task rather than on the flow, so tasks on Dask workers, which share no disk with the
        flow, read and write the same cache records as every other machine.
        """
        return task if self.results is None else task.with_options(result_storage=self.results)

    def call(self, task: Task, **parameters: Any) -> dict:
        """Run a task, note its task run and final state, and return its result (raising if it failed)."""
        state = self.stored(task)(**parameters, return_state=True)
        self.task_runs[str(state.state_details.task_run_id)] = state.name
        return state.result()

    def refresh_unless_intact(
        self, task: Task, path: storage.Location, refresh: bool | None = None, **parameters: Any
    ) -> tuple[Task, dict]:
        """The task, forced to recompute unless `path` is the very file that a run with these parameters wrote.

        Prefect's cache record alone would be reused even when the file was since deleted, rewritten,
        or overwritten by a run with other inputs (the same --output, say); the manifest beside the
        file records the cache key of the run that wrote it, and must match. `refresh` overrides the run's.
        """
        refresh = self.refresh if refresh is None else refresh
        parameters = {**parameters, "path": str(path), "refresh": refresh}
        intact = storage.is_intact(path, task_key(task.name, parameters))
        return task.with_options(refresh_cache=refresh or not intact), parameters

    def call_cached(self, task: Task, path: storage.Location, refresh: bool | None = None, **parameters: Any) -> dict:
        """Call a cached task in the flow's process and return its result."""
        task, parameters = self.refresh_unless_intact(task, path, refresh, **parameters)
        return self.call(task, **parameters)

    @contextmanager
    def reported(self):
        """Hand the task-run record to the caller on an error that ends the run (as the attribute TASK_RUNS)."""
        try:
            yield
        except BaseException as error:
            setattr(error, TASK_RUNS, {"flow_run_id": str(flow_run.id), "task_runs": self.task_runs})
            raise


def ref(manifest: dict[str, Any]) -> dict[str, str]:
    """What a downstream task needs of an upstream file: where it is and what it holds."""
    return {"path": manifest["path"], "fingerprint": manifest["fingerprint"]}


@dataclass(frozen=True)
class Source:
    """The synthetic source of a run's partitions: its seed, its drift per day, and the folder they go to."""

    seed: int
    drift: float
    data_dir: str


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


def run_name(kind: str, day: object, seed: int) -> str:
    """A flow run's name, with its date, for the UI's list of runs: pipeline-2026-06-01-seed0."""
    return f"{kind}-{day}-seed{seed}"


def run_day(run_date: str | None) -> date:
    """The date a run processes: the one given, else the day (UTC) of the run's scheduled start.

    A scheduled run that starts late or is retried still processes the date it was scheduled for.
    """
    if run_date:
        try:
            return date.fromisoformat(run_date)
        except ValueError:
            raise InputError(f"run_date {run_date!r} is not a date: give it as YYYY-MM-DD") from None
    return flow_run.scheduled_start_time.astimezone(UTC).date()


def begin(run_date: str | None, data_dir: str, artifacts_dir: str, refresh: bool) -> tuple[Run, date]:
    """What every flow does first: place task results, find its date, tag the run with it, sweep leftovers."""
    run = Run(refresh, result_storage(artifacts_dir))
    day = run_day(run_date)
    _describe_run(day)
    _sweep(data_dir, artifacts_dir)
    return run, day


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
    current = FlowRunContext.get().flow_run
    tags = [*current.tags, f"date-{day}"]
    if current.deployment_id and monitoring.started_by_drift(current.created_by):
        tags = [tag for tag in tags if tag != "scheduled"] + [monitoring.RETRAIN_TAG]
    with get_client(sync_client=True) as client:
        client.update_flow_run(
            current.id, tags=list(dict.fromkeys(tags)), infrastructure_pid=f"{socket.gethostname()}:{os.getpid()}"
        )


def _sweep(*directories: str) -> None:
    """Remove temporary files that killed runs left behind (never a live run's)."""
    for directory in directories:
        if storage.is_remote(directory):
            continue  # a killed upload leaves no object under a final key; see docs on the store's lifecycle
        directory = Path(directory)
        if directory.is_dir() and (removed := storage.sweep_leftovers(directory)):
            get_run_logger().info("Removed %d leftover temporary files of killed runs in %s", len(removed), directory)


def device(requested: str) -> str:
    """The device to train and score on, with a warning in the run's log when cuda was asked for but is absent."""
    chosen, warning = resolve_device(requested)
    if warning:
        get_run_logger().warning(warning)
    return chosen


def generate(stream: str, rows: int, day: date, source: Source, run: Run) -> dict:
    """One date's partition of a stream (cached: a date already generated is never generated again)."""
    spec = _spec(stream, rows, source)
    return run.call_cached(generate_dataset, _path(stream, rows, day, source), **spec, day=day.isoformat())


def _spec(stream: str, rows: int, source: Source) -> dict:
    return {"stream": stream, "rows": rows, "seed": source.seed, "drift": source.drift}


def _path(stream: str, rows: int, day: date, source: Source) -> storage.Location:
    return storage.partition_path(storage.resolve(source.data_dir), stream, _spec(stream, rows, source), day)


def train(
    options: PipelineOptions, window: Window, init: dict | None, device: str, run: Run
) -> tuple[dict, dict, dict]:
    """Generate the window's training partitions and the date's held-out rows, then train a challenger.

    Returns (training data, held-out data, checkpoint). Each date holds an equal share of the
    training rows, so moving the window by a day generates one new partition and reuses the rest.
    """
    # Rows that fit no way of training stop the run before any is generated.
    plan = memory.memory_plan(
        window.train_samples, window.holdout_samples, options.shuffle_rows, options.train_memory_mb
    )
    source = Source(options.seed, options.drift, options.data_dir)
    per_day = max(1, window.train_samples // window.days)
    # One day's rows, trained on in memory, go from generation to training without a read back.
    handed = [_path("train", per_day, window.day, source), _path("holdout", window.holdout_samples, window.day, source)]
    with handoff.keeping(handed if plan.mode == "memory" and window.days == 1 else []):
        partitions = [generate("train", per_day, day, source, run) for day in window.dates()]
        # Streams of their own give the held-out rows (and the batch to score) seeds of their own.
        holdout = generate("holdout", window.holdout_samples, window.day, source, run)
        parameters = {
            "train": [ref(part) for part in partitions],
            "holdout": ref(holdout),
            "config": asdict(options.train_config()),
            "device": device,
            "init": init,
        }
        artifacts_dir = storage.resolve(options.artifacts_dir)
        path = storage.output_path(artifacts_dir, "model", parameters, ".pt")
        registry = Registry(artifacts_dir)
        _refuse_changed_version(path, registry)
        refresh = run.refresh and not _is_registered(path, registry)
        model = run.call_cached(train_model, path, refresh, **parameters, memory_mb=options.train_memory_mb)
    folder = storage.parent(storage.parent(partitions[-1]["path"]))
    dataset = {"path": str(folder), "rows": sum(part["rows"] for part in partitions)}
    return dataset, holdout, model


def _refuse_changed_version(path: storage.Location, registry: Registry) -> None:
    """A checkpoint that no longer holds its registered weights stops the run: restore or delete it first."""
    if storage.exists(path) and (changed := registry.changed_at(path, storage.fingerprint(path))):
        raise EnvironmentFailure(
            f"{path}: the checkpoint of model version {changed.version} no longer holds its registered"
            " weights, and a registered version is never trained over: restore the file, or delete it"
            " to train it again"
        )


def _is_registered(path: storage.Location, registry: Registry) -> bool:
    """Whether the checkpoint at `path` is a registered version: --refresh reuses it, never trains over it."""
    if (kept := registry.at_checkpoint(path)) and storage.exists(path):
        get_run_logger().info("%s is model version %d: reused, never retrained over", path, kept[-1].version)
        return True
    return False


def score(model: dict, features: dict, device: str, output: str | None, options: PipelineOptions, run: Run) -> dict:
    """Score the feature file in shards of row groups on the flow's task runner, then combine them.

    When the predictions file is already the one these inputs give, no shard runs at all.
    """
    scored = {"model": ref(model), "features": ref(features), "device": device}
    if output:
        path = storage.resolve(output)
    else:
        path = storage.output_path(storage.resolve(options.artifacts_dir), "predictions", scored, ".parquet")
    combine, combined = run.refresh_unless_intact(write_predictions, path, **scored, shards=None)
    if combine.refresh_cache:
        combined["shards"] = _score_shards(scored, path, options.shard_rows, run)
    return run.call(combine, **combined)


def _score_shards(scored: dict, path: storage.Location, shard_rows: int, run: Run) -> list[dict]:
    futures = []
    for index, row_groups in enumerate(storage.row_group_shards(storage.at(scored["features"]["path"]), shard_rows)):
        shard = {**scored, "row_groups": row_groups, "index": index}
        part = storage.part_path(path, index, {**shard, "code": storage.code_version()})
        task, parameters = run.refresh_unless_intact(score_shard, part, **shard)
        futures.append(run.stored(task).submit(**parameters))
    shards = []
    for future in futures:
        future.wait()
        run.task_runs[str(future.task_run_id)] = future.state.name
        shard = future.result()
        shards.append({k: shard[k] for k in ("path", "fingerprint", "rows", "labelled", "correct", "class_counts")})
    return shards


def monitor(
    model: dict, batch: dict, predictions: dict, day: date, options: PipelineOptions, scored_by: str, run: Run
) -> dict[str, Any]:
    """Drift and accuracy of the scored batch, added to the monitoring history; returns `--json`'s drift."""
    artifacts_dir = storage.resolve(options.artifacts_dir)
    registered = Registry(artifacts_dir).find(model["fingerprint"])
    monitored = run.call(
        monitor_batch,
        model=ref(model),
        batch=ref(batch),
        predictions={key: predictions.get(key) for key in ("path", "fingerprint", "score_accuracy", "labelled_rows")},
        run_date=day.isoformat(),
        model_version=registered.version if registered else None,
        thresholds={"warn": options.drift_warn, "alert": options.drift_alert},
        artifacts_dir=str(artifacts_dir),
        scored_by=scored_by,
        refresh=run.refresh,
    )
    return monitored["drift"]


def retain(options: PipelineOptions, run: Run) -> dict[str, Any] | None:
    """With --keep-days, delete what no run of the last days can need (after the run used what it needs)."""
    if options.keep_days is None:
        return None
    report = run.call(
        retain_artifacts, data_dir=options.data_dir, artifacts_dir=options.artifacts_dir, keep_days=options.keep_days
    )
    return {"deleted_files": len(report["deleted"]), **{k: report[k] for k in ("freed_bytes", "pruned_versions")}}

"""The featuresum flows: train, score, and the whole pipeline that chains them."""

from collections.abc import Callable
from dataclasses import fields
from datetime import date
from typing import Any

from prefect import flow
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from featuresum.flows import steps
from featuresum.flows.gate import gate, initial_weights
from featuresum.flows.options import TRAINING, PipelineOptions, flow_options
from featuresum.flows.steps import Run, Window
from featuresum.tasks import monitoring, storage
from featuresum.tasks.errors import EnvironmentFailure, InputError
from featuresum.tasks.prefect_tasks import fingerprint_input
from featuresum.tasks.registry import Registry, changed_weights, refuse_managed_output

# Shards run one at a time in the flow's process: torch already uses every core, and memory stays bounded.
ONE_SHARD_AT_A_TIME = ThreadPoolTaskRunner(max_workers=1)


def _run_name(kind: str) -> Callable[[], str]:
    """A flow run name with the run's date, for the UI's list of runs."""

    def name() -> str:
        parameters = flow_run.parameters
        try:
            day = steps.run_day(parameters.get("run_date"))
        except InputError:  # the flow itself fails with the message; its name keeps what it was given
            day = parameters.get("run_date")
        return steps.run_name(kind, day, parameters.get("seed", 0))

    return name


def _summary(run: Run, **outputs: dict) -> dict[str, Any]:
    """Paths, metrics and task runs of a flow run, as the CLI reports them."""
    summary: dict[str, Any] = {"flow_run_id": str(flow_run.id), "task_runs": run.task_runs, "metrics": {}}
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


def _train_and_gate(options: PipelineOptions, run_date: str | None) -> tuple[Run, date, str, dict, dict]:
    """What both the train and the pipeline flow do first: train a challenger on the date's window, gate it.

    Returns the run, its date, its device, its outputs so far and the gate's decision.
    """
    run, day = steps.begin(run_date, options.data_dir, options.artifacts_dir, options.refresh)
    with run.reported():
        device = steps.device(options.device)
        window = Window(day, options.window_days, options.train_samples, options.holdout_samples)
        init = initial_weights(options.init, day, options.artifacts_dir)
        train, holdout, model = steps.train(options, window, init, device, run)
        decision = gate(model, holdout, window, options.artifacts_dir, options.min_improvement, device, run)
    return run, day, device, {"train_data": train, "holdout_data": holdout, "checkpoint": model}, decision


def _registered(summary: dict[str, Any], decision: dict[str, Any]) -> dict[str, Any]:
    """The summary with the trained model's version and the gate's decision, as `--json` reports them."""
    keys = ("champion_version", "promoted", "challenger_accuracy", "champion_accuracy", "reason")
    return {**summary, "model_version": decision["model_version"], "registry": {k: decision[k] for k in keys}}


# The options of each flow (all of them for the pipeline), declared once in PipelineOptions.
RETRAINING = ("window_days", "drift", "init", "data_dir", "artifacts_dir", "device", "min_improvement", "refresh")
SCORING = ("seed", "drift", "data_dir", "artifacts_dir", "device", "shard_rows", "drift_warn", "drift_alert", "refresh")


@flow(name="featuresum-train", flow_run_name=_run_name("train"))
@flow_options(*TRAINING, *RETRAINING)
def train_flow(options: PipelineOptions, run_date: str | None = None) -> dict[str, Any]:
    """Train a challenger on the run date's window of partitions, checkpoint and evaluate it, then gate it."""
    run, day, _, outputs, decision = _train_and_gate(options, run_date)
    return {**_registered(_summary(run, **outputs), decision), "run_date": day.isoformat()}


@flow(name="featuresum-pipeline", flow_run_name=_run_name("pipeline"), task_runner=ONE_SHARD_AT_A_TIME)
@flow_options(*(option.name for option in fields(PipelineOptions)))
def pipeline_flow(options: PipelineOptions, run_date: str | None = None) -> dict[str, Any]:
    """Train a challenger on the run date's data, gate it, score the date's batch with the champion, monitor it
    (and, with keep_days, delete what no recent run can need)."""
    monitoring.check_thresholds(options.drift_warn, options.drift_alert)
    run, day, device, outputs, decision = _train_and_gate(options, run_date)
    champion = decision["champion"]
    with run.reported():
        source = steps.Source(options.seed, options.drift, options.data_dir)
        batch = steps.generate("score", options.score_samples, day, source, run)
        predictions = steps.score(champion, batch, device, None, options, run)
        observed = steps.monitor(champion, batch, predictions, day, options, "pipeline", run)
        retained = steps.retain(options, run)
    summary = _summary(run, **outputs, score_input=batch, predictions=predictions)
    scored = {"run_date": day.isoformat(), "scored_with": champion["path"], "drift": observed}
    return {**_registered(summary, decision), **scored, **({"retention": retained} if retained else {})}


def _refuse_overwriting_inputs(output: str | None, *inputs: str | None) -> None:
    """An output that is one of the run's own inputs would destroy it: refuse before anything runs."""
    if output is None:
        return
    for given in filter(None, inputs):
        if storage.resolve(output) == storage.resolve(given):
            raise InputError(f"{output}: the output would overwrite an input of this run; choose another --output")


@flow(name="featuresum-score", flow_run_name=_run_name("score"), task_runner=ONE_SHARD_AT_A_TIME)
@flow_options(*SCORING)
def score_flow(
    options: PipelineOptions,
    model: str,
    input: str | None = None,
    samples: int | None = None,
    run_date: str | None = None,
    output: str | None = None,
) -> dict[str, Any]:
    """Score a Parquet file, or the synthetic batch of `samples` rows of the run date, with a checkpoint; monitor it."""
    _refuse_overwriting_inputs(output, model, input)
    refuse_managed_output(output, options.artifacts_dir, options.data_dir)
    monitoring.check_thresholds(options.drift_warn, options.drift_alert)
    run, day = steps.begin(run_date, options.data_dir, options.artifacts_dir, options.refresh)
    with run.reported():
        fingerprint = fingerprint_input.with_options(refresh_cache=options.refresh)
        checkpoint = run.call(fingerprint, path=str(storage.resolve(model)))
        registry = Registry(storage.resolve(options.artifacts_dir))
        registered = registry.find(checkpoint["fingerprint"])
        if changed := registry.changed_at(checkpoint["path"], checkpoint["fingerprint"]):
            raise EnvironmentFailure(changed_weights(model, changed.version))
        if input is not None:
            features = run.call(fingerprint, path=str(storage.resolve(input)), digest="blake3")
        else:
            rows = options.score_samples if samples is None else samples
            source = steps.Source(options.seed, options.drift, options.data_dir)
            features = steps.generate("score", rows, day, source, run)
        device = steps.device(options.device)
        predictions = steps.score(checkpoint, features, device, output, options, run)
        observed = steps.monitor(checkpoint, features, predictions, day, options, "score", run)
    summary = _summary(run, checkpoint=checkpoint, score_input=features, predictions=predictions)
    if registered:
        summary["model_version"] = registered.version
    return {**summary, "run_date": day.isoformat(), "drift": observed}

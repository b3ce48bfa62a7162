"""The `featuresum` command line: one-off pipeline runs, training, scoring and scheduled serving.

Exit codes: 0 success; 2 for what the user can fix (an option, a file, a folder); 1 for the
environment (the Prefect server down or failing, a disk full); 130 after Ctrl-C; 143 after
SIGTERM. Every error ends with one `featuresum: error: ...` line on stderr, no traceback.
"""

import atexit
import errno
import json
import logging
import os
import signal
import sqlite3
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, date, datetime
from enum import Enum, StrEnum
from functools import partial
from importlib.metadata import version
from pathlib import Path
from typing import Annotated, Any

import typer

from featuresum.flows import local_server
from featuresum.flows.cli.models import iso_date, models_app
from featuresum.flows.presets import DRIFT_ALERT, DRIFT_WARN, PRESETS
from featuresum.flows.cli.server import server_app
from featuresum.tasks.errors import EnvironmentFailure, InputError, Terminated

LOCAL_SERVER_HELP = (
    "Runs are recorded by the Prefect API in PREFECT_API_URL or, when none is set, by a local "
    "Prefect server (127.0.0.1, database under PREFECT_HOME) that the first command starts and "
    "later commands reuse; its UI shows every run. It keeps running after the command ends: "
    "`featuresum server status` shows it, `featuresum server stop` stops it."
)
app = typer.Typer(
    help=f"Synthetic feature-sum classifier: generate data, train, and score, as Prefect flows.\n\n{LOCAL_SERVER_HELP}",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# errno values of file problems the user fixes (a path, a permission, a read-only mount); others are the machine's.
USER_ERRNOS = frozenset(
    {
        errno.ENOENT,
        errno.EACCES,
        errno.EPERM,
        errno.ENOTDIR,
        errno.EISDIR,
        errno.EROFS,
        errno.EEXIST,
        errno.ENAMETOOLONG,
    }
)
# How long the Prefect API may refuse connections, or leave them unanswered, before a run gives up on it.
API_REFUSED_SECONDS = 5.0
API_SILENT_SECONDS = 60.0


class Preset(StrEnum):
    default = "default"
    full = "full"


class DeviceChoice(StrEnum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class RunnerChoice(StrEnum):
    default = "default"
    dask = "dask"


class ScheduleChoice(StrEnum):
    onecycle = "onecycle"
    constant = "constant"


Seed = Annotated[int, typer.Option(min=0, help="Seed of every random draw; the same seed gives the same bytes.")]
DataDir = Annotated[str, typer.Option(help="Folder for generated Parquet data, or s3://bucket/prefix.")]
ArtifactsDir = Annotated[
    str, typer.Option(help="Folder for checkpoints, predictions, the registry and the history, or s3://bucket/prefix.")
]
DeviceOpt = Annotated[DeviceChoice, typer.Option(help="Where to train and score; cuda falls back to cpu if absent.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object with paths, metrics and task states.")]
Refresh = Annotated[bool, typer.Option(help="Recompute every step instead of reusing cached outputs.")]
PresetOpt = Annotated[Preset, typer.Option(help="Sizes and settings: default (about a minute) or full.")]
TrainSamples = Annotated[int | None, typer.Option(min=1, help="Training rows. (preset)")]
HoldoutSamples = Annotated[int | None, typer.Option(min=1, help="Held-out rows, from a different seed. (preset)")]
ScoreSamples = Annotated[int | None, typer.Option(min=0, help="Rows in the batch to score. (preset)")]
Epochs = Annotated[int | None, typer.Option(min=1, help="Training epochs. (preset)")]
BatchSize = Annotated[int | None, typer.Option(min=1, help="Training batch size. (preset)")]
Lr = Annotated[float | None, typer.Option(min=1e-9, help="Peak learning rate of AdamW. (preset)")]
WeightDecay = Annotated[float | None, typer.Option(min=0.0, help="AdamW weight decay. (preset)")]
ScheduleOpt = Annotated[
    ScheduleChoice | None, typer.Option(help="Learning-rate schedule: onecycle, or constant. (preset)")
]
RunnerOpt = Annotated[
    RunnerChoice,
    typer.Option(help="Where scoring shards run: threads in this process (default), or a Dask cluster."),
]
DaskAddress = Annotated[
    str | None,
    typer.Option(help="Scheduler of an existing Dask cluster (tcp://host:8786); default: start a LocalCluster."),
]
DaskWorkers = Annotated[
    int | None, typer.Option(min=1, help="Worker processes of the LocalCluster (default: one per core).")
]


class InitChoice(StrEnum):
    scratch = "scratch"
    champion = "champion"


RunDate = Annotated[
    str | None,
    typer.Option(
        "--date",
        callback=iso_date,
        help="The date the run processes (YYYY-MM-DD): its data and its model version. [default: today, UTC]",
    ),
]
WindowDays = Annotated[
    int, typer.Option(min=1, help="Train on the partitions of this many days up to --date (--train-samples in all).")
]
Drift = Annotated[
    float,
    typer.Option(help="Shift of every feature's mean per day since 2026-01-01 in the synthetic data (0: no drift)."),
]
InitOpt = Annotated[InitChoice, typer.Option(help="Start training from scratch, or from the champion's weights.")]
MinImprovement = Annotated[
    float,
    typer.Option(
        min=0.0,
        help="Held-out accuracy a new model must gain over the champion to replace it (the promotion gate).",
    ),
]
ShardRows = Annotated[int | None, typer.Option(min=1, help="Rows per scoring shard; each shard is one task run.")]
DriftWarn = Annotated[
    float,
    typer.Option(min=0.0, help="PSI of a scored batch against its model's training rows from which drift is a warning"),
]
DriftAlert = Annotated[
    float,
    typer.Option(
        min=0.0,
        help="PSI above which drift is an alert: the run emits the Prefect event featuresum.drift.detected.",
    ),
]


def _drift_levels(warn: float, alert: float) -> None:
    if warn > alert:
        raise typer.BadParameter(f"--drift-warn {warn:g} is above --drift-alert {alert:g}")


def _today() -> str:
    return datetime.now(UTC).date().isoformat()


def flow_parameters(preset: Preset, **options: Any) -> dict[str, Any]:
    """Flow parameters: a preset's values, overridden by every option the user gave.

    Folders are resolved (an absolute path, or the URI), so a run records where it wrote and two
    projects whose relative folders read alike never take each other's runs for their own.
    """
    from featuresum.tasks import storage

    def plain(value: Any) -> Any:
        return value.value if isinstance(value, Enum) else str(value) if isinstance(value, Path) else value

    values = PRESETS[preset.value].values()
    values.update({key: plain(value) for key, value in options.items() if value is not None})
    for folder in ("data_dir", "artifacts_dir"):
        if folder in values:
            values[folder] = str(storage.resolve(values[folder]))
    return values


def prepare_folders(*folders: str | Path) -> None:
    """Create the folders a run writes to, so a path that cannot be one fails in a line, before any run.

    On object storage there are no folders to create: the bucket must exist and take our credentials.
    """
    from featuresum.tasks import s3

    for folder in folders:
        if s3.is_uri(folder):
            s3.check_bucket(folder)
            continue
        try:
            Path(folder).mkdir(parents=True, exist_ok=True)
        except OSError as error:
            if error.errno == errno.ENOSPC:
                raise EnvironmentFailure(f"disk full: cannot create {folder}") from None
            reason = "a file is in the way" if isinstance(error, FileExistsError | NotADirectoryError) else None
            raise InputError(f"{folder}: cannot create this folder ({reason or error.strerror})") from None


def _task_runner(runner: RunnerChoice, address: str | None, workers: int | None):
    """Prefect's default task runner, or a DaskTaskRunner on a given or a local cluster."""
    if runner is RunnerChoice.default:
        return None
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise typer.BadParameter("--runner dask needs prefect-dask: pip install 'featuresum[dask]'") from None
    if address:
        return DaskTaskRunner(address=address)
    local = {"n_workers": workers, "threads_per_worker": 1, "host": "127.0.0.1", "dashboard_address": None}
    return DaskTaskRunner(cluster_kwargs=local)


def _api_answers(api_url: str) -> str:
    """'ok', 'refused' (nothing listens) or 'silent' (no answer in time) for the API's health check."""
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=5) as response:
            return "ok" if response.status == 200 else "silent"
    except urllib.error.URLError as error:
        return "refused" if isinstance(error.reason, ConnectionRefusedError) else "silent"
    except OSError:
        return "silent"


def _watch_api(api_url: str) -> None:
    """End this process with one line when the Prefect API goes away mid-run, instead of retrying for minutes.

    Whatever finished stays on disk (training keeps its last finished epoch), so the same command
    run again resumes; with no PREFECT_API_URL it starts a new local server first.
    """

    def watch() -> None:
        last_ok = time.monotonic()
        while True:
            time.sleep(1.0)
            answer = _api_answers(api_url)
            if answer == "ok":
                last_ok = time.monotonic()
                continue
            waited = time.monotonic() - last_ok
            if waited > (API_REFUSED_SECONDS if answer == "refused" else API_SILENT_SECONDS):
                print(
                    f"featuresum: error: the Prefect API at {api_url} stopped answering mid-run; "
                    "run the same command again to resume from the last finished step",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(1)

    threading.Thread(target=watch, name="featuresum-api-watch", daemon=True).start()


class _ConsoleErrors(logging.Formatter):
    """Prefect's console lines without the tracebacks of errors featuresum explains in one line.

    The tracebacks still reach the API, so the UI shows them.
    """

    def __init__(self, inner: logging.Formatter):
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info and isinstance(record.exc_info[1], InputError | EnvironmentFailure | OSError):
            record = logging.makeLogRecord({**record.__dict__, "exc_info": None, "exc_text": None})
        return self.inner.format(record)


def _quiet_console_tracebacks() -> None:
    for logger in [logging.getLogger(), *map(logging.getLogger, logging.root.manager.loggerDict)]:
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler.formatter, _ConsoleErrors):
                handler.setFormatter(_ConsoleErrors(handler.formatter or logging.Formatter()))


def _api_failure(error: Exception, api_url: str) -> Exception:
    """The one-line error for a failed call to the Prefect API (401 is the user's to fix)."""
    import httpx
    from prefect.exceptions import PrefectHTTPStatusError

    if isinstance(error, PrefectHTTPStatusError | httpx.HTTPStatusError):
        status = error.response.status_code
        if status == 401:
            return InputError(f"the Prefect API at {api_url} refused us (401); set PREFECT_API_AUTH_STRING")
        return EnvironmentFailure(f"the Prefect API at {api_url} answered HTTP {status} {error.response.reason_phrase}")
    return EnvironmentFailure(f"cannot reach the Prefect API at {api_url} ({type(error).__name__})")


def _check_api(api_url: str) -> None:
    """Fail in one line, before any run, when the API is down, failing, or refuses our credentials."""
    import httpx
    from prefect.client.orchestration import get_client

    if _api_answers(api_url) != "ok":
        raise EnvironmentFailure(f"the Prefect API at {api_url} does not answer; start it or unset PREFECT_API_URL")
    try:
        with get_client(sync_client=True) as client:
            client.hello()
    except httpx.HTTPError as error:
        raise _api_failure(error, api_url) from None


@contextmanager
def _prefect_session() -> Iterator[str]:
    """The Prefect API to record runs in, checked and watched; its URL."""
    import httpx
    from prefect.exceptions import PrefectHTTPStatusError

    with local_server.prefect_api() as api_url:
        _check_api(api_url)
        _watch_api(api_url)
        _quiet_console_tracebacks()
        try:
            yield api_url
        except (httpx.HTTPError, PrefectHTTPStatusError) as error:
            raise _api_failure(error, api_url) from None


def _run_flow(flow, parameters: dict[str, Any], api_url: str, *tag_names: str) -> dict[str, Any]:
    """Run a flow, wait until its task runs are recorded (also when it fails), and return its summary."""
    import httpx
    from prefect import tags
    from prefect.exceptions import PrefectHTTPStatusError

    from featuresum.flows import pipeline

    try:
        # The date tag is given at creation, so the flow need not add it with another API call.
        with tags("featuresum", *tag_names, f"seed-{parameters['seed']}", f"date-{parameters['run_date']}"):
            earlier, recorded = set(pipeline.TASK_RUNS), {}

            def wait_for_new_task_runs() -> None:
                for flow_run_id in set(pipeline.TASK_RUNS) - earlier:
                    recorded[flow_run_id] = _wait_for_task_runs(flow_run_id, pipeline.TASK_RUNS[flow_run_id])

            try:
                state = flow(**parameters, return_state=True)
            except BaseException:
                # Also after Ctrl-C or SIGTERM the UI should show every task run in its final state;
                # but a wait that times out must not replace the reason the run ended.
                with suppress(EnvironmentFailure):
                    wait_for_new_task_runs()
                raise
            # A failed run returns its state: its task runs are recorded before the error is raised.
            wait_for_new_task_runs()
        summary = state.result()
    except (httpx.HTTPError, PrefectHTTPStatusError) as error:
        raise _api_failure(error, api_url) from None
    del summary["task_runs"]
    summary["task_states"] = recorded[summary["flow_run_id"]]
    summary["ui"] = f"{api_url.removesuffix('/api')}/runs/flow-run/{summary['flow_run_id']}"
    return summary


def _execute(flow_name: str, parameters: dict[str, Any], as_json: bool, task_runner=None) -> None:
    """Run one flow of the pipeline against the Prefect API and report it."""
    from featuresum.flows import pipeline

    flow = {"run": pipeline.pipeline_flow, "train": pipeline.train_flow, "score": pipeline.score_flow}[flow_name]
    if task_runner is not None:
        flow = flow.with_options(task_runner=task_runner)
    with _prefect_session() as api_url:
        summary = _run_flow(flow, parameters, api_url, f"cli-{flow_name}")
    _report(summary, as_json)


def _wait_for_task_runs(flow_run_id: str, task_runs: dict[str, str]) -> dict[str, str]:
    """Wait until these task runs are recorded in a final state; a timeout is the environment's failure."""
    try:
        return local_server.wait_for_task_runs(flow_run_id, list(task_runs))
    except TimeoutError as error:
        raise EnvironmentFailure(f"the Prefect API did not record every task run: {error}") from None


def _report(summary: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary))
        return
    for key in ("train_data", "holdout_data", "checkpoint", "model_version", "score_input", "predictions", "ui"):
        if key in summary:
            print(f"{key:>12}: {summary[key]}")
    if gate := summary.get("registry"):
        print(f"{'champion':>12}: version {gate['champion_version']} ({gate['reason']})")
    if drift := summary.get("drift"):
        print(f"{'drift':>12}: {_drift_line(drift)}")
    for key, value in summary["metrics"].items():
        print(f"{key:>12}: {value:.4f}" if isinstance(value, float) else f"{key:>12}: {value}")
    for name, state in summary["task_states"].items():
        print(f"{state:>12}: {name}")


def _drift_line(drift: dict[str, Any]) -> str:
    """A batch's drift level and PSIs, as progress lines and reports show them."""

    features, classes = (_cell(drift[key]) for key in ("feature_sum_psi", "predicted_class_psi"))
    return f"{drift['level']} (feature-sum PSI {features}, predicted-class PSI {classes})"


def _show_version(value: bool) -> None:
    if value:
        print(f"featuresum {version('featuresum')} (prefect {version('prefect')}, torch {version('torch')})")
        raise typer.Exit()


@app.callback()
def _options(
    show_version: Annotated[
        bool, typer.Option("--version", callback=_show_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    pass


@app.command(
    help=f"Run the whole pipeline: generate data, train and checkpoint, score a new batch.\n\n{LOCAL_SERVER_HELP}"
)
def run(
    preset: PresetOpt = Preset.default,
    train_samples: TrainSamples = None,
    holdout_samples: HoldoutSamples = None,
    score_samples: ScoreSamples = None,
    epochs: Epochs = None,
    batch_size: BatchSize = None,
    lr: Lr = None,
    weight_decay: WeightDecay = None,
    schedule: ScheduleOpt = None,
    seed: Seed = 0,
    run_date: RunDate = None,
    window_days: WindowDays = 1,
    drift: Drift = 0.0,
    init: InitOpt = InitChoice.scratch,
    data_dir: DataDir = "data",
    artifacts_dir: ArtifactsDir = "artifacts",
    device: DeviceOpt = DeviceChoice.auto,
    runner: RunnerOpt = RunnerChoice.default,
    dask_address: DaskAddress = None,
    dask_workers: DaskWorkers = None,
    shard_rows: ShardRows = None,
    min_improvement: MinImprovement = 0.0,
    drift_warn: DriftWarn = DRIFT_WARN,
    drift_alert: DriftAlert = DRIFT_ALERT,
    refresh: Refresh = False,
    json_output: JsonOpt = False,
) -> None:
    _drift_levels(drift_warn, drift_alert)
    options = dict(locals())
    task_runner = _task_runner(options.pop("runner"), options.pop("dask_address"), options.pop("dask_workers"))
    as_json = options.pop("json_output")
    options["run_date"] = run_date or _today()
    prepare_folders(data_dir, artifacts_dir)
    _execute("run", flow_parameters(options.pop("preset"), **options), as_json, task_runner)


@app.command(help=f"Generate data, train and checkpoint the model, report held-out accuracy.\n\n{LOCAL_SERVER_HELP}")
def train(
    preset: PresetOpt = Preset.default,
    train_samples: TrainSamples = None,
    holdout_samples: HoldoutSamples = None,
    epochs: Epochs = None,
    batch_size: BatchSize = None,
    lr: Lr = None,
    weight_decay: WeightDecay = None,
    schedule: ScheduleOpt = None,
    seed: Seed = 0,
    run_date: RunDate = None,
    window_days: WindowDays = 1,
    drift: Drift = 0.0,
    init: InitOpt = InitChoice.scratch,
    data_dir: DataDir = "data",
    artifacts_dir: ArtifactsDir = "artifacts",
    device: DeviceOpt = DeviceChoice.auto,
    min_improvement: MinImprovement = 0.0,
    refresh: Refresh = False,
    json_output: JsonOpt = False,
) -> None:
    options = dict(locals())
    as_json = options.pop("json_output")
    options["run_date"] = run_date or _today()
    prepare_folders(data_dir, artifacts_dir)
    parameters = flow_parameters(options.pop("preset"), **options)
    parameters.pop("score_samples")
    _execute("train", parameters, as_json)


@app.command(
    help=f"Score a Parquet file (--input) or a fresh batch (--samples) with a checkpoint.\n\n{LOCAL_SERVER_HELP}"
)
def score(
    model: Annotated[
        str,
        typer.Option(
            help="A checkpoint file, or a registered model: `champion` or a version number (see `featuresum models`)."
        ),
    ],
    input: Annotated[str | None, typer.Option(help="Parquet file of feature rows to score (or an s3:// URI).")] = None,
    samples: Annotated[int | None, typer.Option(min=0, help="Score a fresh batch of this many rows.")] = None,
    output: Annotated[
        str | None, typer.Option(help="Predictions file or s3:// URI (default: under --artifacts-dir).")
    ] = None,
    seed: Seed = 0,
    run_date: RunDate = None,
    drift: Drift = 0.0,
    data_dir: DataDir = "data",
    artifacts_dir: ArtifactsDir = "artifacts",
    device: DeviceOpt = DeviceChoice.auto,
    runner: RunnerOpt = RunnerChoice.default,
    dask_address: DaskAddress = None,
    dask_workers: DaskWorkers = None,
    shard_rows: ShardRows = None,
    drift_warn: DriftWarn = DRIFT_WARN,
    drift_alert: DriftAlert = DRIFT_ALERT,
    refresh: Refresh = False,
    json_output: JsonOpt = False,
) -> None:
    _drift_levels(drift_warn, drift_alert)
    from featuresum.tasks import storage
    from featuresum.tasks.checkpoint import load_checkpoint
    from featuresum.tasks.registry import Registry, changed_weights

    if (input is None) == (samples is None):
        raise typer.BadParameter("give exactly one of --input PARQUET or --samples N")
    # Buckets of the inputs first, so a wrong bucket or credentials is said before a file is read;
    # the folders this run writes to are prepared below, once the options are known to be sound.
    prepare_folders(*{storage.parent(given) for given in (model, input) if given and storage.is_remote(given)})
    registry = Registry(artifacts_dir)
    if (model == "champion" or model.isdigit()) and not storage.exists(model):
        model = str(registry.resolve(model).checkpoint)
    if storage.exists(model) and (changed := registry.changed_at(storage.resolve(model), storage.fingerprint(model))):
        raise EnvironmentFailure(changed_weights(model, changed.version))
    for given in filter(None, (input, model)):
        if output is not None and storage.resolve(output) == storage.resolve(given):
            raise typer.BadParameter(
                f"{output} is also an input of this run; choose another file", param_hint="--output"
            )
    # The checkpoint and the input's schema are checked before any run starts, so a bad file costs
    # one clear line; the input's values are checked while it is scored (one read of a big file).
    load_checkpoint(model)
    if input is not None:
        storage.open_features(storage.at(input))
    prepare_folders(data_dir, artifacts_dir, *([storage.parent(output)] if output else []))
    parameters = {
        "model": model,
        "input": input,
        "samples": samples,
        "seed": seed,
        "run_date": run_date or _today(),
        "drift": drift,
        "output": output,
        "data_dir": data_dir,
        "artifacts_dir": artifacts_dir,
        "device": device.value,
        "drift_warn": drift_warn,
        "drift_alert": drift_alert,
        "refresh": refresh,
    }
    if shard_rows:
        parameters["shard_rows"] = shard_rows
    _execute("score", parameters, json_output, _task_runner(runner, dask_address, dask_workers))


# What `--json` reports of a scored batch's drift.
DRIFT_KEYS = ("feature_sum_psi", "predicted_class_psi", "level")


class ReprocessChoice(StrEnum):
    missing = "missing"
    failed = "failed"
    all = "all"


@app.command(
    help="Run the pipeline once per date from --from to --to, oldest first, stopping at the first failure.\n\n"
    "Each date is a flow run of its own that trains a challenger on that date's data, gates it and scores the "
    "date's batch with the champion, exactly as `featuresum run --date` does; after a backfill the registry holds "
    "the versions and the champion that running the dates one by one gives. --reprocess decides what happens to "
    "dates that already have a run with the same options: missing (default) runs those without a completed run, "
    f"failed only those whose last run failed, all every date.\n\n{LOCAL_SERVER_HELP}"
)
def backfill(
    from_date: Annotated[str, typer.Option("--from", callback=iso_date, help="First date, YYYY-MM-DD.")],
    to_date: Annotated[str, typer.Option("--to", callback=iso_date, help="Last date, YYYY-MM-DD (included).")],
    reprocess: Annotated[
        ReprocessChoice, typer.Option(help="Which dates with an earlier run to run again: missing, failed or all.")
    ] = ReprocessChoice.missing,
    deployment: Annotated[
        str | None,
        typer.Option(
            help="Create the runs on this served deployment (flow/name) instead, one at a time, with its own "
            "parameters and each date's run_date; repeating an interrupted command finds the runs it created."
        ),
    ] = None,
    preset: PresetOpt = Preset.default,
    train_samples: TrainSamples = None,
    holdout_samples: HoldoutSamples = None,
    score_samples: ScoreSamples = None,
    epochs: Epochs = None,
    batch_size: BatchSize = None,
    lr: Lr = None,
    weight_decay: WeightDecay = None,
    schedule: ScheduleOpt = None,
    seed: Seed = 0,
    window_days: WindowDays = 1,
    drift: Drift = 0.0,
    init: InitOpt = InitChoice.scratch,
    data_dir: DataDir = "data",
    artifacts_dir: ArtifactsDir = "artifacts",
    device: DeviceOpt = DeviceChoice.auto,
    shard_rows: ShardRows = None,
    min_improvement: MinImprovement = 0.0,
    drift_warn: DriftWarn = DRIFT_WARN,
    drift_alert: DriftAlert = DRIFT_ALERT,
    refresh: Refresh = False,
    json_output: JsonOpt = False,
) -> None:
    _drift_levels(drift_warn, drift_alert)
    options = dict(locals())
    for name in ("from_date", "to_date", "reprocess", "deployment", "json_output"):
        del options[name]
    from featuresum.flows import backfill as backfills
    from featuresum.flows.pipeline import pipeline_flow

    start, end = date.fromisoformat(from_date), date.fromisoformat(to_date)
    if end < start:
        raise typer.BadParameter(f"--to {to_date} is before --from {from_date}")
    prepare_folders(data_dir, artifacts_dir)
    parameters = flow_parameters(options.pop("preset"), **options)
    days = backfills.dates_between(start, end)
    runs = []
    if deployment:
        with _prefect_session():
            runs, artifacts_dir = _backfill_deployment(deployment, days, reprocess.value)
        _report_backfill(runs, artifacts_dir, json_output)
        return
    with _prefect_session() as api_url:
        earlier = backfills.earlier_runs(parameters, days)
        pending = backfills.to_run(days, earlier, reprocess.value)
        for day in days:
            if day not in pending:
                runs.append(_skipped(day, earlier.get(day.isoformat())))
                continue
            summary = _run_flow(pipeline_flow, {**parameters, "run_date": day.isoformat()}, api_url, "backfill")
            gate = summary["registry"]
            runs.append(
                {
                    "run_date": day.isoformat(),
                    "flow_run_id": summary["flow_run_id"],
                    "state": "Completed",
                    "model_version": summary["model_version"],
                    "promoted": gate["promoted"],
                    "drift": summary["drift"],
                }
            )
            kept = "promoted to champion" if gate["promoted"] else f"champion stays version {gate['champion_version']}"
            drift = _drift_line(summary["drift"])
            print(f"{day}: Completed, model version {summary['model_version']}, {kept}; drift {drift}", file=sys.stderr)
    _report_backfill(runs, artifacts_dir, json_output)


def _skipped(day: date, previous: Any) -> dict[str, Any]:
    """A date the backfill leaves alone, and the progress line that says why."""
    why = f"run {previous.name} is {previous.state.name}" if previous else "no earlier run to reprocess"
    print(f"{day}: skipped, {why}", file=sys.stderr)
    return {"run_date": day.isoformat(), "flow_run_id": str(previous.id) if previous else None, "state": "Skipped"}


def _deployment_folder(deployment: Any, folder: str) -> str:
    """A deployment's folder as its runs see it: a relative one is under the working directory its pull
    steps set (a prefect.yaml deployment), else under the folder it was served from."""
    from featuresum.tasks import storage

    if storage.is_remote(folder) or Path(folder).is_absolute():
        return folder
    for step in deployment.pull_steps or []:
        if directory := step.get("prefect.deployments.steps.set_working_directory", {}).get("directory"):
            return str(Path(directory) / folder)
    return str(Path(deployment.path or ".") / folder)


def _backfill_deployment(name: str, days: list[date], reprocess: str) -> tuple[list[dict[str, Any]], str]:
    """Runs of a served deployment, one per date; the registry is in the deployment's artifacts folder."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    from featuresum.flows import backfill as backfills
    from featuresum.tasks import monitoring
    from featuresum.tasks.registry import Registry

    try:
        with get_client(sync_client=True) as client:
            found = client.read_deployment_by_name(name)
    except (ObjectNotFound, ValueError):
        raise typer.BadParameter(f"no deployment {name!r} (give flow/name, e.g. featuresum-pipeline/<name>)") from None
    artifacts_dir = _deployment_folder(found, found.parameters.get("artifacts_dir", "artifacts"))
    registry, runs = Registry(artifacts_dir), []
    for day, run, skipped in backfills.on_deployment(name, days, reprocess):
        if skipped:
            runs.append(_skipped(day, run))
            continue
        version = next((v for v in registry.versions() if v.flow_run_id == str(run.id)), None)
        batch = next((row for row in monitoring.read_history(artifacts_dir) if row["flow_run_id"] == str(run.id)), None)
        runs.append(
            {
                "run_date": day.isoformat(),
                "flow_run_id": str(run.id),
                "state": run.state.name,
                "model_version": version.version if version else None,
                "promoted": any(change.flow_run_id == str(run.id) for change in registry.history()),
                "drift": {key: batch[key] for key in DRIFT_KEYS} if batch else None,
            }
        )
        print(f"{day}: {run.state.name}, run {run.name}", file=sys.stderr, flush=True)
        if not run.state.is_completed():
            raise EnvironmentFailure(f"backfill stopped at {day}: run {run.name} ended {run.state.name}")
    return runs, artifacts_dir


def _report_backfill(runs: list[dict[str, Any]], artifacts_dir: str, as_json: bool) -> None:
    from featuresum.tasks.registry import Registry

    champion = Registry(artifacts_dir).alias()
    result = {"runs": runs, "champion_version": champion.version if champion else None}
    if as_json:
        print(json.dumps(result))
    else:
        ran = sum(run["state"] != "Skipped" for run in runs)
        print(f"{len(runs)} dates, {ran} run; champion: version {result['champion_version']}")


@app.command()
def serve(
    cron: Annotated[str, typer.Option(help="When to run, as a cron string (minute hour day month weekday).")] = (
        "0 3 * * *"
    ),
    timezone: Annotated[str, typer.Option(help="IANA timezone the cron string is read in.")] = "UTC",
    name: Annotated[str, typer.Option(help="Deployment name: featuresum-pipeline/<name>.")] = "scheduled-retraining",
    preset: PresetOpt = Preset.default,
    train_samples: TrainSamples = None,
    holdout_samples: HoldoutSamples = None,
    score_samples: ScoreSamples = None,
    epochs: Epochs = None,
    batch_size: BatchSize = None,
    lr: Lr = None,
    weight_decay: WeightDecay = None,
    schedule: ScheduleOpt = None,
    seed: Seed = 0,
    window_days: WindowDays = 1,
    drift: Drift = 0.0,
    init: InitOpt = InitChoice.scratch,
    data_dir: DataDir = "data",
    artifacts_dir: ArtifactsDir = "artifacts",
    device: DeviceOpt = DeviceChoice.auto,
    shard_rows: ShardRows = None,
    min_improvement: MinImprovement = 0.0,
    drift_warn: DriftWarn = DRIFT_WARN,
    drift_alert: DriftAlert = DRIFT_ALERT,
    retrain_on_drift: Annotated[
        bool,
        typer.Option(
            help="Also run the deployment when a batch scored with its artifacts folder drifts to level alert "
            "(a trigger on the featuresum.drift.detected event), for the date of that batch."
        ),
    ] = False,
    refresh: Refresh = False,
) -> None:
    """Serve the pipeline on a cron schedule and execute its runs (one at a time) until stopped."""
    _drift_levels(drift_warn, drift_alert)
    options = dict(locals())
    del options["cron"], options["timezone"], options["name"], options["retrain_on_drift"]
    from featuresum.flows.serve import cron_schedule, serve_pipeline
    from featuresum.tasks import storage

    when = cron_schedule(cron, timezone)
    # Absolute folders: runs execute in subprocesses and may be triggered from anywhere.
    options.update(data_dir=storage.resolve(data_dir), artifacts_dir=storage.resolve(artifacts_dir))
    prepare_folders(options["data_dir"], options["artifacts_dir"])
    serve_pipeline(name, when, flow_parameters(options.pop("preset"), **options), retrain_on_drift)


@app.command()
def monitor(
    artifacts_dir: ArtifactsDir = "artifacts",
    last: Annotated[int, typer.Option(min=1, help="Show the latest N scored batches.")] = 30,
    json_output: Annotated[bool, typer.Option("--json", help="Print the rows as one JSON list.")] = False,
) -> None:
    """Show the monitoring history: drift (PSI) and accuracy of every scored batch, by date."""
    from featuresum.tasks import monitoring

    rows = monitoring.read_history(artifacts_dir)[-last:]
    if json_output:
        print(json.dumps(rows))
        return
    if not rows:
        print(f"no scored batches yet in {monitoring.history_path(artifacts_dir)}")
        return
    columns = ("run_date", "model_version", "rows", "feature_sum_psi", "predicted_class_psi")
    columns += ("feature_sum_mean", "mean_confidence", "accuracy", "level")
    cells = [[_cell(row[name]) for name in columns] for row in rows]
    widths = [max(len(name), *(len(line[i]) for line in cells)) for i, name in enumerate(columns)]
    for line in [list(columns), *cells]:
        print("  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True)))


def _cell(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


app.add_typer(server_app, name="server")
app.add_typer(models_app, name="models")


def _exit_code(error: BaseException) -> tuple[int, str | None]:
    """Exit code and one-line message for an error that ends a command; (0, None) for anything else."""
    from prefect.exceptions import TerminationSignal

    if isinstance(error, typer.Abort | KeyboardInterrupt):
        return 130, "interrupted"
    if isinstance(error, TerminationSignal | Terminated):
        return 128 + error.signal, "terminated"
    if isinstance(error, typer.TyperException):
        return 2, error.format_message()
    if isinstance(error, InputError):
        return 2, str(error)
    if isinstance(error, EnvironmentFailure | local_server.ServerError):
        return 1, str(error)
    if isinstance(error, sqlite3.Error):
        return 1, f"the model registry could not be used ({error})"
    if type(error).__module__.startswith("botocore"):
        return 1, f"the object store failed: {str(error).splitlines()[0] if str(error) else type(error).__name__}"
    if isinstance(error, OSError):
        where = f"{error.filename}: " if error.filename else ""
        return (2 if error.errno in USER_ERRNOS else 1), f"{where}{error.strerror or error}"
    return 0, None


def _terminate(signum: int, frame: object) -> None:
    # Prefect swaps in its own handler while a flow runs (the run then ends Crashed) and hands the
    # signal back to this one afterwards, so the command still ends with one line and 143.
    raise Terminated(signum)


def entry_point() -> None:
    """The `featuresum` executable: `main`, then an exit that skips the interpreter's teardown.

    Freeing every object of Prefect, torch and pyarrow one by one at exit takes 0.5-1.3 s here,
    as long as a cached run's flow. The handler is registered before Prefect is imported, so it runs
    after Prefect's own exit handlers, which send the last logs and events to the API.
    """
    status: list[object] = [1]  # an error that escapes main exits 1, as Python would
    last_words: list[str] = []  # the error line, said after Prefect's exit handlers have logged theirs

    def exit_now() -> None:
        try:
            logging.shutdown()
        finally:
            for line in last_words:
                print(line, file=sys.stderr)
            for stream in (sys.stdout, sys.stderr):
                with suppress(OSError, ValueError):  # a closed pipe or stream: nothing left to flush
                    stream.flush()
            code = status[0]
            os._exit(0 if code is None else code if isinstance(code, int) else 1)

    atexit.register(exit_now)
    try:
        main(last_words.append)
    except SystemExit as done:
        status[0] = done.code
        raise


def main(say: Callable[[str], None] | None = None) -> None:
    """Entry point: errors end with one line on stderr and the exit code of their kind, not a traceback.

    `say` takes that line instead of printing it at once (the executable prints it last of all).
    """
    say = say or partial(print, file=sys.stderr)
    local_server.quiet_defaults()
    signal.signal(signal.SIGTERM, _terminate)
    command = typer.main.get_command(app)
    try:
        code = command.main(prog_name="featuresum", standalone_mode=False)
    except BaseException as error:  # mapped to an exit code below, or re-raised
        code, message = _exit_code(error)
        if not code:
            raise
        say(f"featuresum: error: {message}")
        sys.exit(code)
    if code == 130:  # Typer turns Ctrl-C into this exit code
        say("featuresum: error: interrupted")
    sys.exit(code if isinstance(code, int) else 0)

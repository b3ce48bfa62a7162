"""The `featuresum` command line: one-off pipeline runs, training, scoring and scheduled serving."""

import json
import sys
from enum import Enum, StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from featuresum.flows import runtime

app = typer.Typer(
    help="Synthetic feature-sum classifier: generate data, train, and score, as Prefect flows.\n\n"
    "Runs are recorded by the Prefect API in PREFECT_API_URL or, when none is set, by a local "
    "Prefect server (127.0.0.1, database under PREFECT_HOME) that is started on first use and "
    "reused; its UI shows every run.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


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
DataDir = Annotated[Path, typer.Option(help="Folder for generated Parquet data.")]
ArtifactsDir = Annotated[Path, typer.Option(help="Folder for checkpoints and predictions.")]
DeviceOpt = Annotated[DeviceChoice, typer.Option(help="Where to train and score; cuda falls back to cpu if absent.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object with paths, metrics and task states.")]
Refresh = Annotated[bool, typer.Option(help="Recompute every step instead of reusing cached outputs.")]
PresetOpt = Annotated[Preset, typer.Option(help="Sizes and settings: default (about a minute) or full.")]
TrainSamples = Annotated[int | None, typer.Option(min=1, help="Training rows. (preset)")]
HoldoutSamples = Annotated[int | None, typer.Option(min=1, help="Held-out rows, from a different seed. (preset)")]
Epochs = Annotated[int | None, typer.Option(min=1, help="Training epochs. (preset)")]
BatchSize = Annotated[int | None, typer.Option(min=1, help="Training batch size. (preset)")]
Lr = Annotated[float | None, typer.Option(min=1e-9, help="Peak learning rate of AdamW. (preset)")]
WeightDecay = Annotated[float | None, typer.Option(min=0.0, help="AdamW weight decay. (preset)")]
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
ShardRows = Annotated[int, typer.Option(min=1, help="Rows per scoring shard; each shard is one task run.")]
ScheduleOpt = Annotated[
    ScheduleChoice | None, typer.Option(help="Learning-rate schedule: onecycle, or constant. (preset)")
]


def _flow_parameters(preset: Preset, **options: Any) -> dict[str, Any]:
    """Flow parameters: a preset's values, overridden by every option the user gave."""
    from featuresum.flows.pipeline import PRESETS

    def plain(value: Any) -> Any:
        return value.value if isinstance(value, Enum) else str(value) if isinstance(value, Path) else value

    values = dict(PRESETS[preset.value])
    values.update({key: plain(value) for key, value in options.items() if value is not None})
    return values


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


def _execute(flow_name: str, parameters: dict[str, Any], as_json: bool, task_runner=None) -> None:
    """Run a flow against the Prefect API, wait until its task runs are recorded, then report."""
    from prefect import tags
    from prefect.exceptions import PrefectHTTPStatusError

    from featuresum.flows import pipeline
    from featuresum.tasks.errors import InputError

    flow = {"run": pipeline.pipeline_flow, "train": pipeline.train_flow, "score": pipeline.score_flow}[flow_name]
    if task_runner is not None:
        flow = flow.with_options(task_runner=task_runner)
    with runtime.prefect_api() as api_url, tags("featuresum", f"cli-{flow_name}", f"seed-{parameters['seed']}"):
        try:
            summary = flow(**parameters)
        except PrefectHTTPStatusError as error:
            if error.response.status_code != 401:
                raise
            raise InputError(f"the Prefect API at {api_url} refused us (401); set PREFECT_API_AUTH_STRING") from None
        summary["task_states"] = runtime.wait_for_task_runs(summary["flow_run_id"], list(summary.pop("task_runs")))
    summary["ui"] = f"{api_url.removesuffix('/api')}/runs/flow-run/{summary['flow_run_id']}"
    if as_json:
        print(json.dumps(summary))
        return
    for key in ("train_data", "checkpoint", "score_input", "predictions", "ui"):
        if key in summary:
            print(f"{key:>12}: {summary[key]}")
    for key, value in summary["metrics"].items():
        print(f"{key:>12}: {value:.4f}" if isinstance(value, float) else f"{key:>12}: {value}")
    for name, state in summary["task_states"].items():
        print(f"{state:>12}: {name}")


@app.command()
def run(
    preset: PresetOpt = Preset.default,
    train_samples: TrainSamples = None,
    holdout_samples: HoldoutSamples = None,
    score_samples: Annotated[int | None, typer.Option(min=0, help="Rows in the batch to score. (preset)")] = None,
    epochs: Epochs = None,
    batch_size: BatchSize = None,
    lr: Lr = None,
    weight_decay: WeightDecay = None,
    schedule: ScheduleOpt = None,
    seed: Seed = 0,
    data_dir: DataDir = Path("data"),
    artifacts_dir: ArtifactsDir = Path("artifacts"),
    device: DeviceOpt = DeviceChoice.auto,
    runner: RunnerOpt = RunnerChoice.default,
    dask_address: DaskAddress = None,
    dask_workers: DaskWorkers = None,
    shard_rows: ShardRows = None,
    refresh: Refresh = False,
    json_output: JsonOpt = False,
) -> None:
    """Run the whole pipeline: generate data, train and checkpoint, score a new batch."""
    parameters = _flow_parameters(
        preset,
        train_samples=train_samples,
        holdout_samples=holdout_samples,
        score_samples=score_samples,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        schedule=schedule,
        seed=seed,
        data_dir=data_dir,
        artifacts_dir=artifacts_dir,
        device=device,
        shard_rows=shard_rows,
        refresh=refresh,
    )
    _execute("run", parameters, json_output, _task_runner(runner, dask_address, dask_workers))


@app.command()
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
    data_dir: DataDir = Path("data"),
    artifacts_dir: ArtifactsDir = Path("artifacts"),
    device: DeviceOpt = DeviceChoice.auto,
    refresh: Refresh = False,
    json_output: JsonOpt = False,
) -> None:
    """Generate training and held-out data, train and checkpoint the model, report held-out accuracy."""
    parameters = _flow_parameters(
        preset,
        train_samples=train_samples,
        holdout_samples=holdout_samples,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        schedule=schedule,
        seed=seed,
        data_dir=data_dir,
        artifacts_dir=artifacts_dir,
        device=device,
        refresh=refresh,
    )
    parameters.pop("score_samples")
    _execute("train", parameters, json_output)


@app.command()
def score(
    model: Annotated[Path, typer.Option(help="Checkpoint written by `featuresum train` or `run`.")],
    input: Annotated[Path | None, typer.Option(help="Parquet file of feature rows to score.")] = None,
    samples: Annotated[int | None, typer.Option(min=0, help="Score a fresh batch of this many rows.")] = None,
    output: Annotated[Path | None, typer.Option(help="Predictions file (default: under --artifacts-dir).")] = None,
    seed: Seed = 0,
    data_dir: DataDir = Path("data"),
    artifacts_dir: ArtifactsDir = Path("artifacts"),
    device: DeviceOpt = DeviceChoice.auto,
    runner: RunnerOpt = RunnerChoice.default,
    dask_address: DaskAddress = None,
    dask_workers: DaskWorkers = None,
    shard_rows: ShardRows = None,
    refresh: Refresh = False,
    json_output: JsonOpt = False,
) -> None:
    """Score a Parquet file (--input) or a freshly generated batch (--samples) with a checkpoint."""
    from featuresum.tasks import storage

    if (input is None) == (samples is None):
        raise typer.BadParameter("give exactly one of --input PARQUET or --samples N")
    # User files are checked before any run starts, so a bad file costs one clear line, not a failed run.
    storage.load_checkpoint(model)
    if input is not None:
        for _ in storage.iter_feature_batches(input):
            pass
    parameters = {
        "model": str(model),
        "input": str(input) if input else None,
        "samples": samples,
        "seed": seed,
        "output": str(output) if output else None,
        "data_dir": str(data_dir),
        "artifacts_dir": str(artifacts_dir),
        "device": device.value,
        "refresh": refresh,
    }
    if shard_rows:
        parameters["shard_rows"] = shard_rows
    _execute("score", parameters, json_output, _task_runner(runner, dask_address, dask_workers))


def main() -> None:
    """Entry point: user errors end with one line on stderr and exit code 2, not a traceback."""
    from featuresum.tasks.errors import InputError

    runtime.quiet_defaults()
    command = typer.main.get_command(app)
    try:
        code = command.main(prog_name="featuresum", standalone_mode=False)
    except typer.Abort:
        sys.exit(130)
    except (typer.TyperException, InputError) as error:
        message = error.format_message() if isinstance(error, typer.TyperException) else str(error)
        print(f"featuresum: error: {message}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)


import featuresum.flows.serve  # noqa: E402, F401  (registers `featuresum serve`; it reuses the options above)

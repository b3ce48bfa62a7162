"""`featuresum serve`: the pipeline as a Prefect deployment that retrains on a cron schedule.

The serve process registers the deployment, then polls the Prefect API and executes each
scheduled or manually triggered run in a subprocess of its own. It needs a real Prefect server
(ephemeral Prefect has no scheduler): the one in PREFECT_API_URL, or the local server that the
other commands start and reuse.
"""

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from featuresum.flows import runtime
from featuresum.flows.cli import (
    ArtifactsDir,
    BatchSize,
    DataDir,
    DeviceChoice,
    DeviceOpt,
    Epochs,
    HoldoutSamples,
    Lr,
    Preset,
    PresetOpt,
    Refresh,
    ScheduleOpt,
    Seed,
    ShardRows,
    TrainSamples,
    WeightDecay,
    _flow_parameters,
    app,
)

if TYPE_CHECKING:
    from prefect.schedules import Schedule

DEFAULT_DEPLOYMENT = "scheduled-retraining"
DEFAULT_CRON = "0 3 * * *"
# At most one run of the deployment at a time: a run that comes due while another is still
# training waits for it instead of competing for the same cores and files.
RUN_LIMIT = 1


def cron_schedule(cron: str, timezone: str) -> "Schedule":
    """A Prefect cron schedule; a bad cron string or timezone is a usage error."""
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.schedules import Cron
    from pydantic import ValidationError

    try:
        CronSchedule(cron=cron, timezone=timezone)
    except ValidationError as error:
        message = "; ".join(str(detail["msg"]).removeprefix("Value error, ") for detail in error.errors())
        raise typer.BadParameter(message, param_hint="--cron/--timezone") from None
    return Cron(cron, timezone=timezone)


def serve_pipeline(name: str, schedule: "Schedule", parameters: dict[str, Any]) -> None:
    """Create (or update) the deployment `featuresum-pipeline/<name>` and execute its runs until stopped."""
    from prefect.types.entrypoint import EntrypointType

    from featuresum.flows.pipeline import pipeline_flow

    with runtime.prefect_api():
        pipeline_flow.serve(
            name=name,
            schedules=[schedule],
            parameters=parameters,
            limit=RUN_LIMIT,
            tags=["featuresum", "scheduled", f"seed-{parameters['seed']}"],
            description="Scheduled retraining: generate data, train and checkpoint, score a new batch.",
            # The installed module, not a file path relative to wherever serve was started.
            entrypoint_type=EntrypointType.MODULE_PATH,
        )


@app.command()
def serve(
    cron: Annotated[str, typer.Option(help="When to run, as a cron string (minute hour day month weekday).")] = (
        DEFAULT_CRON
    ),
    timezone: Annotated[str, typer.Option(help="IANA timezone the cron string is read in.")] = "UTC",
    name: Annotated[str, typer.Option(help="Deployment name: featuresum-pipeline/<name>.")] = DEFAULT_DEPLOYMENT,
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
    shard_rows: ShardRows = None,
    refresh: Refresh = False,
) -> None:
    """Serve the pipeline on a cron schedule and execute its runs (one at a time) until stopped."""
    when = cron_schedule(cron, timezone)
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
        # Absolute folders: runs execute in subprocesses and may be triggered from anywhere.
        data_dir=data_dir.resolve(),
        artifacts_dir=artifacts_dir.resolve(),
        device=device,
        shard_rows=shard_rows,
        refresh=refresh,
    )
    serve_pipeline(name, when, parameters)

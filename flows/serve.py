"""`featuresum serve`: the pipeline as a Prefect deployment that retrains on a cron schedule.

The serve process registers the deployment, then polls the Prefect API and executes each
scheduled or manually triggered run in a subprocess of its own. It needs a real Prefect server
(ephemeral Prefect has no scheduler): the one in PREFECT_API_URL, or the local server that the
other commands start and reuse.
"""

from typing import TYPE_CHECKING, Any

import typer

from featuresum.flows import runtime

if TYPE_CHECKING:
    from prefect.schedules import Schedule

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

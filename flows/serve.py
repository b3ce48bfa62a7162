"""`featuresum serve`: the pipeline as a Prefect deployment that retrains on a cron schedule.

The serve process registers the deployment, then polls the Prefect API and executes each
scheduled or manually triggered run in a subprocess of its own. It needs a real Prefect server
(ephemeral Prefect has no scheduler): the one in PREFECT_API_URL, or the local server that the
other commands start and reuse.
"""

from typing import TYPE_CHECKING, Any

import typer

from featuresum.flows import local_server

if TYPE_CHECKING:
    from prefect.events import DeploymentEventTrigger
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


def drift_trigger(name: str, artifacts_dir: str) -> "DeploymentEventTrigger":
    """A trigger that runs the deployment for the date of a batch that drifted to level alert.

    It matches the drift events of batches that `featuresum score` scored with the models in the
    deployment's own artifacts folder: a pipeline run's alert comes after it trained a challenger
    for that date, so retraining for the date again would change nothing (and a triggered run's
    own alert can never trigger another run). The event's payload gives the run its date; every
    other parameter is the deployment's.
    """
    from prefect.events import DeploymentEventTrigger

    from featuresum.tasks import monitoring

    return DeploymentEventTrigger(
        name=f"{monitoring.RETRAIN_AUTOMATION} ({name})",
        description=f"Retrain when a batch scored with the models in {artifacts_dir} drifts to level alert.",
        expect={monitoring.DRIFT_EVENT},
        match={"featuresum.artifacts-dir": artifacts_dir, "featuresum.scored-by": "score"},
        parameters={"run_date": "{{ event.payload.date }}"},
    )


def serve_pipeline(name: str, schedule: "Schedule", parameters: dict[str, Any], retrain_on_drift: bool) -> None:
    """Create (or update) the deployment `featuresum-pipeline/<name>` and execute its runs until stopped."""
    from prefect.types.entrypoint import EntrypointType

    from featuresum.flows.pipeline import pipeline_flow

    triggers = [drift_trigger(name, parameters["artifacts_dir"])] if retrain_on_drift else []

    with local_server.prefect_api():
        pipeline_flow.serve(
            name=name,
            schedules=[schedule],
            parameters=parameters,
            limit=RUN_LIMIT,
            triggers=triggers,
            tags=["featuresum", "scheduled", f"seed-{parameters['seed']}"],
            description="Scheduled retraining: generate data, train and checkpoint, score a new batch, monitor it.",
            # The installed module, not a file path relative to wherever serve was started.
            entrypoint_type=EntrypointType.MODULE_PATH,
        )

"""`featuresum serve`: the pipeline as a Prefect deployment that retrains on a cron schedule.

The serve process registers the deployment, then polls the Prefect API and executes each
scheduled or manually triggered run in a subprocess of its own. It needs a real Prefect server
(ephemeral Prefect has no scheduler): the one in PREFECT_API_URL, or the local server that the
other commands start and reuse.
"""

import asyncio
import sys
from datetime import UTC, date, datetime, timedelta
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


def fire_times(schedule: "Schedule", days: int, now: datetime) -> dict[date, datetime]:
    """{date (UTC): its first fire time} of the schedule within the `days` days before `now`, oldest first."""
    from prefect.server.schemas.schedules import CronSchedule

    if days <= 0:
        return {}
    cron = CronSchedule(cron=schedule.cron, timezone=schedule.timezone)
    times = asyncio.run(cron.get_dates(n=100_000, start=now - timedelta(days=days), end=now))
    found: dict[date, datetime] = {}
    for time in times:
        found.setdefault(time.astimezone(UTC).date(), time)
    return found


def catch_up(name: str, schedule: "Schedule", days: int) -> list[date]:
    """Give every fire time of the last `days` days whose date has no completed run a run, oldest first.

    Through the bookkeeping of `featuresum backfill --deployment ... --reprocess missing`: a date
    whose run is in flight is left to it, one whose run failed or whose process is gone gets a new
    run. Each run is created for its fire time and executed by the serve process, in that order.
    One line per date; the dates given a run.
    """
    from featuresum.flows.backfill import Reprocess, on_deployment

    due = fire_times(schedule, days, datetime.now(UTC))
    if not due:
        return []
    created = []
    for day, run, skipped in on_deployment(name, list(due), Reprocess.missing, scheduled=due):
        if skipped:
            news = "completed" if run.state.is_completed() else f"{run.state.name}, left to it"
            print(f"catch-up {day}: run {run.name} {news}", file=sys.stderr, flush=True)
            continue
        created.append(day)
        print(f"catch-up {day}: no completed run, created run {run.name}", file=sys.stderr, flush=True)
    return created


def serve_pipeline(
    name: str,
    schedule: "Schedule",
    parameters: dict[str, Any],
    *,
    retrain_on_drift: bool = False,
    catch_up_days: int = 0,
    notify_urls: tuple[str, ...] = (),
) -> None:
    """Create (or update) the deployment `featuresum-pipeline/<name>` and execute its runs until stopped.

    Before it polls for runs: the automations of its server are set (dead runs marked Crashed; the
    notifications to `notify_urls`, removed when there are none), and the fire times missed in the
    last `catch_up_days` days are given runs.
    """
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_UI_URL
    from prefect.types.entrypoint import EntrypointType

    from featuresum.flows import automations
    from featuresum.flows.pipeline import pipeline_flow

    triggers = [drift_trigger(name, parameters["artifacts_dir"])] if retrain_on_drift else []
    deployment = {
        "name": name,
        "schedules": [schedule],
        "parameters": parameters,
        "triggers": triggers,
        "tags": ["featuresum", "scheduled", f"seed-{parameters['seed']}"],
        "description": "Scheduled retraining: generate data, train and checkpoint, score a new batch, monitor it.",
        # The installed module, not a file path relative to wherever serve was started.
        "entrypoint_type": EntrypointType.MODULE_PATH,
    }
    full_name = f"{pipeline_flow.name}/{name}"
    with local_server.prefect_api():
        deployment_id = pipeline_flow.to_deployment(**deployment).apply()
        with get_client(sync_client=True) as client:
            automations.watch_dead_runs(client)
            ui = PREFECT_UI_URL.value() or ""
            automations.notify(
                client, str(deployment_id), full_name, parameters["artifacts_dir"], list(notify_urls), ui
            )
        catch_up(full_name, schedule, catch_up_days)
        pipeline_flow.serve(**deployment, limit=RUN_LIMIT)

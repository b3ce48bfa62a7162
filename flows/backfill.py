"""Backfills: the pipeline once per date of a range, oldest first, each date a flow run of its own.

Prefect has schedules but no backfill: this finds, through the Prefect API, the dates that already
have a run with the same options, and runs the others in order, stopping at the first failure.
A run that the API still calls in flight but whose process on this host is gone (killed, out of
memory, a reboot) is marked Crashed and counts as such, so the same command run again reruns its date.
"""

import inspect
import socket
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from enum import StrEnum
from typing import Any

PIPELINE = "featuresum-pipeline"


class Reprocess(StrEnum):
    """Which dates with an earlier run a backfill runs again."""

    missing = "missing"
    failed = "failed"
    all = "all"


def dates_between(start: date, end: date) -> list[date]:
    """Every date from `start` to `end`, both included, oldest first."""
    return [start + timedelta(days=offset) for offset in range((end - start).days + 1)]


def _same_options(run_parameters: dict[str, Any], wanted: dict[str, Any]) -> bool:
    """Whether a run had these options; one it was not given took the flow's default."""
    from featuresum.flows.pipeline import pipeline_flow

    defaults = {name: parameter.default for name, parameter in inspect.signature(pipeline_flow.fn).parameters.items()}
    return all(run_parameters.get(key, defaults.get(key)) == value for key, value in wanted.items())


def earlier_runs(parameters: dict[str, Any], days: list[date]) -> dict[str, Any]:
    """The latest earlier pipeline run of each date with the same options, {run date: flow run}."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterTags
    from prefect.client.schemas.sorting import FlowRunSort

    wanted = {day.isoformat() for day in days}
    found: dict[str, Any] = {}
    with get_client(sync_client=True) as client:
        for run in _pages(
            lambda offset: client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=[PIPELINE])),
                flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=["featuresum"])),
                sort=FlowRunSort.EXPECTED_START_TIME_DESC,
                offset=offset,
                limit=200,
            )
        ):
            day = run_date_of(run)
            if day in wanted and day not in found and _same_options(run.parameters, {**parameters, "run_date": day}):
                found[day] = run
        mark_crashed(client, found.values())
    return found


def _pages(read) -> Iterator[Any]:
    offset = 0
    while page := read(offset):
        yield from page
        offset += len(page)


def run_date_of(run: Any) -> str | None:
    """The date a pipeline run processes: its `run_date` parameter, or (a scheduled run) its `date-` tag,
    or (a scheduled run that has not started yet) the day (UTC) it is scheduled for."""
    if day := run.parameters.get("run_date") or next((tag[5:] for tag in run.tags if tag.startswith("date-")), None):
        return day
    if run.state.is_scheduled() and run.expected_start_time is not None:
        return run.expected_start_time.astimezone(UTC).date().isoformat()
    return None


def process_gone(run: Any) -> bool:
    """Whether a run the API calls in flight has lost its process: one recorded on this host that no
    longer runs (or whose pid now belongs to a process started after the run)."""
    import psutil

    host, _, pid = (run.infrastructure_pid or "").rpartition(":")
    if run.state.is_final() or host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        process = psutil.Process(int(pid))
        started, status = process.create_time(), process.status()
    except psutil.NoSuchProcess:
        return True
    return status == psutil.STATUS_ZOMBIE or (run.start_time is not None and started > run.start_time.timestamp())


def mark_crashed(client: Any, runs: Iterator[Any]) -> None:
    """Put every run whose process is gone in the Crashed state, in the API and in `runs` themselves."""
    from prefect.states import Crashed

    for run in runs:
        if process_gone(run):
            state = Crashed(message=f"its process {run.infrastructure_pid} is gone; found by a backfill")
            client.set_flow_run_state(run.id, state, force=True)
            run.state = state


def count_completed_cancels(client: Any, runs: Iterator[Any]) -> None:
    """Give back its Completed state to every run that completed and was then set Cancelled.

    Prefect's runner cancels the runs it tracks when it is stopped (SIGTERM), one whose flow has
    already returned included: its outputs are all written, so its date is done.
    """
    for run in runs:
        if run.state.is_cancelled():
            run.state = next((s for s in client.read_flow_run_states(run.id) if s.is_completed()), run.state)


def to_run(days: list[date], earlier: dict[str, Any], reprocess: Reprocess) -> list[date]:
    """The dates to run, given the latest earlier run of each date.

    missing: dates with no run, or whose last run ended without completing; failed: only dates
    whose last run failed or crashed; all: every date. A date whose run is still in flight is
    left to it, unless `all`.
    """
    if reprocess == "all":
        return days

    def wanted(day: date) -> bool:
        run = earlier.get(day.isoformat())
        if run is None:
            return reprocess == "missing"
        if reprocess == "failed":
            return run.state.is_failed() or run.state.is_crashed()
        return run.state.is_final() and not run.state.is_completed()

    return [day for day in days if wanted(day)]


def on_deployment(
    name: str, days: list[date], reprocess: Reprocess, scheduled: dict[date, datetime] | None = None
) -> Iterator[tuple[date, Any, bool]]:
    """Run a served deployment once per date, one at a time, oldest first; yields (date, flow run, skipped).

    Each run is created with an idempotency key per deployment, its parameters, the date and the
    number of earlier failed runs of the date (with `all`, a key of its own), so repeating the command
    (after an interruption, say) finds the runs it already created instead of creating new ones, while
    a date whose run failed gets a new run. With `scheduled` ({date: time}), each run is only created,
    for that time, and left to the deployment's runner instead of waited for.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.deployments import run_deployment

    from featuresum.flows.steps import run_name
    from featuresum.tasks.storage import spec_key

    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(name)
        earlier: dict[str, list[Any]] = {}
        for run in _pages(
            lambda offset: client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
                sort=FlowRunSort.EXPECTED_START_TIME_DESC,
                offset=offset,
                limit=200,
            )
        ):
            earlier.setdefault(run_date_of(run), []).append(run)
        mark_crashed(client, (run for runs in earlier.values() for run in runs))
        count_completed_cancels(client, (run for runs in earlier.values() for run in runs))
    # The latest run of a date is the one created last: a rerun may be scheduled for the same time.
    latest = {day: max(runs, key=lambda run: run.created) for day, runs in earlier.items()}
    pending = to_run(days, latest, reprocess)
    for day in days:
        if day not in pending:
            yield day, latest.get(day.isoformat()), True
            continue
        # A run still in flight (or done) keeps its key; a failed one makes way for a new run.
        failed = sum(run.state.is_final() and not run.state.is_completed() for run in earlier.get(day.isoformat(), []))
        attempt = f"all-{failed}" if reprocess == "all" else str(failed)
        key = f"featuresum-backfill/{deployment.id}/{spec_key(deployment.parameters)[:16]}/{day}/{attempt}"
        run = run_deployment(
            name, parameters={"run_date": day.isoformat()}, idempotency_key=key, poll_interval=1, as_subflow=False,
            flow_run_name=run_name("pipeline", day, deployment.parameters.get("seed", 0)),
            tags=["catch-up" if scheduled else "backfill"],
            timeout=0 if scheduled else None, scheduled_time=scheduled.get(day) if scheduled else None,
        )  # fmt: skip
        yield day, run, False

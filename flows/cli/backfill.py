"""`featuresum backfill`: the pipeline once per date of a range, here or on a served deployment."""

import json
import sys
from datetime import date
from pathlib import Path
from typing import Annotated, Any

import typer

from featuresum.flows.backfill import Reprocess
from featuresum.flows.cli._app import LOCAL_SERVER_HELP, app
from featuresum.flows.cli._flow_runs import prefect_session, prepare_folders, run_flow, ui_url
from featuresum.flows.cli._options import (
    DRIFT_LEVELS,
    RETRAINING,
    SCORING,
    JsonOpt,
    iso_date,
    pipeline_options,
)
from featuresum.flows.cli._report import DRIFT_KEYS, drift_line
from featuresum.flows.cli.run import check_memory
from featuresum.flows.options import TRAINING, PipelineOptions
from featuresum.tasks.errors import EnvironmentFailure


@app.command(
    help="Run the pipeline once per date from --from to --to, oldest first, stopping at the first failure.\n\n"
    "Each date is a flow run of its own that trains a challenger on that date's data, gates it and scores the "
    "date's batch with the champion, exactly as `featuresum run --date` does; after a backfill the registry holds "
    "the versions and the champion that running the dates one by one gives. --reprocess decides what happens to "
    "dates that already have a run with the same options: missing (default) runs those without a completed run, "
    f"failed only those whose last run failed, all every date.\n\n{LOCAL_SERVER_HELP}"
)
@pipeline_options(*TRAINING, "score_samples", *RETRAINING, *SCORING, "min_improvement", *DRIFT_LEVELS, "refresh")
def backfill(
    options: PipelineOptions,
    from_date: Annotated[str, typer.Option("--from", callback=iso_date, help="First date, YYYY-MM-DD.")],
    to_date: Annotated[str, typer.Option("--to", callback=iso_date, help="Last date, YYYY-MM-DD (included).")],
    reprocess: Annotated[
        Reprocess, typer.Option(help="Which dates with an earlier run to run again: missing, failed or all.")
    ] = Reprocess.missing,
    deployment: Annotated[
        str | None,
        typer.Option(
            help="Create the runs on this served deployment (flow/name) instead, one at a time, with its own "
            "parameters and each date's run_date; repeating an interrupted command finds the runs it created."
        ),
    ] = None,
    json_output: JsonOpt = False,
) -> None:
    from featuresum.flows import backfill as backfills

    start, end = date.fromisoformat(from_date), date.fromisoformat(to_date)
    if end < start:
        raise typer.BadParameter(f"--to {to_date} is before --from {from_date}")
    check_memory(options)
    prepare_folders(options.data_dir, options.artifacts_dir)
    days = backfills.dates_between(start, end)
    with prefect_session() as api_url:
        if deployment:
            runs, artifacts_dir = _on_deployment(deployment, days, reprocess, api_url)
        else:
            runs, artifacts_dir = _here(options, days, reprocess, api_url), options.artifacts_dir
    _report(runs, artifacts_dir, json_output)


def _here(options: PipelineOptions, days: list[date], reprocess: Reprocess, api_url: str) -> list[dict[str, Any]]:
    """Runs of the pipeline flow in this process, one per date that needs one."""
    from featuresum.flows import backfill as backfills
    from featuresum.flows.pipeline import pipeline_flow

    parameters = options.parameters(pipeline_flow)
    earlier = backfills.earlier_runs(parameters, days)
    pending = backfills.to_run(days, earlier, reprocess)
    runs = []
    for day in days:
        if day not in pending:
            runs.append(_skipped(day, earlier.get(day.isoformat()), api_url))
            continue
        summary = run_flow(pipeline_flow, {**parameters, "run_date": day.isoformat()}, api_url, "backfill")
        gate = summary["registry"]
        runs.append(
            {
                "run_date": day.isoformat(),
                "flow_run_id": summary["flow_run_id"],
                "state": "Completed",
                "model_version": summary["model_version"],
                "promoted": gate["promoted"],
                "drift": summary["drift"],
                "ui": summary["ui"],
            }
        )
        kept = "promoted to champion" if gate["promoted"] else f"champion stays version {gate['champion_version']}"
        drift = drift_line(summary["drift"])
        print(f"{day}: Completed, model version {summary['model_version']}, {kept}; drift {drift}", file=sys.stderr)
    return runs


def _skipped(day: date, previous: Any, api_url: str) -> dict[str, Any]:
    """A date the backfill leaves alone, and the progress line that says why."""
    why = f"run {previous.name} is {previous.state.name}" if previous else "no earlier run to reprocess"
    print(f"{day}: skipped, {why}", file=sys.stderr)
    flow_run_id = str(previous.id) if previous else None
    ui = ui_url(api_url, flow_run_id) if flow_run_id else None
    return {"run_date": day.isoformat(), "flow_run_id": flow_run_id, "state": "Skipped", "ui": ui}


def deployment_folder(deployment: Any, folder: str) -> str:
    """A deployment's folder as its runs see it: a relative one is under the working directory its pull
    steps set (a prefect.yaml deployment), else under the folder it was served from."""
    from featuresum.tasks import storage

    if storage.is_remote(folder) or Path(folder).is_absolute():
        return folder
    for step in deployment.pull_steps or []:
        if directory := step.get("prefect.deployments.steps.set_working_directory", {}).get("directory"):
            return str(Path(directory) / folder)
    return str(Path(deployment.path or ".") / folder)


def _on_deployment(name: str, days: list[date], reprocess: Reprocess, api_url: str) -> tuple[list[dict[str, Any]], str]:
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
    artifacts_dir = deployment_folder(found, found.parameters.get("artifacts_dir", PipelineOptions.artifacts_dir))
    registry, runs = Registry(artifacts_dir), []
    for day, run, skipped in backfills.on_deployment(name, days, reprocess):
        if skipped:
            runs.append(_skipped(day, run, api_url))
            continue
        run_id = str(run.id)
        version = next((v for v in registry.versions() if v.flow_run_id == run_id), None)
        batch = next((row for row in monitoring.read_history(artifacts_dir) if row["flow_run_id"] == run_id), None)
        runs.append(
            {
                "run_date": day.isoformat(),
                "flow_run_id": run_id,
                "state": run.state.name,
                "model_version": version.version if version else None,
                "promoted": any(change.flow_run_id == run_id for change in registry.history()),
                "drift": {key: batch[key] for key in DRIFT_KEYS} if batch else None,
                "ui": ui_url(api_url, run_id),
            }
        )
        print(f"{day}: {run.state.name}, run {run.name}", file=sys.stderr, flush=True)
        if not run.state.is_completed():
            raise EnvironmentFailure(f"backfill stopped at {day}: run {run.name} ended {run.state.name}")
    return runs, artifacts_dir


def _report(runs: list[dict[str, Any]], artifacts_dir: str, as_json: bool) -> None:
    from featuresum.tasks.registry import Registry

    champion = Registry(artifacts_dir).alias()
    result = {"runs": runs, "champion_version": champion.version if champion else None}
    if as_json:
        print(json.dumps(result))
    else:
        ran = sum(run["state"] != "Skipped" for run in runs)
        print(f"{len(runs)} dates, {ran} run; champion: version {result['champion_version']}")

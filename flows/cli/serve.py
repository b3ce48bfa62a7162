"""`featuresum serve`: the pipeline as a deployment that retrains on a cron schedule, executed here."""

from typing import Annotated
from urllib.parse import urlsplit

import typer

from featuresum.flows.cli._app import app
from featuresum.flows.cli._flow_runs import prepare_folders
from featuresum.flows.cli._options import DRIFT_LEVELS, RETRAINING, SCORING, pipeline_options
from featuresum.flows.cli.run import check_memory
from featuresum.flows.options import TRAINING, PipelineOptions


@app.command()
@pipeline_options(
    *TRAINING, "score_samples", *RETRAINING, *SCORING, "min_improvement", *DRIFT_LEVELS, "refresh", "keep_days"
)
def serve(
    options: PipelineOptions,
    cron: Annotated[str, typer.Option(help="When to run, as a cron string (minute hour day month weekday).")] = (
        "0 3 * * *"
    ),
    timezone: Annotated[str, typer.Option(help="IANA timezone the cron string is read in.")] = "UTC",
    name: Annotated[str, typer.Option(help="Deployment name: featuresum-pipeline/<name>.")] = "scheduled-retraining",
    retrain_on_drift: Annotated[
        bool,
        typer.Option(
            help="Also run the deployment when a batch scored with its artifacts folder drifts to level alert "
            "(a trigger on the featuresum.drift.detected event), for the date of that batch."
        ),
    ] = False,
    catch_up: Annotated[
        int,
        typer.Option(
            "--catch-up",
            min=0,
            metavar="DAYS",
            help="At start, give a run to every fire time of the last DAYS days whose date has no completed run "
            "of the deployment (oldest first; a date whose run is in flight is left to it). 0: off.",
        ),
    ] = 3,
    notify: Annotated[
        list[str] | None,
        typer.Option(
            "--notify",
            metavar="URL",
            help="POST JSON to URL when a run of the deployment ends Failed or Crashed, a batch drifts to level "
            "alert, or the champion changes (a Prefect automation; repeatable). Without it, those are removed.",
        ),
    ] = None,
) -> None:
    """Serve the pipeline on a cron schedule and execute its runs (one at a time) until stopped."""
    from featuresum.flows.pipeline import pipeline_flow
    from featuresum.flows.serve import cron_schedule, serve_pipeline

    when = cron_schedule(cron, timezone)
    for url in notify or ():
        if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).netloc:
            raise typer.BadParameter(
                f"{url!r} is not an http(s) URL, e.g. https://hooks.example.com/x", param_hint="--notify"
            )
    check_memory(options)
    # The folders are absolute: runs execute in subprocesses and may be triggered from anywhere.
    prepare_folders(options.data_dir, options.artifacts_dir)
    serve_pipeline(
        name,
        when,
        options.parameters(pipeline_flow),
        retrain_on_drift=retrain_on_drift,
        catch_up_days=catch_up,
        notify_urls=tuple(notify or ()),
    )

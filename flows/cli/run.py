"""`featuresum run` and `featuresum train`: one pipeline or training run, for a date."""

from datetime import UTC, datetime

from featuresum.flows.cli._app import LOCAL_SERVER_HELP, app
from featuresum.flows.cli._flow_runs import execute, prepare_folders, task_runner
from featuresum.flows.cli._options import (
    DRIFT_LEVELS,
    RETRAINING,
    SCORING,
    DaskAddress,
    DaskWorkers,
    JsonOpt,
    RunDate,
    RunnerChoice,
    RunnerOpt,
    pipeline_options,
)
from featuresum.flows.options import TRAINING, PipelineOptions


def today() -> str:
    """Today's date (UTC), the date a run processes unless --date says otherwise."""
    return datetime.now(UTC).date().isoformat()


def check_memory(options: PipelineOptions) -> None:
    """Rows that no way of training can hold stop the command before any run starts (InputError)."""
    from featuresum.tasks.memory import memory_plan

    memory_plan(options.train_samples, options.holdout_samples, options.shuffle_rows, options.train_memory_mb)


@app.command(
    help=f"Run the whole pipeline: generate data, train and checkpoint, score a new batch.\n\n{LOCAL_SERVER_HELP}"
)
@pipeline_options(
    *TRAINING, "score_samples", *RETRAINING, *SCORING, "min_improvement", *DRIFT_LEVELS, "refresh", "keep_days"
)
def run(
    options: PipelineOptions,
    run_date: RunDate = None,
    runner: RunnerOpt = RunnerChoice.default,
    dask_address: DaskAddress = None,
    dask_workers: DaskWorkers = None,
    json_output: JsonOpt = False,
) -> None:
    from featuresum.flows.pipeline import pipeline_flow

    chosen_runner = task_runner(runner, dask_address, dask_workers)
    check_memory(options)
    prepare_folders(options.data_dir, options.artifacts_dir)
    parameters = {**options.parameters(pipeline_flow), "run_date": run_date or today()}
    execute(pipeline_flow, parameters, json_output, "cli-run", chosen_runner)


@app.command(help=f"Generate data, train and checkpoint the model, report held-out accuracy.\n\n{LOCAL_SERVER_HELP}")
@pipeline_options(*TRAINING, *RETRAINING, "min_improvement", "refresh")
def train(options: PipelineOptions, run_date: RunDate = None, json_output: JsonOpt = False) -> None:
    from featuresum.flows.pipeline import train_flow

    check_memory(options)
    prepare_folders(options.data_dir, options.artifacts_dir)
    parameters = {**options.parameters(train_flow), "run_date": run_date or today()}
    execute(train_flow, parameters, json_output, "cli-train")

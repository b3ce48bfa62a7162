"""`featuresum score`: score a Parquet file or a fresh batch with a checkpoint or a registered version."""

from typing import Annotated

import typer

from featuresum.flows.cli._app import LOCAL_SERVER_HELP, app
from featuresum.flows.cli._flow_runs import execute, prepare_folders, task_runner
from featuresum.flows.cli._options import (
    DRIFT_LEVELS,
    DaskAddress,
    DaskWorkers,
    JsonOpt,
    RunDate,
    RunnerChoice,
    RunnerOpt,
    pipeline_options,
)
from featuresum.flows.cli.run import today
from featuresum.flows.options import PipelineOptions
from featuresum.tasks.errors import EnvironmentFailure


def _checked_model(model: str, options: PipelineOptions) -> tuple[str, bool]:
    """The checkpoint to score with (a registered version resolved to its file), refused if it changed or was pruned.

    Also whether its bytes are a registered version's: those were checked when training wrote them.
    """
    from featuresum.tasks import storage
    from featuresum.tasks.errors import InputError
    from featuresum.tasks.registry import Registry, changed_weights, pruned_checkpoint

    registry = Registry(options.artifacts_dir)
    if (model == "champion" or model.isdigit()) and not storage.exists(model):
        version = registry.resolve(model)
        if version.pruned:
            raise InputError(pruned_checkpoint(model, version))
        model = str(version.checkpoint)
        if not storage.exists(model):
            return model, False
        # Read through any symlink: the bytes must be this version's, not those of whatever it points at.
        if storage.fingerprint(model) != version.fingerprint:
            raise EnvironmentFailure(changed_weights(model, version.version))
        return model, True
    if not storage.exists(model):
        if (kept := registry.at_checkpoint(storage.resolve(model))) and kept[-1].pruned:
            raise InputError(pruned_checkpoint(model, kept[-1]))
        return model, False
    fingerprint = storage.fingerprint(model)
    if changed := registry.changed_at(storage.resolve(model), fingerprint):
        raise EnvironmentFailure(changed_weights(model, changed.version))
    return model, any(v.fingerprint == fingerprint for v in registry.at_checkpoint(storage.resolve(model)))


@app.command(
    help=f"Score a Parquet file (--input) or a fresh batch (--samples) with a checkpoint.\n\n{LOCAL_SERVER_HELP}"
)
@pipeline_options(
    "seed", "drift", "data_dir", "artifacts_dir", "device", "shard_rows", *DRIFT_LEVELS, "refresh", preset=False
)
def score(
    options: PipelineOptions,
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
    run_date: RunDate = None,
    runner: RunnerOpt = RunnerChoice.default,
    dask_address: DaskAddress = None,
    dask_workers: DaskWorkers = None,
    json_output: JsonOpt = False,
) -> None:
    from featuresum.flows.pipeline import score_flow
    from featuresum.tasks import storage

    if (input is None) == (samples is None):
        raise typer.BadParameter("give exactly one of --input PARQUET or --samples N")
    # Buckets of the inputs first, so a wrong bucket or credentials is said before a file is read;
    # the folders this run writes to are prepared below, once the options are known to be sound.
    prepare_folders(*{storage.parent(given) for given in (model, input) if given and storage.is_remote(given)})
    model, registered = _checked_model(model, options)
    for given in filter(None, (input, model)):
        if output is not None and storage.resolve(output) == storage.resolve(given):
            raise typer.BadParameter(
                f"{output} is also an input of this run; choose another file", param_hint="--output"
            )
    # The checkpoint and the input's schema are checked before any run starts, so a bad file costs
    # one clear line; the input's values are checked while it is scored (one read of a big file).
    # A registered version's bytes need no check, so a cached score never imports torch.
    if not registered:
        from featuresum.tasks.checkpoint import load_checkpoint

        load_checkpoint(model)
    if input is not None:
        storage.open_features(storage.at(input))
    prepare_folders(options.data_dir, options.artifacts_dir, *([storage.parent(output)] if output else []))
    given = {"model": model, "input": input, "samples": samples, "output": output, "run_date": run_date or today()}
    parameters = {**options.parameters(score_flow), **given}
    execute(score_flow, parameters, json_output, "cli-score", task_runner(runner, dask_address, dask_workers))

"""`featuresum gc`: retention, by hand: delete the data, predictions and checkpoints no recent run can need."""

import json
from typing import Annotated

import typer

from featuresum.flows.cli._app import app
from featuresum.flows.cli._options import pipeline_options
from featuresum.flows.cli.models import JsonOpt
from featuresum.flows.options import PipelineOptions

GC_HELP = (
    "Delete what no run of the last --keep-days run dates (counted back from the newest date in the registry"
    " or the monitoring history, not from today) can need: older data partitions (score batches included),"
    " predictions and their shard folders, and checkpoints, each with its manifest.\n\n"
    "Kept whatever their age: the champion's checkpoint, every version the champion pointed at in those days"
    " and the one `featuresum models rollback` returns to, the versions trained for those dates, the newest"
    " date's training window (its rerun stays cached), the registry, the monitoring history, and any file"
    " whose name is not one featuresum writes. A version whose checkpoint goes stays in the registry, marked"
    " pruned; a later run that needs a deleted partition generates it again."
)


def _size(freed: int) -> str:
    return f"{freed} bytes ({freed / 2**20:.1f} MiB)"


def _check_folder(location: str) -> None:
    """A missing folder (or bucket) is the user's to fix, before anything is read."""
    from featuresum.tasks import s3, storage
    from featuresum.tasks.errors import InputError

    if storage.is_remote(location):
        s3.check_bucket(location)
    elif storage.Path(location).exists() and not storage.Path(location).is_dir():
        raise InputError(f"{location}: not a folder")
    elif not storage.Path(location).is_dir():
        raise InputError(f"{location}: no such folder")


@app.command(help=GC_HELP)
@pipeline_options("keep_days", "data_dir", "artifacts_dir", preset=False)
def gc(
    options: PipelineOptions,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List what would be deleted and the bytes it would free; delete nothing.")
    ] = False,
    json_output: JsonOpt = False,
) -> None:
    from featuresum.tasks import retention

    if options.keep_days is None:
        raise typer.BadParameter("give the days to keep, e.g. --keep-days 30", param_hint="--keep-days")
    _check_folder(options.data_dir)
    _check_folder(options.artifacts_dir)
    report = retention.retain(options.data_dir, options.artifacts_dir, options.keep_days, dry_run=dry_run)
    if json_output:
        print(json.dumps(report))
        return
    verb = "would delete" if dry_run else "deleted"
    for location in report["deleted"]:
        print(f"{verb} {location}")
    kept = report["kept"]
    if kept.get("newest_date") is None:
        print(f"nothing to measure {options.keep_days} days from: no run date in {options.artifacts_dir} yet")
        return
    print(
        f"{verb} {len(report['deleted'])} files, {_size(report['freed_bytes'])}; kept the run dates from"
        f" {kept['keep_from']} to {kept['newest_date']} (data from {kept['data_from']}), champion version"
        f" {kept['champion']}, rollback targets {kept['rollback_targets']}"
    )
    if report["pruned_versions"]:
        print(f"{'would prune' if dry_run else 'pruned'} model versions {report['pruned_versions']}")

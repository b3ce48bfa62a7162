"""The command line's options: those of a pipeline run generated from PipelineOptions, and the CLI's own."""

import inspect
from collections.abc import Callable
from dataclasses import fields
from datetime import date
from enum import StrEnum
from typing import Annotated, Any

import typer

from featuresum.flows.options import PipelineOptions, with_options


def iso_date(value: str | None) -> str | None:
    """Typer callback of a date option: YYYY-MM-DD, or a usage error."""
    if value is None:
        return None
    try:
        return date.fromisoformat(value).isoformat()
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a date like 2026-11-28") from None


class Preset(StrEnum):
    default = "default"
    full = "full"


class RunnerChoice(StrEnum):
    default = "default"
    dask = "dask"


JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object with paths, metrics and task states.")]
PresetOpt = Annotated[Preset, typer.Option(help="Sizes and settings: default (about a minute) or full.")]
RunDate = Annotated[
    str | None,
    typer.Option(
        "--date",
        callback=iso_date,
        help="The date the run processes (YYYY-MM-DD): its data and its model version. [default: today, UTC]",
    ),
]
RunnerOpt = Annotated[
    RunnerChoice,
    typer.Option(help="Where scoring shards run: threads in this process (default), or a Dask cluster."),
]
DaskAddress = Annotated[
    str | None,
    typer.Option(help="Scheduler of an existing Dask cluster (tcp://host:8786); default: start a LocalCluster."),
]
DaskWorkers = Annotated[
    int | None, typer.Option(min=1, help="Worker processes of the LocalCluster (default: one per core).")
]
# The pipeline options that do not shape training (the scoring, drift and gate options are added per command).
RETRAINING = ("window_days", "drift", "init", "data_dir", "artifacts_dir", "device")
SCORING = ("shard_rows",)
DRIFT_LEVELS = ("drift_warn", "drift_alert")


def _parameter(name: str, with_preset: bool) -> inspect.Parameter:
    """A command-line option for the pipeline option `name`, from its field: type, default, limits and help."""
    option = next(option for option in fields(PipelineOptions) if option.name == name)
    meta = option.metadata
    from_preset = with_preset and meta["preset"]
    kind = option.type | None if from_preset else option.type
    help_text = f"{meta['help']} (preset)" if from_preset else meta["help"]
    annotation = Annotated[kind, typer.Option(help=help_text, **meta["limits"])]
    default = None if from_preset else option.default
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def pipeline_options(*names: str, preset: bool = True) -> Callable[[Callable], Callable]:
    """Give a command the pipeline options `names` (and --preset): it receives them as one `options` object.

    Each option is declared once, in PipelineOptions; with a preset, an option the user leaves out
    takes the preset's value, and an explicit one overrides it.
    """

    shared = [_parameter(name, preset) for name in names]
    if preset:
        keyword = inspect.Parameter.KEYWORD_ONLY
        shared.insert(0, inspect.Parameter("preset", keyword, default=Preset.default, annotation=PresetOpt))

    def build(chosen: dict[str, Any]) -> PipelineOptions:
        preset_name = chosen.pop("preset").value if preset else "default"
        return PipelineOptions.from_preset(preset_name, **chosen)

    return lambda command: with_options(command, shared, build)

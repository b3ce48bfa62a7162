"""`featuresum models`: the registry of trained model versions and the alias `champion` that scoring uses.

The registry is a SQLite file in the artifacts folder; these commands read and change it directly,
without a Prefect server (a move of the champion is sent to Prefect as an event when a server is up).
`import` and `export` move models in and out in the original script's format,
a plain state_dict (`torch.save(model.state_dict(), "model.pth")`).
"""

import json
import sys
from datetime import date
from pathlib import Path
from typing import Annotated, Any

import typer

from featuresum.flows.cli._options import iso_date
from featuresum.flows.presets import DEFAULT

models_app = typer.Typer(
    help="Model versions and the champion: every trained model is a version; `champion` is the one scoring uses.",
    no_args_is_help=True,
)
ArtifactsDir = Annotated[
    str, typer.Option(help="Folder (or s3://bucket/prefix) of the checkpoints and the registry (registry.sqlite).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one line of JSON instead of text.")]
Reference = Annotated[str, typer.Argument(help="A version number, or `champion`.")]


def _registry(artifacts_dir: str):
    from featuresum.tasks.registry import Registry

    return Registry(artifacts_dir)


def _accuracy(metrics: dict) -> str:
    value = metrics.get("val_accuracy")
    return "-" if value is None else f"{value:.4f}"


@models_app.command("list")
def list_versions(artifacts_dir: ArtifactsDir = "artifacts", json_output: JsonOpt = False) -> None:
    """List every registered version, oldest first, with its held-out accuracy and aliases; pruned ones say so."""
    versions = _registry(artifacts_dir).versions()
    if json_output:
        print(json.dumps([{**v.as_dict(), "val_accuracy": v.metrics.get("val_accuracy")} for v in versions]))
        return
    if not versions:
        print(f"no model versions in {artifacts_dir} yet: `featuresum run` or `featuresum train` registers one")
        return
    print(f"{'version':>7}  {'accuracy':>8}  {'created':<25}  {'aliases':<10}  checkpoint")
    for version in versions:
        aliases = ",".join(version.aliases) or "-"
        pruned = f" (pruned by gc on {version.pruned[:10]})" if version.pruned else ""
        print(
            f"{version.version:>7}  {_accuracy(version.metrics):>8}  {version.created[:19] + 'Z':<25}  {aliases:<10}  "
            f"{version.checkpoint}{pruned}"
        )


@models_app.command()
def show(reference: Reference, artifacts_dir: ArtifactsDir = "artifacts", json_output: JsonOpt = False) -> None:
    """Everything recorded of one version (as indented JSON, or one line with --json), and the champion's history."""
    registry = _registry(artifacts_dir)
    version = registry.resolve(reference)
    details = version.as_dict()
    if "champion" in version.aliases:
        details["champion_history"] = [change.as_dict() for change in registry.history()]
    print(json.dumps(details) if json_output else json.dumps(details, indent=2))


def _report_change(registry: Any, artifacts_dir: str, change: Any, json_output: bool, rolled_back: bool) -> None:
    """Tell Prefect of a move by hand, then print it as one line (or its JSON, with where the event went).

    On stderr: where the event went, or that none was sent (no server up). Nothing moved: nothing sent.
    """
    from featuresum.flows.champion_events import PROMOTED_EVENT, ROLLED_BACK_EVENT, announce_by_hand

    event = ROLLED_BACK_EVENT if rolled_back else PROMOTED_EVENT
    url = change and announce_by_hand(registry, artifacts_dir, change, rolled_back=rolled_back)
    if json_output and change is None:
        print(json.dumps({"moved": False, "version": registry.alias().version, "event": None, "event_sent_to": None}))
    elif json_output:
        print(json.dumps({"moved": True, **change.as_dict(), "event": event, "event_sent_to": url}))
    elif change is None:
        print(f"version {registry.alias().version} is already the champion")
    else:
        print(f"champion: version {change.previous} -> {change.version} ({change.reason})")
    if change is not None:
        told = f"event {event} sent to {url}" if url else f"no Prefect server is up: no {event} event sent"
        print(told, file=sys.stderr)


@models_app.command()
def promote(
    version: Annotated[int, typer.Argument(help="The version to make the champion.")],
    reason: Annotated[str, typer.Option(help="Why, kept in the alias history.")] = "promoted by hand",
    artifacts_dir: ArtifactsDir = "artifacts",
    json_output: JsonOpt = False,
) -> None:
    """Make a version the champion, whatever its accuracy; the change is kept in the history."""
    registry = _registry(artifacts_dir)
    _report_change(registry, artifacts_dir, registry.set_alias(version, reason), json_output, rolled_back=False)


@models_app.command()
def rollback(
    reason: Annotated[str, typer.Option(help="Why, kept in the alias history.")] = "rolled back by hand",
    artifacts_dir: ArtifactsDir = "artifacts",
    json_output: JsonOpt = False,
) -> None:
    """Walk the champion one step back along its history: each rollback goes one version further back."""
    registry = _registry(artifacts_dir)
    _report_change(registry, artifacts_dir, registry.rollback(reason), json_output, rolled_back=True)


@models_app.command("import")
def import_model(
    model_pth: Annotated[
        Path,
        typer.Argument(
            metavar="MODEL_PTH", help="A model saved by the original script: torch.save(model.state_dict(), path)."
        ),
    ],
    artifacts_dir: ArtifactsDir = "artifacts",
    holdout_samples: Annotated[
        int, typer.Option(min=1, help="Held-out rows to measure it on, drawn from --seed as a run draws its own.")
    ] = DEFAULT.holdout_samples,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the held-out rows.")] = 0,
    run_date: Annotated[
        str | None,
        typer.Option(
            "--date",
            callback=iso_date,
            help="Measure it on the held-out rows of this date (YYYY-MM-DD), those a run of that date is judged on."
            " [default: the seed's undated held-out rows]",
        ),
    ] = None,
    drift: Annotated[
        float, typer.Option(help="The --drift of the runs whose held-out rows to measure it on (needs --date).")
    ] = 0.0,
    json_output: Annotated[bool, typer.Option("--json", help="Print the version as one JSON object.")] = False,
) -> None:
    """Register a model saved by the original script as a new version; it does not become the champion."""
    from featuresum.tasks.portable import import_state_dict

    if drift and run_date is None:
        raise typer.BadParameter("--drift shifts dated rows only; give --date too", param_hint="--drift")
    day = date.fromisoformat(run_date) if run_date else None
    imported = import_state_dict(model_pth, artifacts_dir, holdout_samples, seed, day, drift)
    version = imported.version
    if json_output:
        details = {**version.as_dict(), "val_accuracy": version.metrics.get("val_accuracy")}
        print(json.dumps({**details, "already_registered": imported.already_registered}))
        return
    done = "is already registered as" if imported.already_registered else "imported as"
    rows = version.metrics.get("holdout_rows")
    print(f"{model_pth} {done} version {version.version}: held-out accuracy {_accuracy(version.metrics)} ({rows} rows)")
    print(f"  checkpoint: {version.checkpoint}")
    if "champion" not in version.aliases:
        print(f"  not the champion; to score with it: featuresum models promote {version.version}")


@models_app.command()
def export(
    reference: Reference,
    output: Annotated[str, typer.Option(help="The file to write, e.g. model.pth (replaced atomically).")],
    artifacts_dir: ArtifactsDir = "artifacts",
) -> None:
    """Write a version's weights as a plain state_dict, which the original script's SimpleNN loads."""
    from featuresum.tasks.errors import InputError
    from featuresum.tasks.portable import export_state_dict
    from featuresum.tasks.registry import pruned_checkpoint, refuse_managed_output

    refuse_managed_output(output, artifacts_dir, checkpoints=False)  # a state_dict may be called model.pt
    version = _registry(artifacts_dir).resolve(reference)
    if version.pruned:
        raise InputError(pruned_checkpoint(reference, version))
    export_state_dict(version.checkpoint, output, version.fingerprint)
    print(f"version {version.version} written to {output}: SimpleNN().load_state_dict(torch.load(path)) loads it")

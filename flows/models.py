"""`featuresum models`: the registry of trained model versions and the alias `champion` that scoring uses.

The registry is a SQLite file in the artifacts folder; these commands read and change it directly,
without a Prefect server.
"""

import json
from pathlib import Path
from typing import Annotated

import typer

models_app = typer.Typer(
    help="Model versions and the champion: every trained model is a version; `champion` is the one scoring uses.",
    no_args_is_help=True,
)
ArtifactsDir = Annotated[Path, typer.Option(help="Folder of the checkpoints and the registry (registry.sqlite).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
Reference = Annotated[str, typer.Argument(help="A version number, or `champion`.")]


def _registry(artifacts_dir: Path):
    from featuresum.tasks.registry import Registry

    return Registry(artifacts_dir)


def _accuracy(metrics: dict) -> str:
    value = metrics.get("val_accuracy")
    return "-" if value is None else f"{value:.4f}"


@models_app.command("list")
def list_versions(artifacts_dir: ArtifactsDir = Path("artifacts"), json_output: JsonOpt = False) -> None:
    """List every registered version, oldest first, with its held-out accuracy and aliases."""
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
        print(
            f"{version.version:>7}  {_accuracy(version.metrics):>8}  {version.created:<25}  {aliases:<10}  "
            f"{version.checkpoint}"
        )


@models_app.command()
def show(reference: Reference, artifacts_dir: ArtifactsDir = Path("artifacts")) -> None:
    """Everything recorded of one version (as JSON), and the champion's alias history."""
    registry = _registry(artifacts_dir)
    version = registry.resolve(reference)
    details = version.as_dict()
    if "champion" in version.aliases:
        details["champion_history"] = [change.as_dict() for change in registry.history()]
    print(json.dumps(details, indent=2))


@models_app.command()
def promote(
    version: Annotated[int, typer.Argument(help="The version to make the champion.")],
    reason: Annotated[str, typer.Option(help="Why, kept in the alias history.")] = "promoted by hand",
    artifacts_dir: ArtifactsDir = Path("artifacts"),
) -> None:
    """Make a version the champion, whatever its accuracy; the change is kept in the history."""
    change = _registry(artifacts_dir).set_alias(version, reason)
    if change is None:
        print(f"version {version} is already the champion")
    else:
        print(f"champion: version {change.previous} -> {change.version} ({change.reason})")


@models_app.command()
def rollback(
    reason: Annotated[str, typer.Option(help="Why, kept in the alias history.")] = "rolled back by hand",
    artifacts_dir: ArtifactsDir = Path("artifacts"),
) -> None:
    """Point the champion back at the version it pointed at before its latest change."""
    change = _registry(artifacts_dir).rollback(reason)
    print(f"champion: version {change.previous} -> {change.version} ({change.reason})")

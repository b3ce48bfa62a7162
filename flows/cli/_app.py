"""The `featuresum` Typer app that every command module adds its commands to."""

from importlib.metadata import version
from typing import Annotated

import typer

LOCAL_SERVER_HELP = (
    "Runs are recorded by the Prefect API in PREFECT_API_URL or, when none is set, by a local "
    "Prefect server (127.0.0.1, database under PREFECT_HOME) that the first command starts and "
    "later commands reuse; its UI shows every run. It keeps running after the command ends: "
    "`featuresum server status` shows it, `featuresum server stop` stops it."
)
app = typer.Typer(
    help=f"Synthetic feature-sum classifier: generate data, train, and score, as Prefect flows.\n\n{LOCAL_SERVER_HELP}",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _show_version(value: bool) -> None:
    if value:
        print(f"featuresum {version('featuresum')} (prefect {version('prefect')}, torch {version('torch')})")
        raise typer.Exit()


@app.callback()
def _options(
    show_version: Annotated[
        bool, typer.Option("--version", callback=_show_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    pass

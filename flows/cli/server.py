"""`featuresum server start|status|stop`: the local Prefect server that records runs when no API is configured."""

import json
import sys
from datetime import timedelta
from typing import Annotated

import typer

from featuresum.flows import local_server

server_app = typer.Typer(
    help="Start, inspect or stop the local Prefect server (127.0.0.1, database under PREFECT_HOME) that "
    "featuresum commands use when PREFECT_API_URL is not set.",
    no_args_is_help=True,
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text.")]


def _print_status(status: dict, as_json: bool, **extra: object) -> None:
    """The server's status as one JSON object, or as aligned `key: value` lines."""
    if as_json:
        print(json.dumps({"running": True, **status, **extra}))
        return
    lines = {
        "url": status["url"],
        "pid": status["pid"],
        "healthy": "yes" if status["healthy"] else "no (starting, busy or suspended)",
        "database": status["database"],
        "prefect": status["prefect_version"],
        "uptime": timedelta(seconds=int(status["uptime_seconds"])),
        "log": status["log"],
    }
    for key, value in lines.items():
        print(f"{key:>8}: {value}")


@server_app.command()
def start(json_output: JsonOpt = False) -> None:
    """Start the local server in the background, or report the one already running; wait until it answers."""
    home = local_server.prefect_home()
    before = local_server.server_status(home)
    local_server.ensure_local_server(home)
    status = local_server.server_status(home)
    if status is None:
        log = home / local_server.SERVER_LOG
        raise local_server.ServerError(f"the local Prefect server stopped right after it started; see {log}")
    started = before is None or before["pid"] != status["pid"]
    if url := local_server.configured_api_url():
        print(f"note: PREFECT_API_URL is set ({url}); featuresum commands record runs there, not here", file=sys.stderr)
    if not json_output:
        print("Started the local Prefect server." if started else "The local Prefect server is already running.")
    _print_status(status, json_output, started=started)


@server_app.command()
def status(json_output: JsonOpt = False) -> None:
    """Show the local server's URL, pid, database, Prefect version, uptime and log.

    Exits with code 1 when no local server is running (after saying so, or printing
    {"running": false, ...} with --json), so scripts can test for a running server.
    """
    home = local_server.prefect_home()
    status = local_server.server_status(home)
    if status is not None:
        _print_status(status, json_output)
        return
    if json_output:
        print(json.dumps({"running": False, "home": str(home)}))
    else:
        print(f"no local server is running (PREFECT_HOME={home})")
    raise typer.Exit(code=1)


@server_app.command()
def stop() -> None:
    """Stop the local server and every process it started; return once they are all gone."""
    home = local_server.prefect_home()
    status = local_server.server_status(home)
    if not local_server.stop_local_server(home):
        print(f"no local server was running (PREFECT_HOME={home})")
    elif status is not None:
        print(f"Stopped the local Prefect server at {status['url']} (pid {status['pid']}).")
    else:
        print("Stopped the local Prefect server.")

"""The `featuresum` command line: one-off pipeline runs, training, scoring, backfills and scheduled serving.

One module per command group (run.py holds run and train; score, backfill, serve, monitor, gc, models
and server each have their own); the shared options are generated from PipelineOptions (_options.py),
and _flow_runs.py runs a flow from the command line. This module assembles the app.

Exit codes: 0 success; 2 for what the user can fix (an option, a file, a folder); 1 for the
environment (the Prefect server down or failing, a disk full); 130 after Ctrl-C; 143 after
SIGTERM. Every error ends with one `featuresum: error: ...` line on stderr, no traceback.
"""

import atexit
import errno
import logging
import os
import signal
import sqlite3
import sys
from collections.abc import Callable
from contextlib import suppress
from functools import partial

import typer

from featuresum.flows import local_server
from featuresum.flows.cli._app import app

# isort: off
# Each module adds its commands to the app; `featuresum --help` lists them in this order.
from featuresum.flows.cli import run, score, backfill, serve, monitor, gc  # noqa: F401, E402

# isort: on
from featuresum.flows.cli.models import models_app
from featuresum.flows.cli.server import server_app
from featuresum.tasks.errors import EnvironmentFailure, InputError, Terminated

# errno values of file problems the user fixes (a path, a permission, a read-only mount); others are the machine's.
USER_ERRNOS = frozenset(
    {
        errno.ENOENT,
        errno.EACCES,
        errno.EPERM,
        errno.ENOTDIR,
        errno.EISDIR,
        errno.EROFS,
        errno.EEXIST,
        errno.ENAMETOOLONG,
    }
)

app.add_typer(server_app, name="server")
app.add_typer(models_app, name="models")


def _exit_code(error: BaseException) -> tuple[int, str | None]:
    """Exit code and one-line message for an error that ends a command; (0, None) for anything else."""
    from prefect.exceptions import TerminationSignal

    if isinstance(error, typer.Abort | KeyboardInterrupt):
        return 130, "interrupted"
    if isinstance(error, TerminationSignal | Terminated):
        return 128 + error.signal, "terminated"
    if isinstance(error, typer.TyperException):
        return 2, error.format_message()
    if isinstance(error, InputError):
        return 2, str(error)
    if isinstance(error, EnvironmentFailure | local_server.ServerError):
        return 1, str(error)
    if isinstance(error, sqlite3.Error):
        return 1, f"the model registry could not be used ({error})"
    if type(error).__module__.startswith("botocore"):
        return 1, f"the object store failed: {str(error).splitlines()[0] if str(error) else type(error).__name__}"
    if isinstance(error, OSError):
        where = f"{error.filename}: " if error.filename else ""
        return (2 if error.errno in USER_ERRNOS else 1), f"{where}{error.strerror or error}"
    return 0, None


def _terminate(signum: int, frame: object) -> None:
    # Prefect swaps in its own handler while a flow runs (the run then ends Crashed) and hands the
    # signal back to this one afterwards, so the command still ends with one line and 143.
    raise Terminated(signum)


def entry_point() -> None:
    """The `featuresum` executable: `main`, then an exit that skips the interpreter's teardown.

    Freeing every object of Prefect, torch and pyarrow one by one at exit takes 0.5-1.3 s here,
    as long as a cached run's flow. The handler is registered before Prefect is imported, so it runs
    after Prefect's own exit handlers, which send the last logs and events to the API.
    """
    status: list[object] = [1]  # an error that escapes main exits 1, as Python would
    last_words: list[str] = []  # the error line, said after Prefect's exit handlers have logged theirs

    def exit_now() -> None:
        try:
            logging.shutdown()
        finally:
            for line in last_words:
                print(line, file=sys.stderr)
            for stream in (sys.stdout, sys.stderr):
                with suppress(OSError, ValueError):  # a closed pipe or stream: nothing left to flush
                    stream.flush()
            code = status[0]
            os._exit(0 if code is None else code if isinstance(code, int) else 1)

    atexit.register(exit_now)
    try:
        main(last_words.append)
    except SystemExit as done:
        status[0] = done.code
        raise


def main(say: Callable[[str], None] | None = None) -> None:
    """Entry point: errors end with one line on stderr and the exit code of their kind, not a traceback.

    `say` takes that line instead of printing it at once (the executable prints it last of all).
    """
    say = say or partial(print, file=sys.stderr)
    local_server.quiet_defaults()
    signal.signal(signal.SIGTERM, _terminate)
    command = typer.main.get_command(app)
    try:
        code = command.main(prog_name="featuresum", standalone_mode=False)
    except BaseException as error:  # mapped to an exit code below, or re-raised
        code, message = _exit_code(error)
        if not code:
            raise
        say(f"featuresum: error: {message}")
        sys.exit(code)
    if code == 130:  # Typer turns Ctrl-C into this exit code
        say("featuresum: error: interrupted")
    sys.exit(code if isinstance(code, int) else 0)

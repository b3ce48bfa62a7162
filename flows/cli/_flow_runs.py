"""Running a flow from the command line: the API checked and watched, the run, its task runs waited for.

A command fails in one line, before any run, when the Prefect API is down, failing or refuses our
credentials; while a run goes on, a watchdog ends the process in one line if the API goes away.
"""

import errno
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import typer

from featuresum.flows import local_server
from featuresum.flows.cli._options import RunnerChoice
from featuresum.flows.cli._report import report
from featuresum.tasks.errors import EnvironmentFailure, InputError

# How long the Prefect API may refuse connections, or leave them unanswered, before a run gives up on it.
API_REFUSED_SECONDS = 5.0
API_SILENT_SECONDS = 60.0


def prepare_folders(*folders: str | Path) -> None:
    """Create the folders a run writes to, so a path that cannot be one fails in a line, before any run.

    On object storage there are no folders to create: the bucket must exist and take our credentials.
    """
    from featuresum.tasks import s3

    for folder in folders:
        if s3.is_uri(folder):
            s3.check_bucket(folder)
            continue
        try:
            Path(folder).mkdir(parents=True, exist_ok=True)
        except OSError as error:
            if error.errno == errno.ENOSPC:
                raise EnvironmentFailure(f"disk full: cannot create {folder}") from None
            reason = "a file is in the way" if isinstance(error, FileExistsError | NotADirectoryError) else None
            raise InputError(f"{folder}: cannot create this folder ({reason or error.strerror})") from None


def task_runner(runner: RunnerChoice, address: str | None, workers: int | None):
    """Prefect's default task runner, or a DaskTaskRunner on a given or a local cluster."""
    if runner is RunnerChoice.default:
        return None
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise typer.BadParameter("--runner dask needs prefect-dask: pip install 'featuresum[dask]'") from None
    if address:
        return DaskTaskRunner(address=address)
    local = {"n_workers": workers, "threads_per_worker": 1, "host": "127.0.0.1", "dashboard_address": None}
    return DaskTaskRunner(cluster_kwargs=local)


def _watch_api(api_url: str) -> None:
    """End this process with one line when the Prefect API goes away mid-run, instead of retrying for minutes.

    Whatever finished stays on disk (training keeps its last finished epoch), so the same command
    run again resumes; with no PREFECT_API_URL it starts a new local server first.
    """

    def watch() -> None:
        last_ok = time.monotonic()
        while True:
            time.sleep(1.0)
            answer = local_server.api_health(api_url)
            if answer == "ok":
                last_ok = time.monotonic()
                continue
            waited = time.monotonic() - last_ok
            if waited > (API_REFUSED_SECONDS if answer == "refused" else API_SILENT_SECONDS):
                print(
                    f"featuresum: error: the Prefect API at {api_url} stopped answering mid-run; "
                    "run the same command again to resume from the last finished step",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(1)

    threading.Thread(target=watch, name="featuresum-api-watch", daemon=True).start()


class _ConsoleErrors(logging.Formatter):
    """Prefect's console lines without the tracebacks of errors featuresum explains in one line.

    The tracebacks still reach the API, so the UI shows them.
    """

    def __init__(self, inner: logging.Formatter):
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info and isinstance(record.exc_info[1], InputError | EnvironmentFailure | OSError):
            record = logging.makeLogRecord({**record.__dict__, "exc_info": None, "exc_text": None})
        return self.inner.format(record)


def _quiet_console_tracebacks() -> None:
    for logger in [logging.getLogger(), *map(logging.getLogger, logging.root.manager.loggerDict)]:
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler.formatter, _ConsoleErrors):
                handler.setFormatter(_ConsoleErrors(handler.formatter or logging.Formatter()))


def _api_failure(error: Exception, api_url: str) -> Exception:
    """The one-line error for a failed call to the Prefect API (401 is the user's to fix)."""
    import httpx
    from prefect.exceptions import PrefectHTTPStatusError

    if isinstance(error, PrefectHTTPStatusError | httpx.HTTPStatusError):
        status = error.response.status_code
        if status == 401:
            return InputError(f"the Prefect API at {api_url} refused us (401); set PREFECT_API_AUTH_STRING")
        return EnvironmentFailure(f"the Prefect API at {api_url} answered HTTP {status} {error.response.reason_phrase}")
    return EnvironmentFailure(f"cannot reach the Prefect API at {api_url} ({type(error).__name__})")


def _check_api(api_url: str) -> None:
    """Fail in one line, before any run, when the API is down, failing, or refuses our credentials."""
    import httpx
    from prefect.client.orchestration import get_client

    if local_server.api_health(api_url) != "ok":
        raise EnvironmentFailure(f"the Prefect API at {api_url} does not answer; start it or unset PREFECT_API_URL")
    try:
        with get_client(sync_client=True) as client:
            client.hello()
    except httpx.HTTPError as error:
        raise _api_failure(error, api_url) from None


@contextmanager
def prefect_session() -> Iterator[str]:
    """The Prefect API to record runs in, checked and watched; its URL."""
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.exceptions import PrefectHTTPStatusError

    from featuresum.flows.automations import watch_dead_runs

    with local_server.prefect_api() as api_url:
        _check_api(api_url)
        _watch_api(api_url)
        _quiet_console_tracebacks()
        try:
            with get_client(sync_client=True) as client:
                watch_dead_runs(client)
            yield api_url
        except (httpx.HTTPError, PrefectHTTPStatusError) as error:
            raise _api_failure(error, api_url) from None


def ui_url(api_url: str, flow_run_id: str) -> str:
    """The flow run's page in the Prefect UI."""
    return f"{api_url.removesuffix('/api')}/runs/flow-run/{flow_run_id}"


def _wait_for_task_runs(record: dict[str, Any]) -> dict[str, str]:
    """Wait until a flow run's task runs are recorded in a final state; a timeout is the environment's failure."""
    try:
        return local_server.wait_for_task_runs(record["flow_run_id"], list(record["task_runs"]))
    except TimeoutError as error:
        raise EnvironmentFailure(f"the Prefect API did not record every task run: {error}") from None


def run_flow(flow, parameters: dict[str, Any], api_url: str, *tag_names: str) -> dict[str, Any]:
    """Run a flow, wait until its task runs are recorded (also when it fails), and return its summary."""
    import httpx
    from prefect import tags
    from prefect.exceptions import PrefectHTTPStatusError

    from featuresum.flows.steps import TASK_RUNS

    try:
        # The date tag is given at creation, so the flow need not add it with another API call.
        with tags("featuresum", *tag_names, f"seed-{parameters['seed']}", f"date-{parameters['run_date']}"):
            try:
                state = flow(**parameters, return_state=True)
            except BaseException as error:
                # Also after Ctrl-C or SIGTERM the UI should show every task run in its final state;
                # but a wait that times out must not replace the reason the run ended.
                if record := getattr(error, TASK_RUNS, None):
                    with suppress(EnvironmentFailure):
                        _wait_for_task_runs(record)
                raise
        outcome = state.result(raise_on_failure=False)
        # A failed run returns its state: its task runs are recorded before its error is raised.
        record = outcome if isinstance(outcome, dict) else getattr(outcome, TASK_RUNS, None)
        task_states = _wait_for_task_runs(record) if record else {}
        summary = state.result()
    except (httpx.HTTPError, PrefectHTTPStatusError) as error:
        raise _api_failure(error, api_url) from None
    del summary["task_runs"]
    summary["task_states"] = task_states
    summary["ui"] = ui_url(api_url, summary["flow_run_id"])
    return summary


def execute(flow, parameters: dict[str, Any], as_json: bool, tag: str, runner=None) -> None:
    """Run one flow of the pipeline against the Prefect API and report it."""
    if runner is not None:
        flow = flow.with_options(task_runner=runner)
    with prefect_session() as api_url:
        summary = run_flow(flow, parameters, api_url, tag)
    report(summary, as_json)

"""The Prefect UI in headless Chromium: log in, then see a finished pipeline run and its artifacts.

Chromium is driven over the DevTools protocol (`--remote-debugging-port`) with the `websockets`
package, so no driver or browser download is needed: only Debian's `chromium`.
"""

import base64
import itertools
import json
import os
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
from conftest import SMALL
from prefect_servers import prefect_server, require_service, run_command, stop_process_group, wait_until

pytestmark = [pytest.mark.server, pytest.mark.browser]

ARTIFACT_KEYS = (
    "featuresum-training-history",
    "featuresum-training-report",
    "featuresum-predictions",
    "featuresum-monitoring",
    "featuresum-monitoring-chart",
)
# The UI is a JavaScript app: on two busy cores its first render took several seconds.
PAGE_TIMEOUT = 90.0


def chromium_path() -> str:
    """FEATURESUM_TEST_CHROMIUM, or Debian's chromium when installed; else skip (fail in CI)."""
    configured = os.environ.get("FEATURESUM_TEST_CHROMIUM")
    if path := shutil.which(configured or "chromium"):
        return path
    if configured:
        pytest.fail(f"FEATURESUM_TEST_CHROMIUM={configured} is not an executable")
    return require_service("FEATURESUM_TEST_CHROMIUM", "Chromium")


class Browser:
    """One headless Chromium page, driven through the DevTools protocol."""

    def __init__(self, executable: str, profile: Path):
        from websockets.sync.client import connect

        self.process = subprocess.Popen(
            [
                executable,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                f"--user-data-dir={profile}",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                "--window-size=1400,1000",
                "about:blank",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        # With port 0 Chromium picks a free port and writes it to this file.
        port_file = profile / "DevToolsActivePort"
        wait_until(lambda: port_file.exists() or self.process.poll() is not None, 60, "Chromium's DevTools port")
        assert self.process.poll() is None, f"Chromium exited with {self.process.returncode}"
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:
            page = next(t for t in json.load(response) if t["type"] == "page")
        self.socket = connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=30)
        self.ids = itertools.count(1)
        self.call("Page.enable")

    def call(self, method: str, **params) -> dict:
        """Send one DevTools command and return its result (events in between are skipped)."""
        message_id = next(self.ids)
        self.socket.send(json.dumps({"id": message_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv(timeout=60))
            if message.get("id") == message_id:
                assert "error" not in message, f"{method}: {message['error']}"
                return message["result"]

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def text(self) -> str:
        """The page's visible text."""
        return self.evaluate("document.body ? document.body.innerText : ''") or ""

    def wait_for_text(self, *needles: str, timeout: float = PAGE_TIMEOUT) -> str:
        """Wait until the page shows every one of `needles`; returns the page text."""

        def shown() -> str | None:
            text = self.text()
            return text if all(needle in text for needle in needles) else None

        return wait_until(shown, timeout, f"the page to show {needles}")

    def click(self, selector: str, text: str | None = None) -> None:
        """Click the centre of the first element matching `selector` (and showing `text`) with the mouse."""
        box = self.evaluate(
            f"(() => {{ const e = [...document.querySelectorAll({json.dumps(selector)})]"
            f".find(e => {json.dumps(text)} === null || e.textContent.trim() === {json.dumps(text)});"
            " const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)

    def type_into(self, selector: str, text: str) -> None:
        """Focus an input and type `text` into it."""
        self.evaluate(f"document.querySelector({json.dumps(selector)}).focus()")
        self.call("Input.insertText", text=text)

    def location(self) -> str:
        return self.evaluate("location.href")

    def screenshot(self, path: Path) -> Path:
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))
        return path

    def close(self) -> None:
        self.socket.close()
        stop_process_group(self.process)


AUTH = "featuresum:ui-test-password"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A server with basic auth on, as README recommends for a UI that others can reach."""
    with prefect_server(tmp_path_factory.mktemp("prefect-ui"), auth=AUTH) as server:
        yield server


@pytest.fixture(scope="module")
def finished_run(server, tmp_path_factory):
    """The JSON summary of a small pipeline run recorded by the server."""
    work = tmp_path_factory.mktemp("ui-run")
    dirs = ["--data-dir", str(work / "data"), "--artifacts-dir", str(work / "artifacts")]
    result = run_command("featuresum", "run", "--json", *SMALL, *dirs, env=server.client_env, cwd=work)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture
def fresh_browser(tmp_path):
    """A browser with a new profile: not logged in."""
    browser = Browser(chromium_path(), tmp_path / "chromium-profile")
    yield browser
    browser.close()


@pytest.fixture
def browser(fresh_browser, server, tmp_path):
    """A browser logged in to the server's UI the way a user does: the login form at the start page."""
    fresh_browser.open(f"{server.url}/")
    try:
        fresh_browser.wait_for_text("Login")
        fresh_browser.type_into("input", AUTH)
        fresh_browser.click("button", "Login")
        fresh_browser.wait_for_text("Dashboard", "Flows", "Deployments")
    finally:
        fresh_browser.screenshot(tmp_path / "after-login.png")
    return fresh_browser


def test_ui_shows_no_runs_without_logging_in(server, finished_run, fresh_browser, tmp_path):
    fresh_browser.open(finished_run["ui"])
    try:
        text = fresh_browser.wait_for_text("Authentication failed")
    finally:
        fresh_browser.screenshot(tmp_path / "refused.png")
    assert f"pipeline-{finished_run['run_date']}" not in text
    fresh_browser.open(f"{server.url}/")
    fresh_browser.wait_for_text("Login")
    assert "/login" in fresh_browser.location()


def test_run_page_shows_the_run_and_its_artifacts(server, finished_run, browser, tmp_path):
    from prefect.client.orchestration import get_client

    with server.settings(), get_client(sync_client=True) as client:
        run = client.read_flow_run(finished_run["flow_run_id"])
    assert finished_run["ui"] == f"{server.url}/runs/flow-run/{run.id}"

    browser.open(finished_run["ui"])
    task_runs = f"{len(finished_run['task_states'])} Task runs"
    try:
        # The page fills in piece by piece; wait for every part rather than check a half-drawn page.
        browser.wait_for_text(run.name, "Completed", "featuresum-pipeline", task_runs, "Artifacts")
    finally:
        browser.screenshot(tmp_path / "flow-run.png")

    browser.click("li.p-tab#artifacts")

    def every_artifact_shown() -> bool:
        # The flow run's own artifact (the promotion) comes first; the task runs' load as they scroll into view.
        browser.evaluate(
            "document.querySelectorAll('*').forEach(e => { if (e.scrollHeight > e.clientHeight) "
            "e.scrollTop = e.scrollHeight; }); 1"
        )
        text = browser.text()
        return all(key in text for key in (*ARTIFACT_KEYS, "featuresum-promotion"))

    try:
        wait_until(every_artifact_shown, PAGE_TIMEOUT, "every artifact on the artifacts tab")
    finally:
        shot = browser.screenshot(tmp_path / "flow-run-artifacts.png")
    # A blank or error page would be a small, nearly uniform image.
    assert shot.stat().st_size > 20_000


def artifact_page(server, finished_run, key: str) -> str:
    """The UI's page of one of the finished run's artifacts."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    artifact_filter = ArtifactFilter(
        flow_run_id=ArtifactFilterFlowRunId(any_=[finished_run["flow_run_id"]]), key=ArtifactFilterKey(any_=[key])
    )
    with server.settings(), get_client(sync_client=True) as client:
        (artifact,) = client.read_artifacts(artifact_filter=artifact_filter)
    return f"{server.url}/artifacts/artifact/{artifact.id}"


def test_monitoring_chart_page_renders_drift_by_date(server, finished_run, browser, tmp_path):
    browser.open(artifact_page(server, finished_run, "featuresum-monitoring-chart"))
    psi = f"{finished_run['drift']['feature_sum_psi']:.4f}"
    try:
        text = browser.wait_for_text("Drift and accuracy by date", finished_run["run_date"], psi, "feature-sum PSI")
    finally:
        browser.screenshot(tmp_path / "monitoring-chart.png")
    assert "# Drift" not in text and "|---|" not in text


def test_report_artifact_page_renders_the_markdown(server, finished_run, browser, tmp_path):
    browser.open(artifact_page(server, finished_run, "featuresum-training-report"))
    accuracy = f"{finished_run['metrics']['val_accuracy']:.4f}"
    try:
        text = browser.wait_for_text("Training report", accuracy, "Confusion matrix")
    finally:
        browser.screenshot(tmp_path / "training-report.png")
    # Rendered, not shown as source: no markdown markup left in the visible text.
    assert "**" not in text and "# Training report" not in text
    assert "recall" in text

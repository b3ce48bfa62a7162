"""Retention (`featuresum gc` and the pipeline's keep_days): real runs, real files, locally and on the S3 server."""

import json
import re
import time
from datetime import date, timedelta

import pytest
from test_cli_errors import featuresum, one_error_line

from featuresum.flows.pipeline import pipeline_flow
from featuresum.tasks import storage
from featuresum.tasks.registry import Registry

TINY = {"train_samples": 300, "holdout_samples": 200, "score_samples": 200, "epochs": 1, "batch_size": 128}
DATES = [(date(2026, 5, 1) + timedelta(days=n)).isoformat() for n in range(20)]
WINDOW_DAYS, KEEP_DAYS = 3, 5


def run(folder, day, **options):
    """One pipeline run of `day` at tiny sizes, writing under `folder` (a path or an s3:// URI)."""
    folders = {"data_dir": f"{folder}/data", "artifacts_dir": f"{folder}/artifacts"}
    return pipeline_flow(**{**TINY, "window_days": WINDOW_DAYS, **folders, **options}, run_date=day)


def files(folder) -> dict[str, int]:
    """{location: size} of every file under `folder`, the registry aside (its pages change when versions are marked)."""
    return {
        str(where): size for where, size in storage.list_files(folder) if storage.name_of(where) != "registry.sqlite"
    }


def task_run_names(flow_run_id: str) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter

    deadline = time.monotonic() + 60
    with get_client(sync_client=True) as client:
        # Task runs reach the API a moment after the flow returns: read until each has its state.
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [flow_run_id]}))
        while any(task_run.state is None for task_run in runs) and time.monotonic() < deadline:
            time.sleep(0.5)
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [flow_run_id]}))
    return {task_run.name: task_run.state.name for task_run in runs}


def partitions(folder, day: str) -> list[str]:
    """The date's partitions of the datasets a run writes (train, holdout, score)."""
    written = re.compile(rf".*/(train|holdout|score)-[0-9a-f]{{16}}/date={day}/part-0\.parquet")
    return [where for where in files(folder) if written.fullmatch(where)]


@pytest.fixture(scope="module")
def backfilled(harness, tmp_path_factory):
    """A 20-date backfill at tiny sizes, run in this process; its folder and each date's summary."""
    from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings

    folder = tmp_path_factory.mktemp("gc")
    with temporary_settings({PREFECT_RESULTS_LOCAL_STORAGE_PATH: folder / "results"}):
        yield folder, {day: run(folder, day) for day in DATES}


def test_gc_frees_what_no_recent_run_needs_and_keeps_what_they_do(backfilled, capsys):
    folder, runs = backfilled
    gc = ["gc", "--keep-days", str(KEEP_DAYS), "--data-dir", str(folder / "data")]
    gc += ["--artifacts-dir", str(folder / "artifacts"), "--json"]
    # Files of shapes featuresum does not write stay, however old their dates.
    strangers = [
        folder / "data" / "mine" / f"date={DATES[0]}" / "part-0.parquet",
        folder / "artifacts" / "model-mine.pt",
    ]
    for stranger in strangers:
        stranger.parent.mkdir(parents=True, exist_ok=True)
        stranger.write_bytes(b"not featuresum's")
    before = files(folder)

    code, out, _ = featuresum(capsys, *gc, "--dry-run")
    planned = json.loads(out)
    assert code == 0 and planned["dry_run"] and planned["freed_bytes"] > 0
    assert files(folder) == before
    assert set(planned["deleted"]) <= set(before)

    code, out, _ = featuresum(capsys, *gc)
    report = json.loads(out)
    assert code == 0 and report["deleted"] == planned["deleted"] and report["freed_bytes"] == planned["freed_bytes"]
    after = files(folder)
    assert sum(before.values()) - sum(after.values()) == report["freed_bytes"]
    assert not set(report["deleted"]) & set(after)

    kept, registry = report["kept"], Registry(folder / "artifacts")
    assert kept["newest_date"] == DATES[-1] and kept["keep_from"] == DATES[-KEEP_DAYS]
    # The oldest kept date's run trained on the window before it: its partitions stay too.
    assert kept["data_from"] == DATES[-KEEP_DAYS - WINDOW_DAYS + 1]
    assert kept["window"] == DATES[-WINDOW_DAYS:]
    assert kept["champion"] == registry.alias().version and storage.exists(registry.alias().checkpoint)
    for version in kept["rollback_targets"]:
        assert storage.exists(registry.get(version).checkpoint)
    assert registry.lineage()[-2] in kept["rollback_targets"] if len(registry.lineage()) > 1 else True
    assert not partitions(folder, DATES[0]) and partitions(folder, kept["data_from"])
    assert runs[DATES[0]]["predictions"] in report["deleted"] and storage.exists(runs[DATES[-KEEP_DAYS]]["predictions"])
    assert storage.exists(folder / "artifacts" / "monitoring.parquet") and all(map(storage.exists, strangers))

    # Versions whose checkpoints went keep their rows, marked pruned; scoring with one says so in a line.
    assert report["pruned_versions"] and set(report["pruned_versions"]).isdisjoint(kept["rollback_targets"])
    code, out, _ = featuresum(capsys, "models", "list", "--artifacts-dir", str(folder / "artifacts"), "--json")
    listed = {v["version"]: v for v in json.loads(out)}
    assert len(listed) == len(DATES)
    assert sorted(n for n, v in listed.items() if v["pruned"]) == report["pruned_versions"]
    pruned = report["pruned_versions"][0]
    assert not storage.exists(listed[pruned]["checkpoint"])
    code, _, lines = featuresum(
        capsys, "score", "--model", str(pruned), "--samples", "10", "--artifacts-dir", str(folder / "artifacts")
    )
    one_error_line(code, lines, 2, f"model version {pruned} was pruned by `featuresum gc`", "featuresum models list")
    code, out, _ = featuresum(capsys, "models", "list", "--artifacts-dir", str(folder / "artifacts"))
    assert "(pruned by gc on " in out
    # Nor can the champion be moved onto it, or its weights exported.
    code, _, lines = featuresum(capsys, "models", "promote", str(pruned), "--artifacts-dir", str(folder / "artifacts"))
    one_error_line(code, lines, 2, f"cannot point 'champion' at model version {pruned}", "models promote N")
    exported = ["--output", str(folder / "m.pth"), "--artifacts-dir", str(folder / "artifacts")]
    code, _, lines = featuresum(capsys, "models", "export", str(pruned), *exported)
    one_error_line(code, lines, 2, f"model version {pruned} was pruned by `featuresum gc`")

    # The newest date's rerun is cached whole; an old date's run regenerates its partitions and retrains.
    again = task_run_names(run(folder, DATES[-1])["flow_run_id"])
    assert again["train-model-1epochs-seed0"] == "Cached"
    old = run(folder, DATES[0])
    old_tasks = task_run_names(old["flow_run_id"])
    assert old_tasks[f"generate-train-{DATES[0]}-100rows-seed0"] == "Completed"
    assert old_tasks["train-model-1epochs-seed0"] == "Completed" and storage.exists(old["checkpoint"])
    assert partitions(folder, DATES[0])

    # Rollback still finds the checkpoint it returns to.
    registry.rollback("checking retention")
    assert storage.exists(registry.alias().checkpoint)
    print(
        f"\n{len(DATES)} dates, {KEEP_DAYS} kept: freed {report['freed_bytes']} bytes in {len(report['deleted'])} files"
    )


def test_gc_of_a_moved_folder_still_finds_the_old_predictions(prefect, tmp_path, capsys):
    old, moved = tmp_path / "old", tmp_path / "moved"
    summaries = {day: run(old, day) for day in DATES[:2]}
    old.rename(moved)
    gc = ["gc", "--keep-days", "1", "--data-dir", str(moved / "data"), "--artifacts-dir", str(moved / "artifacts")]
    code, out, _ = featuresum(capsys, *gc, "--json")
    assert code == 0
    deleted = set(json.loads(out)["deleted"])
    for day, summary in summaries.items():
        where = str(summary["predictions"]).replace(str(old), str(moved))
        assert (where in deleted) == (day != DATES[1]), (day, where)


def test_gc_refuses_a_missing_folder_in_one_line(capsys, tmp_path):
    missing = ["--data-dir", str(tmp_path), "--artifacts-dir", str(tmp_path / "nowhere")]
    code, _, lines = featuresum(capsys, "gc", "--keep-days", "3", *missing)
    one_error_line(code, lines, 2, "nowhere: no such folder")
    (tmp_path / "a-file").write_text("")
    code, _, lines = featuresum(
        capsys, "gc", "--keep-days", "3", "--data-dir", str(tmp_path), "--artifacts-dir", str(tmp_path / "a-file")
    )
    one_error_line(code, lines, 2, "a-file: not a folder")
    code, _, lines = featuresum(capsys, "gc", "--keep-days", "0")
    one_error_line(code, lines, 2, "--keep-days")


def test_an_older_registry_file_gains_the_pruned_column(tmp_path, checkpoint):
    import sqlite3

    from featuresum.tasks import registry_file

    registry = Registry(tmp_path)
    registry.register(str(checkpoint), "fingerprint-1", config={}, metrics={})
    with sqlite3.connect(tmp_path / "registry.sqlite") as conn:
        conn.execute("ALTER TABLE versions DROP COLUMN pruned")
    assert registry.get(1).pruned is None  # read as it is
    registry.mark_pruned([1])  # the first write adds the column
    assert registry.get(1).pruned is not None
    assert registry_file.SCHEMA_VERSION == 1


def test_served_keep_days_reach_the_pipeline_on_the_object_store(harness, object_store, monkeypatch, capsys, tmp_path):
    from typer.testing import CliRunner

    from featuresum.flows import cli, serve
    from featuresum.tasks import s3

    for name, value in object_store.env.items():
        monkeypatch.setenv(name, value)
    served = {}
    monkeypatch.setattr(serve, "serve_pipeline", lambda name, when, parameters, **_: served.update(parameters))
    bucket = object_store.bucket("retention")
    sizes = [f"--{name.replace('_', '-')}={value}" for name, value in TINY.items()]
    folders = ["--data-dir", f"{bucket}/data", "--artifacts-dir", f"{bucket}/artifacts"]
    given = ["serve", *sizes, "--window-days", "1", *folders, "--keep-days", "2", "--catch-up", "0"]
    result = CliRunner().invoke(cli.app, given)
    assert result.exit_code == 0, result.output
    assert served["keep_days"] == 2 and served["data_dir"] == f"{bucket}/data"

    from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings

    with temporary_settings({PREFECT_RESULTS_LOCAL_STORAGE_PATH: tmp_path / "results"}):
        summaries = [pipeline_flow(**served, run_date=day) for day in DATES[:4]]
    assert "retain-artifacts" in task_run_names(summaries[-1]["flow_run_id"])
    assert summaries[-1]["retention"]["freed_bytes"] > 0
    keys = set(object_store.keys("retention"))
    assert not [key for key in keys if f"/date={DATES[1]}/" in key] and [k for k in keys if f"/date={DATES[2]}/" in k]
    assert not storage.exists(summaries[0]["predictions"]) and storage.exists(summaries[-2]["predictions"])
    registry = Registry(f"{bucket}/artifacts")
    assert storage.exists(registry.alias().checkpoint)
    assert any(version.pruned for version in registry.versions())

    # `featuresum gc` on the store: nothing more to free at the same horizon; a shorter one frees space.
    before = dict(s3.list_prefix(bucket))
    code, out, _ = featuresum(capsys, "gc", "--keep-days", "1", *folders, "--json")
    report = json.loads(out)
    assert code == 0 and report["kept"]["keep_from"] == DATES[3] and report["pruned_versions"]
    after = dict(s3.list_prefix(bucket))
    assert report["deleted"] and not set(report["deleted"]) & set(after)
    freed = sum(before.values()) - sum(after.values())
    registry_growth = after[f"{bucket}/artifacts/registry.sqlite"] - before[f"{bucket}/artifacts/registry.sqlite"]
    assert freed + registry_growth == report["freed_bytes"]

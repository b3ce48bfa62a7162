"""Dated runs: each run processes its date's partitions; moving to the next date generates one new partition."""

from datetime import datetime
from zoneinfo import ZoneInfo

import pyarrow.dataset as ds
from test_cache import by_task, states
from test_flows import SMALL

from featuresum.flows.pipeline import pipeline_flow
from featuresum.tasks.registry import Registry

WINDOW = {**SMALL, "window_days": 3}


def run_on(tmp_path, day, **overrides):
    options = {**WINDOW, "data_dir": str(tmp_path / "data"), "artifacts_dir": str(tmp_path / "artifacts")}
    return pipeline_flow(**{**options, **overrides, "run_date": day})


def test_the_next_date_generates_one_new_partition_and_a_rerun_nothing(prefect, tmp_path):
    first = run_on(tmp_path, "2026-05-10")
    assert first["run_date"] == "2026-05-10"
    assert by_task(first, "generate-train") == ["Completed"] * 3

    following = run_on(tmp_path, "2026-05-11")
    named = states(following)
    assert {name: state for name, state in named.items() if name.startswith("generate-train")} == {
        f"generate-train-2026-05-{day}-{SMALL['train_samples'] // 3}rows-seed0": state
        for day, state in (("09", "Cached"), ("10", "Cached"), ("11", "Completed"))
    }
    # The training folder is one hive-partitioned dataset holding every date generated so far.
    dataset = ds.dataset(following["train_data"], partitioning="hive")
    assert sorted(str(day) for day in dataset.to_table(columns=["date"]).column("date").unique()) == [
        f"2026-05-{day:02d}" for day in range(8, 12)
    ]

    again = run_on(tmp_path, "2026-05-11")
    # Every step is cached but monitoring, which runs for every scored batch.
    assert {state for name, state in states(again).items() if not name.startswith("monitor-")} == {"Cached"}

    registry = Registry(tmp_path / "artifacts")
    assert [(v.run_date, v.window) for v in registry.versions()] == [
        ("2026-05-10", {"from": "2026-05-08", "to": "2026-05-10", "days": 3}),
        ("2026-05-11", {"from": "2026-05-09", "to": "2026-05-11", "days": 3}),
    ]


def test_a_run_without_a_date_processes_the_date_of_its_scheduled_start(prefect, tmp_path, monkeypatch):
    # A run scheduled for 23:30 in New York on March 4 is due on March 5 in UTC.
    from prefect.runtime import flow_run

    scheduled = datetime(2026, 3, 4, 23, 30, tzinfo=ZoneInfo("America/New_York"))
    monkeypatch.setattr(flow_run, "scheduled_start_time", scheduled, raising=False)
    summary = run_on(tmp_path, None, window_days=1)
    assert summary["run_date"] == "2026-03-05"
    assert by_task(summary, "generate-holdout-2026-03-05") == ["Completed"]

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(summary["flow_run_id"])
    assert run.name == "pipeline-2026-03-05-seed0"
    assert "date-2026-03-05" in run.tags


def test_init_champion_starts_from_the_champions_weights(prefect, tmp_path):
    run_on(tmp_path, "2026-05-10", window_days=1)
    warm = run_on(tmp_path, "2026-05-11", window_days=1, init="champion")
    cold = run_on(tmp_path, "2026-05-11", window_days=1, init="scratch")
    assert warm["checkpoint"] != cold["checkpoint"]
    from featuresum.tasks.checkpoint import load_checkpoint
    from featuresum.tasks.storage import Path

    champion = Registry(tmp_path / "artifacts").get(1)
    assert load_checkpoint(Path(warm["checkpoint"]))["init_fingerprint"] == champion.fingerprint
    assert load_checkpoint(Path(cold["checkpoint"]))["init_fingerprint"] is None
    # The warm challenger may now be champion; a rerun of its date still starts from the same weights.
    again = run_on(tmp_path, "2026-05-11", window_days=1, init="champion")
    assert again["checkpoint"] == warm["checkpoint"]
    cached = {state for name, state in states(again).items() if name != "evaluate-model" and "monitor-" not in name}
    assert cached == {"Cached"}


def test_init_champion_reruns_from_the_champion_as_it_stood_even_after_a_promotion_by_hand(prefect, tmp_path):
    strict = {"window_days": 1, "init": "champion", "min_improvement": 1.0}  # later challengers stay out
    run_on(tmp_path, "2026-05-10", **strict)
    second = run_on(tmp_path, "2026-05-11", **strict)
    third = run_on(tmp_path, "2026-05-12", **strict)
    registry = Registry(tmp_path / "artifacts")
    registry.set_alias(second["model_version"], "promoted by hand")  # as `featuresum models promote 2` does
    again = run_on(tmp_path, "2026-05-12", **strict)
    assert again["checkpoint"] == third["checkpoint"] and again["model_version"] == third["model_version"]
    assert by_task(again, "train-model") == ["Cached"]
    assert len(registry.versions()) == 3

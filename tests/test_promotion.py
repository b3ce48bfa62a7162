"""The promotion gate: every trained model is a version; the champion changes only for a better one."""

import pyarrow.parquet as pq
import pytest
import torch
from test_flows import SMALL, run_pipeline

from featuresum.flows.pipeline import score_flow, train_flow
from featuresum.tasks import storage, training
from featuresum.tasks.checkpoint import load_checkpoint, model_from_checkpoint
from featuresum.tasks.registry import Registry


def accuracy_on(checkpoint, holdout):
    model = model_from_checkpoint(load_checkpoint(storage.Path(checkpoint)), torch.device("cpu"))
    return training.accuracy(training.evaluate(model, *storage.read_dataset(storage.Path(holdout))))


@pytest.fixture
def first_run(prefect, tmp_path):
    return run_pipeline(tmp_path)


def test_the_first_model_becomes_the_champion_and_a_rerun_adds_no_version(first_run, tmp_path):
    assert first_run["model_version"] == 1
    assert first_run["registry"] == {
        "champion_version": 1,
        "promoted": True,
        "challenger_accuracy": first_run["metrics"]["val_accuracy"],
        "champion_accuracy": None,
        "reason": "first model: there was no champion",
    }
    registry = Registry(tmp_path / "artifacts")
    [version] = registry.versions()
    assert version.checkpoint == first_run["checkpoint"] and version.aliases == ("champion",)
    assert version.metrics["val_accuracy"] == first_run["metrics"]["val_accuracy"]
    assert version.flow_run_id == first_run["flow_run_id"]

    again = run_pipeline(tmp_path)
    assert sorted(again["task_runs"].values()) == ["Cached"] * 5 + ["Completed"]  # monitoring always runs
    assert again["model_version"] == 1 and again["registry"]["promoted"] is False
    assert len(registry.versions()) == 1 and len(registry.history()) == 1


def test_a_challenger_is_compared_with_the_champion_on_the_same_held_out_rows(first_run, tmp_path):
    challenger = run_pipeline(tmp_path, seed=1)
    gate = challenger["registry"]
    assert challenger["model_version"] == 2
    # Both accuracies are on the challenger's held-out rows, measured independently here.
    assert gate["challenger_accuracy"] == pytest.approx(
        accuracy_on(challenger["checkpoint"], challenger["holdout_data"])
    )
    assert gate["champion_accuracy"] == pytest.approx(accuracy_on(first_run["checkpoint"], challenger["holdout_data"]))
    better = gate["challenger_accuracy"] >= gate["champion_accuracy"]
    assert gate["promoted"] is better
    assert gate["champion_version"] == (2 if better else 1)

    registry = Registry(tmp_path / "artifacts")
    assert registry.alias().version == gate["champion_version"]
    if better:
        change = registry.history()[-1]
        assert (change.version, change.previous, change.flow_run_id) == (2, 1, challenger["flow_run_id"])
        assert change.reason == gate["reason"]


def test_a_challenger_that_is_not_better_enough_is_kept_out_and_the_champion_scores(first_run, tmp_path):
    kept_out = run_pipeline(tmp_path, seed=2, min_improvement=1.0)
    assert kept_out["registry"]["promoted"] is False
    assert kept_out["registry"]["champion_version"] == 1
    assert "min improvement 1" in kept_out["registry"]["reason"]
    registry = Registry(tmp_path / "artifacts")
    assert [v.version for v in registry.versions()] == [1, 2] and registry.alias().version == 1

    # The batch of this run was scored with the champion, not with the model it trained.
    assert kept_out["scored_with"] == first_run["checkpoint"] != kept_out["checkpoint"]
    direct = score_flow(
        model=first_run["checkpoint"],
        input=kept_out["score_input"],
        output=str(tmp_path / "direct.parquet"),
        artifacts_dir=str(tmp_path / "artifacts"),
    )
    assert pq.read_table(kept_out["predictions"]).equals(pq.read_table(direct["predictions"]))
    assert direct["model_version"] == 1


def test_train_registers_and_gates_too(prefect, tmp_path):
    options = {k: SMALL[k] for k in ("train_samples", "holdout_samples", "epochs", "batch_size", "run_date")}
    summary = train_flow(**options, data_dir=str(tmp_path / "d"), artifacts_dir=str(tmp_path / "a"))
    assert summary["model_version"] == 1 and summary["registry"]["promoted"] is True

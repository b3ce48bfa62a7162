"""The promotion gate: every trained model is a version; the champion changes only for a better one."""

import pyarrow.parquet as pq
import pytest
import torch
from test_cache import by_task
from test_flows import SMALL, run_pipeline

from featuresum.flows.pipeline import score_flow, train_flow
from featuresum.tasks import storage, training
from featuresum.tasks.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from featuresum.tasks.errors import EnvironmentFailure
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


def test_a_better_challenger_is_compared_with_the_champion_on_the_same_held_out_rows(first_run, tmp_path):
    # Twice the rows and epochs of the first model: better by a wide margin, whatever the noise.
    more = {"train_samples": 2 * SMALL["train_samples"], "epochs": 2 * SMALL["epochs"]}
    challenger = run_pipeline(tmp_path, seed=1, **more)
    gate = challenger["registry"]
    assert challenger["model_version"] == 2
    # Both accuracies are on the challenger's held-out rows, measured independently here.
    assert gate["challenger_accuracy"] == pytest.approx(
        accuracy_on(challenger["checkpoint"], challenger["holdout_data"])
    )
    assert gate["champion_accuracy"] == pytest.approx(accuracy_on(first_run["checkpoint"], challenger["holdout_data"]))
    assert gate["challenger_accuracy"] > gate["champion_accuracy"] + 0.05
    assert gate["promoted"] is True and gate["champion_version"] == 2

    registry = Registry(tmp_path / "artifacts")
    assert registry.alias().version == 2
    change = registry.history()[-1]
    assert (change.version, change.previous, change.flow_run_id) == (2, 1, challenger["flow_run_id"])
    assert change.reason == gate["reason"]
    assert challenger["scored_with"] == challenger["checkpoint"]


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


LATER = "2026-03-09"


def test_a_rerun_of_an_earlier_date_never_takes_the_champion_from_a_later_one(first_run, tmp_path):
    later = run_pipeline(tmp_path, run_date=LATER)
    registry = Registry(tmp_path / "artifacts")
    registry.set_alias(later["model_version"], "promoted by hand")  # as `featuresum models promote` does
    versions = len(registry.versions())

    # The first date again, with a gate that any challenger passes: measured and recorded, nothing moves.
    again = run_pipeline(tmp_path, min_improvement=-1.0)
    trained = [state for step in ("generate-train", "generate-holdout", "train") for state in by_task(again, step)]
    assert trained == ["Cached"] * 3
    gate = again["registry"]
    assert gate["promoted"] is False and gate["champion_version"] == later["model_version"] != again["model_version"]
    assert gate["champion_accuracy"] is not None
    assert f"trained for {LATER}, after this run's date {SMALL['run_date']}" in gate["reason"]
    assert registry.alias().version == later["model_version"] and len(registry.versions()) == versions
    assert again["scored_with"] == later["checkpoint"]


def test_a_rerun_never_puts_back_a_version_the_champion_was_rolled_back_from(first_run, tmp_path):
    later = run_pipeline(tmp_path, run_date=LATER, min_improvement=-1.0)
    registry = Registry(tmp_path / "artifacts")
    assert registry.alias().version == later["model_version"] == 2
    registry.rollback("rolled back by hand")  # as `featuresum models rollback` does

    # The later date again, with a gate that any challenger passes: its version stays out.
    again = run_pipeline(tmp_path, run_date=LATER, min_improvement=-1.0)
    assert again["model_version"] == 2 and again["registry"]["promoted"] is False
    assert "the champion was rolled back from version 2" in again["registry"]["reason"]
    assert registry.alias().version == 1 and registry.rolled_back() == {2}
    # Promoted by hand, it is a version like any other again.
    registry.set_alias(2, "promoted by hand")
    assert registry.rolled_back() == set()


def test_a_moved_artifacts_folder_keeps_its_champion_and_gate(first_run, tmp_path):
    moved = tmp_path / "moved"
    moved.mkdir()
    (tmp_path / "artifacts").rename(moved / "artifacts")
    registry = Registry(moved / "artifacts")
    assert registry.alias().checkpoint == str(moved / "artifacts" / storage.Path(first_run["checkpoint"]).name)

    kept_out = run_pipeline(tmp_path, seed=2, min_improvement=1.0, artifacts_dir=str(moved / "artifacts"))
    assert kept_out["registry"]["promoted"] is False and kept_out["registry"]["champion_accuracy"] is not None
    assert registry.alias().version == 1
    assert kept_out["scored_with"] == registry.alias().checkpoint
    # As `score --model champion --artifacts-dir moved/artifacts` resolves it.
    scored = score_flow(model=registry.resolve("champion").checkpoint, input=kept_out["score_input"],
                        output=str(tmp_path / "again.parquet"), artifacts_dir=str(moved / "artifacts"))  # fmt: skip
    assert scored["model_version"] == 1


def test_a_champion_whose_checkpoint_is_gone_stops_the_gate_with_what_to_do(first_run, tmp_path):
    storage.Path(first_run["checkpoint"]).unlink()
    with pytest.raises(EnvironmentFailure, match="has no checkpoint at .* models promote"):
        run_pipeline(tmp_path, seed=2)
    registry = Registry(tmp_path / "artifacts")
    assert registry.alias().version == 1


def test_a_registered_checkpoint_holding_other_weights_is_never_used(first_run, tmp_path):
    champion = storage.Path(first_run["checkpoint"])
    retrained = load_checkpoint(champion)
    retrained["model"] = {name: weights + 0.01 for name, weights in retrained["model"].items()}
    save_checkpoint(champion, retrained)  # as a retraining that is not bit-identical would have written it

    with pytest.raises(EnvironmentFailure, match="no longer holds its registered weights"):
        run_pipeline(tmp_path, seed=3)
    scoring = {"samples": 50, "run_date": SMALL["run_date"], "artifacts_dir": str(tmp_path / "artifacts")}
    with pytest.raises(EnvironmentFailure, match="of model version 1 no longer holds its registered weights"):
        score_flow(model=str(champion), **scoring)
    with pytest.raises(EnvironmentFailure, match="a registered version is never trained over"):
        run_pipeline(tmp_path, refresh=True)  # the date and options that trained version 1
    assert Registry(tmp_path / "artifacts").alias().version == 1


def test_a_checkpoint_holding_another_versions_weights_is_never_used_as_its_own(first_run, tmp_path):
    other = run_pipeline(tmp_path, seed=2, min_improvement=1.0)
    champion = storage.Path(first_run["checkpoint"])
    champion.write_bytes(storage.Path(other["checkpoint"]).read_bytes())  # version 2's weights in version 1's file
    scoring = {"samples": 50, "run_date": SMALL["run_date"], "artifacts_dir": str(tmp_path / "artifacts")}
    with pytest.raises(EnvironmentFailure, match="of model version 1 no longer holds its registered weights"):
        score_flow(model=str(champion), **scoring)
    with pytest.raises(EnvironmentFailure, match="no longer holds its registered weights"):
        run_pipeline(tmp_path, seed=3)

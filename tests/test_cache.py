"""A cached result is reused only when the file on disk is the very file that result describes."""

import os
import shutil

import pyarrow.parquet as pq
import pytest
from test_flows import SMALL, run_pipeline

from featuresum.flows import local_server
from featuresum.flows.pipeline import score_flow, train_flow
from featuresum.tasks import storage
from featuresum.tasks.errors import InputError

TRAIN = {k: SMALL[k] for k in ("train_samples", "holdout_samples", "epochs", "batch_size", "run_date")}


def states(summary):
    """{task run name: final state} of a flow run, as the API recorded them."""
    return local_server.wait_for_task_runs(summary["flow_run_id"], list(summary["task_runs"]))


def by_task(summary, prefix):
    return [state for name, state in states(summary).items() if name.startswith(prefix)]


@pytest.fixture
def two_models(prefect, tmp_path):
    dirs = {"data_dir": str(tmp_path / "data"), "artifacts_dir": str(tmp_path / "artifacts")}
    a = train_flow(**TRAIN, seed=0, **dirs)
    b = train_flow(**TRAIN, seed=1, **dirs)
    batch = score_flow(model=a["checkpoint"], samples=900, seed=5, run_date=SMALL["run_date"], **dirs)
    return a["checkpoint"], b["checkpoint"], batch["score_input"], dirs


def predictions_of(path):
    return pq.read_table(path).column("predicted_class").to_pylist()


def test_scoring_with_model_a_then_b_then_a_into_one_output_gives_as_predictions(two_models, tmp_path):
    a, b, rows, dirs = two_models
    output = str(tmp_path / "p.parquet")
    reference_a = predictions_of(score_flow(model=a, input=rows, output=str(tmp_path / "ref-a.parquet"))["predictions"])
    reference_b = predictions_of(score_flow(model=b, input=rows, output=str(tmp_path / "ref-b.parquet"))["predictions"])
    assert reference_a != reference_b

    first = score_flow(model=a, input=rows, output=output, **dirs)
    assert predictions_of(output) == reference_a
    second = score_flow(model=b, input=rows, output=output, **dirs)
    assert predictions_of(output) == reference_b
    third = score_flow(model=a, input=rows, output=output, **dirs)
    assert by_task(third, "write-predictions") == ["Completed"]
    assert predictions_of(output) == reference_a
    assert third["metrics"]["score_accuracy"] == first["metrics"]["score_accuracy"]
    assert second["metrics"]["score_accuracy"] != first["metrics"]["score_accuracy"]

    again = score_flow(model=a, input=rows, output=output, **dirs)
    # Two fingerprints and the predictions, no shard runs; monitoring runs for every scored batch.
    assert sorted(states(again).values()) == ["Cached"] * 3 + ["Completed"]


def test_changed_shard_layout_never_reuses_shards_of_another_layout(two_models, tmp_path, monkeypatch):
    a, _, rows, dirs = two_models
    output = tmp_path / "p.parquet"
    expected = predictions_of(score_flow(model=a, input=rows, output=str(tmp_path / "ref.parquet"))["predictions"])
    with pq.ParquetFile(rows) as parquet:
        assert parquet.metadata.num_row_groups == 1
    many_groups = tmp_path / "rows.parquet"
    pq.write_table(pq.read_table(rows), many_groups, row_group_size=100)

    # A run killed after scoring its shards (here: combining them fails) leaves shards of one layout behind.
    real = storage.iter_parquet_batches

    def broken(paths):
        raise InputError("combining failed on purpose")

    monkeypatch.setattr(storage, "iter_parquet_batches", broken)
    with pytest.raises(InputError):
        score_flow(model=a, input=str(many_groups), output=str(output), shard_rows=300, **dirs)
    left = sorted(storage.parts_dir(output).glob("part-*.parquet"))
    assert len(left) == 3
    for leftover in storage.parts_dir(output).iterdir():  # left over two hours ago: no run is coming back for them
        os.utime(leftover, (leftover.stat().st_atime, leftover.stat().st_mtime - 7200))

    monkeypatch.setattr(storage, "iter_parquet_batches", real)
    summary = score_flow(model=a, input=str(many_groups), output=str(output), shard_rows=200, **dirs)
    assert len(by_task(summary, "score-shard")) == 5
    assert by_task(summary, "score-shard") == ["Completed"] * 5
    assert predictions_of(output) == expected
    assert not storage.parts_dir(output).exists()

    same = score_flow(model=a, input=str(many_groups), output=str(output), shard_rows=300, **dirs)
    assert by_task(same, "write-predictions") == ["Cached"]
    assert predictions_of(output) == expected


def test_a_run_into_the_same_output_never_deletes_the_shards_of_another_in_flight(two_models, tmp_path, monkeypatch):
    a, b, batch, dirs = two_models
    output, rows = str(tmp_path / "p.parquet"), str(tmp_path / "rows.parquet")
    pq.write_table(pq.read_table(batch), rows, row_group_size=300)  # three shards of 300 rows
    real = storage.iter_parquet_batches

    def broken(paths):
        raise InputError("combining failed on purpose")

    # Run A has scored its shards and not yet combined them when run B, with another model, writes the output.
    monkeypatch.setattr(storage, "iter_parquet_batches", broken)
    with pytest.raises(InputError):
        score_flow(model=a, input=rows, output=output, shard_rows=300, **dirs)
    monkeypatch.setattr(storage, "iter_parquet_batches", real)
    ours = sorted(path.name for path in storage.parts_dir(storage.Path(output)).iterdir())
    assert len([name for name in ours if name.startswith("part-")]) == 3
    expected_b = predictions_of(score_flow(model=b, input=rows, output=str(tmp_path / "ref-b.parquet"))["predictions"])
    score_flow(model=b, input=rows, output=output, shard_rows=300, **dirs)
    assert predictions_of(output) == expected_b
    assert sorted(path.name for path in storage.parts_dir(storage.Path(output)).iterdir()) == ours

    # A's shards are still there for A to combine.
    again = score_flow(model=a, input=rows, output=output, shard_rows=300, **dirs)
    assert by_task(again, "score-shard") == ["Cached"] * 3
    assert predictions_of(output) != expected_b
    assert not storage.parts_dir(storage.Path(output)).exists()


@pytest.fixture
def first_run(prefect, tmp_path):
    return run_pipeline(tmp_path)


def test_an_output_replaced_by_another_valid_output_is_recomputed(first_run, tmp_path):
    # The other run never becomes the champion, so the rerun below scores with the same model on any date.
    other = run_pipeline(tmp_path, seed=1, min_improvement=1.0)
    ours, theirs = storage.Path(first_run["predictions"]), storage.Path(other["predictions"])
    original = ours.read_bytes()
    assert theirs.read_bytes() != original
    # The other run's file moves in together with its own manifest: both look intact on their own.
    os.replace(theirs, ours)
    os.replace(storage.manifest_path(theirs), storage.manifest_path(ours))

    again = run_pipeline(tmp_path)
    assert by_task(again, "write-predictions") == ["Completed"]
    assert by_task(again, "score-shard") == ["Completed"]
    assert ours.read_bytes() == original


def test_completed_predictions_leave_no_shard_folder(first_run):
    assert storage.Path(first_run["predictions"]).is_file()
    assert not storage.parts_dir(storage.Path(first_run["predictions"])).exists()


def test_score_zero_samples_scores_zero_rows(first_run, tmp_path):
    day = SMALL["run_date"]
    summary = score_flow(model=first_run["checkpoint"], samples=0, run_date=day, data_dir=str(tmp_path / "data"))
    assert summary["predicted_rows"] == 0
    assert pq.read_table(summary["predictions"]).num_rows == 0


def test_an_output_that_is_an_input_is_refused(first_run, tmp_path):
    model = first_run["checkpoint"]
    size = os.path.getsize(model)
    for output in (model, first_run["score_input"]):
        with pytest.raises(InputError, match="would overwrite an input"):
            score_flow(model=model, input=first_run["score_input"], output=output)
    assert os.path.getsize(model) == size


def test_an_output_over_a_file_featuresum_keeps_is_refused_and_leaves_it_intact(first_run, tmp_path):
    artifacts = tmp_path / "artifacts"
    partition = next((tmp_path / "data").glob("train-*/date=*/*.parquet"))
    parts = artifacts / "p.parquet.parts" / "part-00000.parquet"
    dirs = {"data_dir": str(tmp_path / "data"), "artifacts_dir": str(artifacts)}
    model = shutil.copy(first_run["checkpoint"], tmp_path / "copy.pt")  # so the registered one is no input
    kept = (artifacts / "registry.sqlite", artifacts / "monitoring.parquet", first_run["checkpoint"], partition)
    for managed in kept:
        before = storage.Path(managed).read_bytes()
        with pytest.raises(InputError, match="featuresum keeps .* there; choose another --output"):
            score_flow(model=str(model), input=first_run["score_input"], output=str(managed), **dirs)
        assert storage.Path(managed).read_bytes() == before
    # Another project's registry or history, a journal of ours, any checkpoint: refused by name.
    elsewhere = tmp_path / "elsewhere"
    for name in ("registry.sqlite", "monitoring.parquet", "x.pt", "../artifacts/registry.sqlite-journal"):
        with pytest.raises(InputError, match="featuresum keeps"):
            score_flow(model=str(model), input=first_run["score_input"], output=str(elsewhere / name), **dirs)
    assert not elsewhere.exists()
    with pytest.raises(InputError, match="a shard folder"):
        score_flow(model=str(model), input=first_run["score_input"], output=str(parts), **dirs)
    assert not parts.exists()


def test_an_unchanged_input_is_fingerprinted_once(first_run, tmp_path):
    rows = tmp_path / "rows.parquet"
    shutil.copy(first_run["score_input"], rows)
    output = str(tmp_path / "p.parquet")
    first = score_flow(model=first_run["checkpoint"], input=str(rows), output=output)
    assert by_task(first, f"fingerprint-{rows}") == ["Completed"]
    again = score_flow(model=first_run["checkpoint"], input=str(rows), output=output)
    assert by_task(again, f"fingerprint-{rows}") == ["Cached"]

    # Rewritten in place with other rows: the identity changes, so the content is hashed again.
    table = pq.read_table(rows)
    pq.write_table(table.slice(0, table.num_rows // 2), rows)
    changed = score_flow(model=first_run["checkpoint"], input=str(rows), output=output)
    assert by_task(changed, f"fingerprint-{rows}") == ["Completed"]
    assert changed["predicted_rows"] == table.num_rows // 2

"""The installed `featuresum` command, run as a subprocess against a real local Prefect server."""

import pickle
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import DAY, run_json, small_run_args, train_checkpoint
from test_checkpoint import Exploit

from featuresum.tasks import data, storage


def test_run_prints_one_json_object_and_a_clean_log(cli, tmp_path):
    result = cli(*small_run_args(tmp_path), "--json")
    summary = run_json(result)
    for key in ("flow_run_id", "train_data", "checkpoint", "score_input", "predictions", "task_states"):
        assert summary[key], key
    assert set(summary["metrics"]) >= {"val_accuracy", "train_loss", "score_accuracy"}
    assert summary["start_epoch"] == 0 and summary["epochs_completed"] == 2
    assert sorted(summary["task_states"].values()) == ["Completed"] * 7
    assert pq.read_table(summary["predictions"]).num_rows == 700
    assert summary["ui"].startswith("http://127.0.0.1:")
    for bad in ("ERROR", "Traceback", "database is locked"):
        assert bad not in result.stderr

    # A cached rerun must not load torch.
    rerun, imported = run_listing_imports(cli, *small_run_args(tmp_path), "--json")
    assert "prefect" in imported and "torch" not in imported
    again = run_json(rerun)
    # No shard runs: the predictions are intact; the monitoring step runs for every scored batch.
    assert sorted(again["task_states"].values()) == ["Cached"] * 5 + ["Completed"]


def run_listing_imports(cli, *args: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run `featuresum args`; also the modules it imported (Python lists each one on stderr)."""
    result = subprocess.run(
        [cli.executable, *args],
        cwd=cli.cwd,
        env={**cli.env, "PYTHONPROFILEIMPORTTIME": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    return result, {line.rsplit("|", 1)[-1].strip() for line in lines if line.startswith("import time")}


def test_score_with_the_champion_or_a_version_number(cli, tmp_path):
    trained = run_json(cli(*small_run_args(tmp_path), "--json"))
    assert trained["model_version"] == 1 and trained["registry"]["champion_version"] == 1
    artifacts = ["--artifacts-dir", str(tmp_path / "artifacts")]
    for reference in ("champion", "1"):
        scored = run_json(
            cli("score", "--model", reference, "--samples", "50", "--seed", "4", "--date", DAY, *artifacts, "--json")
        )
        assert scored["checkpoint"] == trained["checkpoint"]
        assert scored["model_version"] == 1
    # A cached score of a registered version loads no torch: its bytes were checked when trained.
    rescored, imported = run_listing_imports(
        cli, "score", "--model", "champion", "--samples", "50", "--seed", "4", "--date", DAY, *artifacts, "--json"
    )
    assert "prefect" in imported and "torch" not in imported
    assert sorted(run_json(rescored)["task_states"].values()) == ["Cached"] * 3 + ["Completed"]
    # The champion's file made a symlink to another real checkpoint: other weights, refused, not scored.
    champion = Path(trained["checkpoint"])
    other = train_checkpoint(tmp_path / "other.pt", seed=9)
    champion.unlink()
    champion.symlink_to(other)
    for reference in ("champion", "1"):
        swapped = cli(
            "score", "--model", reference, "--samples", "50", "--seed", "4", "--date", DAY, *artifacts, check=False
        )
        one_error_line(swapped, "no longer holds its registered weights", code=1)
    missing = cli("score", "--model", "7", "--samples", "5", *artifacts, check=False)
    one_error_line(missing, "7")


def test_train_command_reports_training_only(cli, tmp_path):
    args = small_run_args(tmp_path)
    args[0] = "train"
    args.remove("--score-samples"), args.remove("700")
    summary = run_json(cli(*args, "--json"))
    assert "predictions" not in summary and summary["checkpoint"].endswith(".pt")
    assert 0.4 < summary["metrics"]["val_accuracy"] <= 1  # above the majority-class rate, about 0.36
    assert len(summary["task_states"]) == 3


def test_train_streams_its_rows_under_a_small_memory_budget_into_the_same_model(cli, tmp_path):
    # 150,000 rows take 450 MB in memory; streamed (shuffled in runs of at least 4,096), under 340 MB.
    sizes = ["--train-samples", "150000", "--holdout-samples", "1000", "--epochs", "1", "--shuffle-rows", "4096"]
    args = ["train", *sizes, "--date", "2026-03-01", "--data-dir", str(tmp_path / "data"), "--json"]
    streamed = cli(*args, "--artifacts-dir", str(tmp_path / "streamed"), "--train-memory-mb", "400")
    assert "150,000 rows streamed from disk, shuffled in runs of at least 4,096" in streamed.stderr, streamed.stderr
    in_memory = cli(*args, "--artifacts-dir", str(tmp_path / "in-memory"))
    assert "150,000 rows held in memory" in in_memory.stderr, in_memory.stderr
    metrics = [run_json(result)["metrics"] for result in (streamed, in_memory)]
    assert metrics[0] == metrics[1] and metrics[0]["val_accuracy"] > 0.5


def one_error_line(result, *fragments, code=2):
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("featuresum: error:")
    for fragment in fragments:
        assert fragment in lines[0]


def last_error_line(result, *fragments, code=2):
    """A failure found while the flow ran: Prefect's log lines come first, then the error, without a traceback."""
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("featuresum: error:")
    for fragment in fragments:
        assert fragment in last


def feature_table(rows=50, seed=4):
    shard = data.generate_shard(seed, "mine", 0, rows)
    return pa.Table.from_batches([storage.shard_to_batch(shard)])


def score(cli, model, features, *extra):
    output = cli.cwd / "predictions.parquet"
    result = cli("score", "--model", str(model), "--input", str(features), "--output", str(output), *extra, check=False)
    return result, output


def test_score_a_user_file(cli, checkpoint, tmp_path):
    pq.write_table(feature_table().drop(["label"]), tmp_path / "rows.parquet")
    result, output = score(cli, checkpoint, tmp_path / "rows.parquet", "--json")
    assert result.returncode == 0, result.stderr
    assert pq.read_table(output).num_rows == 50
    assert run_json(result)["metrics"].get("score_accuracy") is None


def test_score_zero_rows_gives_an_empty_predictions_file(cli, checkpoint, tmp_path):
    pq.write_table(feature_table().slice(0, 0), tmp_path / "empty.parquet")
    result, output = score(cli, checkpoint, tmp_path / "empty.parquet", "--json")
    assert result.returncode == 0, result.stderr
    assert pq.read_table(output).num_rows == 0
    # Nothing to compare with the model's reference.
    assert run_json(result)["drift"] == {"feature_sum_psi": None, "predicted_class_psi": None, "level": "unknown"}
    assert "No drift figures for the batch" in result.stderr and "no rows were scored" in result.stderr


def bad_inputs(tmp_path, checkpoint):
    """(model, features, words the error must contain) for each way a user's file can be wrong."""
    good = tmp_path / "good.parquet"
    table = feature_table()
    pq.write_table(table, good)
    cases = {}

    def case(name, make_features=None, make_model=None, words=()):
        features, model = good, checkpoint
        if make_features:
            features = tmp_path / f"{name}.parquet"
            make_features(features)
        if make_model:
            model = tmp_path / f"{name}.pt"
            make_model(model)
        cases[name] = (model, features, words)

    case("missing_file", lambda p: None, words=("no such file",))
    case("not_parquet", lambda p: p.write_text("sample_id,f000\n1,2\n"), words=("not a readable Parquet",))
    case("truncated", lambda p: p.write_bytes(good.read_bytes()[:5000]), words=("Parquet",))
    case("missing_column", lambda p: pq.write_table(table.drop(["f100"]), p), words=("missing f100",))
    case(
        "extra_column",
        lambda p: pq.write_table(table.append_column("f784", table.column("f000")), p),
        words=("found 785",),
    )

    def strings(p):
        index = table.schema.get_field_index("f007")
        pq.write_table(table.set_column(index, "f007", table.column("f007").cast(pa.string())), p)

    case("string_features", strings, words=("f007", "string"))
    for name, value in (("nan", np.nan), ("infinite", np.inf)):

        def poisoned(p, value=value):
            column = table.column("f003").to_numpy().copy()
            column[7] = value
            index = table.schema.get_field_index("f003")
            pq.write_table(table.set_column(index, "f003", pa.array(column)), p)

        case(name, poisoned, words=("NaN, infinite",))
    case("model_missing", make_model=lambda p: None, words=("no such file",))
    case("model_not_ours", make_model=lambda p: torch.save({"weights": torch.zeros(3)}, p), words=("not a featuresum",))

    def wrong_shapes(p):
        bad = torch.load(checkpoint, weights_only=True)
        bad["model_config"]["hidden_dim"] = 64
        torch.save(bad, p)

    case("model_wrong_shapes", make_model=wrong_shapes, words=("do not fit",))
    case(
        "model_pickle",
        make_model=lambda p: p.write_bytes(pickle.dumps(Exploit(tmp_path / "pwned"), protocol=2)),
        words=("refused",),
    )
    case("model_garbage", make_model=lambda p: p.write_bytes(b"\x00" * 100), words=("refused",))
    case("model_text", make_model=lambda p: p.write_text("not a model"), words=("not a featuresum checkpoint",))
    case("model_directory", make_model=lambda p: p.mkdir(), words=("is a directory",))
    return cases


BAD_INPUTS = [
    "missing_file", "not_parquet", "truncated", "missing_column", "extra_column", "string_features",
    "nan", "infinite", "model_missing", "model_not_ours", "model_wrong_shapes", "model_pickle", "model_garbage",
    "model_text", "model_directory",
]  # fmt: skip


FOUND_WHILE_SCORING = {"nan", "infinite"}


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_user_file_gives_one_clear_line(cli, checkpoint, tmp_path, name):
    model, features, words = bad_inputs(tmp_path, checkpoint)[name]
    result, output = score(cli, model, features)
    culprit = model if name.startswith("model") else features
    if name in FOUND_WHILE_SCORING:
        # Values are checked while the file is scored (one read of a big file), so the run starts.
        last_error_line(result, str(culprit), *words)
    else:
        one_error_line(result, str(culprit), *words)
        assert "Beginning flow run" not in result.stderr
    assert not output.exists()
    assert not (tmp_path / "pwned").exists()

"""featuresum on S3-compatible object storage: moto's S3 server on loopback, the installed command, real objects."""

import json
import multiprocessing
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import SMALL, run_json
from prefect_servers import BIN, clean_environment, free_port, stop_process_group
from test_cli import one_error_line

import featuresum
from featuresum.flows import local_server
from featuresum.tasks import data, monitoring, storage
from featuresum.tasks.registry import Registry


@pytest.fixture
def on_store(object_store, cli, monkeypatch):
    """The store's AWS settings in this process (to look at objects) and in every command the test runs."""
    for name, value in object_store.env.items():
        monkeypatch.setenv(name, value)
    cli.env.update(object_store.env)
    return object_store


def read(uri: str) -> pa.Table:
    """A Parquet object, read back through featuresum's own storage layer."""
    return pq.ParquetFile(storage.open_input(uri)).read()


def states(summary: dict) -> list[str]:
    return sorted(summary["task_states"].values())


def test_run_on_object_storage_is_cached_everywhere_and_recomputes_what_changed(on_store, cli, tmp_path):
    bucket = on_store.bucket("runs")
    folders = ["--data-dir", f"{bucket}/data", "--artifacts-dir", f"{bucket}/artifacts"]
    first = run_json(cli("run", *SMALL, *folders, "--json"))
    assert states(first) == ["Completed"] * 7
    for key in ("train_data", "holdout_data", "checkpoint", "score_input", "predictions", "scored_with"):
        assert first[key].startswith(f"{bucket}/"), key
    assert read(first["predictions"]).num_rows == 700
    keys = on_store.keys("runs")
    assert {"artifacts/registry.sqlite", "artifacts/monitoring.parquet"} <= set(keys)
    assert not [key for key in keys if key.endswith(".tmp")]  # every temporary upload was copied and removed
    assert not (tmp_path / "data").exists() and not (tmp_path / "artifacts").exists()

    # Another machine: no local result storage of its own. Prefect's records are read from the bucket.
    cli.env["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = str(tmp_path / "another-machine")
    again = run_json(cli("run", *SMALL, *folders, "--json"))
    assert states(again) == ["Cached"] * 5 + ["Completed"]  # monitoring runs for every scored batch
    assert any(key.startswith("artifacts/.prefect-results/") for key in on_store.keys("runs"))
    assert not (tmp_path / "another-machine").exists()

    # A deleted object is recomputed, not served from the cache.
    storage.remove(first["predictions"])
    healed = run_json(cli("run", *SMALL, *folders, "--json"))
    assert healed["task_states"]["write-predictions"] == "Completed"
    assert healed["task_states"]["score-shard-0"] == "Completed"
    assert read(healed["predictions"]).equals(read(first["predictions"]))

    # So is an object overwritten in place, even by one of the same size: one byte of a feature value flipped.
    partition = first["score_input"]
    original = read(partition)
    content = bytearray(storage.read_bytes(partition))
    content[len(content) // 2] ^= 0xFF
    storage.write_bytes(partition, bytes(content))
    assert storage.identity(partition)["bytes"] == len(content)
    rewritten = run_json(cli("run", *SMALL, *folders, "--json"))
    generated = {name: state for name, state in rewritten["task_states"].items() if name.startswith("generate-score")}
    assert list(generated.values()) == ["Completed"]
    assert rewritten["task_states"]["train-model-2epochs-seed0"] == "Cached"
    assert read(partition).equals(original)

    # The registry and the monitoring history live in the bucket too.
    history = run_json(cli("monitor", "--artifacts-dir", f"{bucket}/artifacts", "--json"))
    assert [row["run_date"] for row in history] == [first["run_date"]]
    versions = run_json(cli("models", "list", "--artifacts-dir", f"{bucket}/artifacts", "--json"))
    assert [version["version"] for version in versions] == [1]
    assert versions[0]["checkpoint"] == first["checkpoint"] and versions[0]["aliases"] == ["champion"]
    champion = featuresum.load_model("champion", artifacts_dir=f"{bucket}/artifacts")
    assert champion.version == 1 and champion.checkpoint == first["checkpoint"]


def test_train_and_backfill_with_the_registry_on_the_store(on_store, cli):
    artifacts = f"{on_store.bucket('dated')}/artifacts"
    folders = ["--data-dir", "s3://dated/data", "--artifacts-dir", artifacts]
    sizes = ["--train-samples", "3000", "--holdout-samples", "800", "--epochs", "1"]
    tiny = [*sizes, "--score-samples", "300"]
    trained = run_json(cli("train", *sizes, "--date", "2026-04-01", *folders, "--json"))
    assert trained["checkpoint"].startswith(f"{artifacts}/model-") and trained["model_version"] == 1
    result = cli("backfill", "--from", "2026-04-01", "--to", "2026-04-02", *tiny, *folders, "--json")
    backfilled = json.loads(result.stdout)
    assert [run["state"] for run in backfilled["runs"]] == ["Completed", "Completed"]
    # The first date's challenger is the model `train` registered: the same version, found by its fingerprint.
    assert [run["model_version"] for run in backfilled["runs"]] == [1, 2]
    assert [row["run_date"] for row in monitoring.read_history(artifacts)] == ["2026-04-01", "2026-04-02"]
    assert backfilled["champion_version"] == Registry(artifacts).alias().version


def features_file(path, rows: int, seed: int, row_group_rows: int) -> None:
    batches = [storage.shard_to_batch(shard) for shard in data.generate_dataset(seed, "score", rows)]
    pq.write_table(pa.Table.from_batches(batches), path, row_group_size=row_group_rows)


def test_score_an_object_into_an_object_like_a_local_file(on_store, cli, checkpoint, tmp_path):
    bucket = on_store.bucket("scoring")
    features_file(tmp_path / "rows.parquet", 1500, 3, 500)
    model, rows = f"{bucket}/models/model.pt", f"{bucket}/in/rows.parquet"
    storage.write_bytes(model, checkpoint.read_bytes())
    storage.write_bytes(rows, (tmp_path / "rows.parquet").read_bytes())
    shards = ["--shard-rows", "500"]
    remote = ["--model", model, "--input", rows, "--output", f"{bucket}/out/predictions.parquet", *shards]
    scored = run_json(cli("score", *remote, "--artifacts-dir", f"{bucket}/artifacts", "--json"))
    assert scored["predictions"] == f"{bucket}/out/predictions.parquet"
    assert scored["checkpoint"] == model and scored["score_input"] == rows
    local = ["--model", str(checkpoint), "--input", str(tmp_path / "rows.parquet"), *shards]
    expected = run_json(cli("score", *local, "--output", str(tmp_path / "local.parquet"), "--json"))
    assert read(scored["predictions"]).equals(pq.read_table(expected["predictions"]))
    assert not on_store.keys("scoring", "out/predictions.parquet.parts/")  # shards are removed once combined

    repeat = run_json(cli("score", *remote, "--artifacts-dir", f"{bucket}/artifacts", "--json"))
    assert repeat["task_states"]["write-predictions"] == "Cached"
    # Other rows under the same key: fingerprinted again, scored again.
    features_file(tmp_path / "other.parquet", 1500, 4, 500)
    storage.write_bytes(rows, (tmp_path / "other.parquet").read_bytes())
    rescored = run_json(cli("score", *remote, "--artifacts-dir", f"{bucket}/artifacts", "--json"))
    assert rescored["task_states"]["write-predictions"] == "Completed"
    other = run_json(cli("score", *local[:2], "--input", str(tmp_path / "other.parquet"), *shards, "--json"))
    assert read(rescored["predictions"]).equals(pq.read_table(other["predictions"]))


@pytest.mark.parametrize(
    ("where", "settings", "message"),
    [
        ("s3://Not_A_Bucket/data", {}, "not an S3 location"),
        ("s3:///data", {}, "not an S3 location"),
        ("s3://no-such-bucket/data", {}, "no such bucket"),
        ("s3://errors/data", {"AWS_SECRET_ACCESS_KEY": "wrong"}, "secret key does not match"),
        ("s3://errors/data", {"AWS_ACCESS_KEY_ID": "AKIAUNKNOWN"}, "access key is not known"),
    ],
)
def test_object_store_mistakes_end_in_one_line_without_retries(on_store, cli, where, settings, message):
    if "errors" not in {bucket["Name"] for bucket in on_store.client().list_buckets()["Buckets"]}:
        on_store.bucket("errors")
    cli.env.update(settings)
    before = len(on_store.requests())
    result = cli("run", *SMALL, "--data-dir", where, check=False, timeout=120)
    one_error_line(result, "s3://", message)
    refused = [line for line in on_store.requests()[before:] if line["status"] in ("403", "404")]
    assert len(refused) <= 2, refused  # one check (and one request that names the cause), never a retry storm


def _register_many(store_env: dict, artifacts: str, writer: int, count: int) -> None:
    import os

    os.environ.update(store_env)
    registry = Registry(artifacts)
    for number in range(count):
        fingerprint = f"{writer:02d}-{number:02d}"
        registry.register(f"{artifacts}/model-{fingerprint}.pt", fingerprint, config={}, metrics={})
        row = {"run_date": f"2026-01-{number + 1:02d}", "model_fingerprint": fingerprint, "batch_fingerprint": "b"}
        monitoring.record(artifacts, row)


def test_concurrent_writers_lose_no_registry_or_history_update(on_store):
    artifacts = f"{on_store.bucket('concurrent')}/artifacts"
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_register_many, args=(on_store.env, artifacts, writer, 6)) for writer in range(4)]
    for process in writers:
        process.start()
    for process in writers:
        process.join(300)
        assert process.exitcode == 0
    assert len(Registry(artifacts).versions()) == 24
    assert len({version.fingerprint for version in Registry(artifacts).versions()}) == 24
    assert len(monitoring.read_history(artifacts)) == 24


# moto answers a ranged GET by reading the whole object first, so a request to a 3.1 GB object of a million rows
# takes seconds: 100,000 rows (315 MB, 4 row groups, a shard each) keep the test in CI's time; real stores read
# the range alone.
DASK_ROWS = 100_000


def test_dask_workers_with_nothing_but_the_bucket_score_in_shards(on_store, cli, checkpoint, tmp_path):
    bucket = on_store.bucket("dask")
    model, rows = f"{bucket}/models/model.pt", f"{bucket}/in/rows.parquet"
    storage.write_bytes(model, checkpoint.read_bytes())
    shards = (storage.shard_to_batch(shard) for shard in data.generate_dataset(5, "score", DASK_ROWS))
    storage.write_parquet(rows, storage.DATASET_SCHEMA, shards)
    common = ["--model", model, "--input", rows, "--shard-rows", "32768", "--artifacts-dir", f"{bucket}/artifacts"]
    default = run_json(cli("score", *common, "--output", f"{bucket}/out/default.parquet", "--json"))

    # A scheduler and two workers, each with its own working directory, HOME and TMPDIR: no disk in common.
    address = f"tcp://127.0.0.1:{free_port()}"
    api = local_server.server_status(Path(cli.env["PREFECT_HOME"]))["api_url"]  # started by the command above
    started, logs = [], []
    scheduler = [str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1]]
    started.append(subprocess.Popen([*scheduler, "--no-dashboard"], start_new_session=True, cwd=tmp_path))
    try:
        for number in range(2):
            home = tmp_path / f"worker-{number}"
            for folder in ("home", "tmp", "work"):
                (home / folder).mkdir(parents=True)
            env = clean_environment(**on_store.env, HOME=str(home / "home"), TMPDIR=str(home / "tmp"))
            env["PREFECT_API_URL"] = api
            logs.append(home / "worker.log")
            worker = [str(BIN / "dask"), "worker", address, "--nthreads", "1", "--no-dashboard"]
            worker += ["--local-directory", str(home / "tmp")]
            with logs[-1].open("w") as log:
                started.append(
                    subprocess.Popen(
                        worker, env=env, cwd=home / "work", stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                    )
                )
        runner = ["--runner", "dask", "--dask-address", address]
        on_dask = run_json(cli("score", *common, *runner, "--output", f"{bucket}/out/dask.parquet", "--json"))
    finally:
        for process in reversed(started):
            stop_process_group(process)

    assert [name for name in on_dask["task_states"] if name.startswith("score-shard")] == [
        f"score-shard-{index}" for index in range(4)
    ]
    expected, actual = read(default["predictions"]), read(on_dask["predictions"])
    assert expected.num_rows == DASK_ROWS
    assert actual.drop(["confidence"]).equals(expected.drop(["confidence"]))
    np.testing.assert_allclose(actual.column("confidence"), expected.column("confidence"), rtol=1e-5)
    # Each worker scored shards, reading the rows from the bucket and writing its shards back to it.
    for log in logs:
        lines = [line for line in log.read_text().splitlines() if "Scored" in line]
        assert lines and all(f"of {rows} " in line and f"into {bucket}/out/" in line for line in lines), lines
    assert not list(tmp_path.glob("worker-*/**/*.parquet"))


def test_an_unreachable_store_ends_in_one_line_with_exit_code_1(tmp_path):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = clean_environment(
        AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="y", AWS_DEFAULT_REGION="us-east-1"
    )
    command = [str(BIN / "featuresum"), "run", "--data-dir", "s3://bucket-1/data"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    one_error_line(result, "the object store failed", endpoint, code=1)


def test_two_scores_into_one_object_with_other_models_give_each_its_own_numbers(on_store, cli, checkpoint, tmp_path):
    from conftest import score_at_once_into_one_output, train_checkpoint

    bucket = on_store.bucket("race")
    features_file(tmp_path / "rows.parquet", 3000, 3, 500)
    storage.write_bytes(f"{bucket}/in/rows.parquet", (tmp_path / "rows.parquet").read_bytes())
    models = []
    for name, local in (("a", checkpoint), ("b", train_checkpoint(tmp_path / "other.pt", seed=1))):
        storage.write_bytes(f"{bucket}/models/{name}.pt", Path(local).read_bytes())
        models.append(f"{bucket}/models/{name}.pt")
    output, artifacts = f"{bucket}/out/p.parquet", f"{bucket}/artifacts"
    score_at_once_into_one_output(
        cli, models, f"{bucket}/in/rows.parquet", tmp_path / "rows.parquet", output, artifacts
    )

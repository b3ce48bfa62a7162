"""Storage rules that caching and recovery rest on: manifests, shard plans, leftovers, locks, full disks, retries."""

import errno
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from featuresum.tasks import data, storage
from featuresum.tasks.errors import DiskFull, InputError
from featuresum.tasks.task_policy import is_transient_error


def write_file(path, text="content"):
    path.write_text(text)
    return path


def test_a_manifest_vouches_only_for_the_file_and_the_key_it_recorded(tmp_path):
    path = write_file(tmp_path / "out.bin")
    storage.write_manifest(path, key="key-a")
    assert storage.is_intact(path, "key-a")
    assert not storage.is_intact(path, "key-b")  # another run's settings wrote it

    path.write_text("content")  # same bytes and size, but rewritten
    assert not storage.is_intact(path, "key-a")


def test_a_file_replaced_with_its_manifest_by_another_valid_output_is_not_taken_for_ours(tmp_path):
    ours, theirs = write_file(tmp_path / "ours.bin", "A"), write_file(tmp_path / "theirs.bin", "B")
    storage.write_manifest(ours, key="key-a")
    storage.write_manifest(theirs, key="key-b")
    os.replace(theirs, ours)
    os.replace(storage.manifest_path(theirs), storage.manifest_path(ours))
    assert not storage.is_intact(ours, "key-a")


def test_a_deleted_file_or_manifest_is_not_intact(tmp_path):
    path = write_file(tmp_path / "out.bin")
    storage.write_manifest(path, key="k")
    storage.manifest_path(path).unlink()
    assert not storage.is_intact(path, "k")
    storage.write_manifest(path, key="k")
    path.unlink()
    assert not storage.is_intact(path, "k")


def test_a_manifest_describes_a_model_only_while_the_file_holds_that_content(tmp_path):
    path = write_file(tmp_path / "model.pt")
    written = storage.write_manifest(path, key="k", reference={"edges": [1.0]})
    assert storage.manifest_of(path, written["fingerprint"])["reference"] == {"edges": [1.0]}
    assert storage.manifest_of(path, "another model's fingerprint") is None
    path.write_text("content")  # rewritten: the manifest no longer vouches for it
    assert storage.manifest_of(path, written["fingerprint"]) is None


@pytest.mark.parametrize("type_", [pa.float64(), pa.float32(), pa.int64(), pa.int32()])
def test_column_values_match_pyarrow_also_for_slices_and_nulls(type_):
    column = pa.array(range(-5, 95), type=type_)
    for array in (column, column.slice(7, 40), column.slice(0, 0), pa.array([1, None, 3], type=type_)):
        expected, got = array.to_numpy(zero_copy_only=False), storage.values(array)
        assert got.dtype == expected.dtype
        np.testing.assert_array_equal(got, expected)  # NaN where a value is missing


def test_column_values_do_not_import_pandas(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"x": pa.array([0.5, 1.5, 2.5])}), path)
    script = (
        "import sys, pyarrow.parquet as pq; from featuresum.tasks import storage; "
        f"batch = next(pq.ParquetFile({str(path)!r}).iter_batches()); "
        "print(storage.values(batch.column('x')).sum(), 'pandas' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["4.5", "False"]


def feature_file(path, row_group_rows):
    batches = [storage.shard_to_batch(data.generate_shard(0, "s", i, rows)) for i, rows in enumerate(row_group_rows)]
    with pq.ParquetWriter(path, storage.DATASET_SCHEMA) as writer:
        for batch in batches:
            writer.write_table(pa.Table.from_batches([batch]))
    return path


def test_shards_are_whole_consecutive_row_groups_of_at_least_shard_rows(tmp_path):
    path = feature_file(tmp_path / "f.parquet", [10, 10, 10, 5])
    assert storage.row_group_shards(path, 20) == [[0, 1], [2, 3]]
    assert storage.row_group_shards(path, 1) == [[0], [1], [2], [3]]
    assert storage.row_group_shards(path, 1000) == [[0, 1, 2, 3]]


def test_shard_files_are_named_by_what_shapes_them(tmp_path):
    out = tmp_path / "p.parquet"
    spec = {"model": "a", "features": "x", "row_groups": [0, 1], "index": 0, "device": "cpu"}
    assert storage.part_path(out, 0, spec) == storage.part_path(out, 0, dict(spec))
    assert storage.part_path(out, 0, spec) != storage.part_path(out, 0, {**spec, "row_groups": [0]})
    assert storage.part_path(out, 0, spec) != storage.part_path(out, 0, {**spec, "model": "b"})


def aged(path, seconds):
    then = time.time() - seconds
    os.utime(path, (then, then))
    return path


def test_leftover_temporary_files_are_swept_by_age_never_a_live_writers(tmp_path):
    gone = subprocess.Popen(["true"])
    gone.wait()

    def leftover(folder, name, pid, age=0):
        path = write_file(folder / f".{name}.{pid}-{uuid.uuid4().hex}.tmp")
        return aged(path, age) if age else path

    old_dead = leftover(tmp_path, "model.pt", gone.pid, 7200)
    old_live = leftover(tmp_path, "data.parquet", os.getpid(), 7200)
    young_dead = leftover(tmp_path, "other.parquet", gone.pid)
    nested = tmp_path / "p.parquet.parts"
    nested.mkdir()
    old_nested = leftover(nested, "part-00000.parquet", gone.pid, 7200)
    foreign = aged(write_file(tmp_path / ".editor-swap.tmp"), 7200)  # not a name featuresum makes
    kept = write_file(tmp_path / "model.pt")

    removed = storage.sweep_leftovers(tmp_path)
    assert sorted(removed) == sorted([old_dead, old_nested])
    assert old_live.exists() and young_dead.exists() and kept.exists() and foreign.exists()


def test_the_code_version_hashes_every_module_under_tasks_subpackages_included(tmp_path):
    for name in ("b.py", "a/z.py", "a/b/c.py", "a/notes.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        write_file(tmp_path / name)
    assert [name for name, _ in storage.source_files(tmp_path)] == ["a/b/c.py", "a/z.py", "b.py"]
    assert {"storage/parquet.py", "prefect_tasks.py"} <= {name for name, _ in storage.source_files()}


def test_a_lock_lets_one_producer_work_at_a_time(tmp_path):
    target, order = tmp_path / "out.bin", []

    def produce(name):
        with storage.local_lock(target):
            order.append(f"{name} in")
            time.sleep(0.3)
            order.append(f"{name} out")

    threads = [threading.Thread(target=produce, args=(name,)) for name in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert order in (["a in", "a out", "b in", "b out"], ["b in", "b out", "a in", "a out"])


def test_a_full_disk_fails_at_once_naming_the_folder(tiny_disk):
    batches = map(storage.shard_to_batch, data.generate_dataset(0, "train", 2000))
    with pytest.raises(DiskFull, match=f"no space left in {tiny_disk}") as raised:
        storage.write_parquet(tiny_disk / "train.parquet", storage.DATASET_SCHEMA, batches)
    assert not is_transient_error(raised.value)
    assert list(tiny_disk.iterdir()) == []  # nothing half-written is left behind


@pytest.mark.parametrize(
    "code", [errno.EIO, errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE]
)
def test_failures_that_can_heal_are_retried(code):
    assert is_transient_error(OSError(code, os.strerror(code)))


@pytest.mark.parametrize(
    "code",
    [errno.ENOENT, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.EROFS, errno.ENOSPC],
)
def test_failures_that_cannot_heal_are_not_retried(code):
    assert not is_transient_error(OSError(code, os.strerror(code)))


def test_bad_input_and_ordinary_errors_are_not_retried():
    assert not is_transient_error(InputError("x.parquet: features contain NaN"))
    assert not is_transient_error(ValueError("bug"))
    assert is_transient_error(TimeoutError())
    assert is_transient_error(ConnectionResetError())


def test_s3_locations_are_parsed_checked_and_joined_without_a_store():
    uri = storage.at("s3://bucket-1/data//train/")
    assert uri == "s3://bucket-1/data/train"
    assert (
        storage.join(uri, "date=2026-01-01", "part-0.parquet")
        == "s3://bucket-1/data/train/date=2026-01-01/part-0.parquet"
    )
    assert storage.parent("s3://bucket-1/data/model.pt") == "s3://bucket-1/data"
    assert storage.parent("s3://bucket-1/model.pt") == "s3://bucket-1"
    assert storage.manifest_path("s3://bucket-1/a/model.pt") == "s3://bucket-1/a/.model.pt.json"
    assert storage.partial_checkpoint_path("s3://bucket-1/a/model-1.pt") == "s3://bucket-1/a/model-1.partial.pt"
    assert storage.resolve("s3://bucket-1/x/") == "s3://bucket-1/x"
    assert storage.resolve("relative") == Path("relative").resolve()
    assert not storage.is_remote(Path("s3://bucket-1/x"))  # a Path is always local
    for bad in ("s3://", "s3:///key", "s3://Upper_Case/key", "s3://ab/key", "s3://bucket-1/a/../b"):
        with pytest.raises(InputError, match="S3"):
            storage.at(bad)


def _with_nulls(tmp_path, column: str, rows: list[int]) -> Path:
    """A feature file of 300 generated rows whose `column` is null in `rows`."""
    table = pa.Table.from_batches([storage.shard_to_batch(data.generate_shard(3, "score", 0, 300))])
    index = table.schema.get_field_index(column)
    mask = np.zeros(table.num_rows, dtype=bool)
    mask[rows] = True
    values = pa.array(table.column(column).to_numpy(), mask=mask)
    path = tmp_path / f"{column}.parquet"
    pq.write_table(table.set_column(index, column, values), path, row_group_size=100)
    return path


@pytest.mark.parametrize("column", ["sample_id", "f010"])
def test_a_null_sample_id_or_feature_is_refused_naming_the_column_and_the_count(tmp_path, column):
    path = _with_nulls(tmp_path, column, [3, 150, 151])
    with pytest.raises(InputError, match=f"column {column} has 3 null values"):
        list(storage.iter_feature_batches(path))


def test_rows_without_a_label_are_scored_but_left_out_of_the_accuracy(tmp_path):
    import torch

    from featuresum.tasks import scoring
    from featuresum.tasks.model import FeatureSumMLP

    path = _with_nulls(tmp_path, "label", [0, 5, 299])
    torch.manual_seed(0)
    model, summary = FeatureSumMLP(), scoring.ScoreSummary()
    scored = pa.Table.from_batches(
        scoring.score_batches(model, storage.iter_feature_batches(path), torch.device("cpu"), summary)
    )
    labels = pq.read_table(path).column("label")
    known = labels.is_valid().to_numpy(zero_copy_only=False)
    hits = scored.column("predicted_class").to_numpy()[known] == labels.drop_null().to_numpy()
    assert (summary.rows, summary.labelled, summary.correct) == (300, 297, int(hits.sum()))
    assert summary.accuracy == pytest.approx(hits.mean())

    with pytest.raises(InputError, match="needs a label on every row"):
        storage.read_dataset(path)


def test_scoring_many_batches_while_reading_ahead_gives_each_row_its_own_sum_and_class(tmp_path):
    """Batches share two buffers and the next is read while one is scored: no row may get another's values."""
    import torch

    from featuresum.tasks import scoring
    from featuresum.tasks.model import FeatureSumMLP

    path = tmp_path / "rows.parquet"
    storage.write_parquet(
        path, storage.DATASET_SCHEMA, map(storage.shard_to_batch, data.generate_dataset(3, "t", 1000))
    )
    torch.manual_seed(0)
    model, summary, threads = FeatureSumMLP().eval(), scoring.ScoreSummary(), torch.get_num_threads()
    batches = storage.iter_feature_batches(path, batch_rows=64, reuse=True)
    scored = pa.Table.from_batches(scoring.score_batches(model, batches, torch.device("cpu"), summary))
    table = pq.read_table(path)
    features = features_of(table)
    with torch.no_grad():
        expected = model(torch.from_numpy(features)).argmax(dim=1).numpy()
    assert scored.column("sample_id").to_pylist() == table.column("sample_id").to_pylist()
    np.testing.assert_allclose(scored.column("feature_sum").to_numpy(), features.sum(axis=1, dtype=np.float64))
    assert (scored.column("predicted_class").to_numpy() == expected).all()
    assert summary.rows == 1000 and torch.get_num_threads() == threads  # the core lent to the reader is given back

    previous = None
    for _, features, _ in storage.iter_feature_batches(path, batch_rows=64, reuse=True):
        if previous is not None:  # what scoring holds while the next batch is read is still its batch
            assert np.array_equal(*previous)
        previous = (features, features.copy())
    # Without reuse (the default) every batch kept is its own.
    kept = np.concatenate([block for _, block, _ in storage.iter_feature_batches(path, batch_rows=64)], axis=1)
    assert np.array_equal(kept.T, features_of(table))


def features_of(table):
    return np.stack([table.column(name).to_numpy() for name in storage.FEATURE_COLUMNS], axis=1)


def test_concurrent_scorers_give_torch_its_threads_back_whatever_order_they_finish_in():
    """The second scorer starts while the first holds a core back; the first finishes first."""
    import torch

    from featuresum.tasks import cpu

    original, seen = torch.get_num_threads(), []
    torch.set_num_threads(2)  # the suite runs torch on one thread, where there is no core to lend
    second_in, first_out = threading.Event(), threading.Event()

    def second():
        with cpu.one_core_lent(torch):
            second_in.set()
            first_out.wait(10)
            seen.append(torch.get_num_threads())

    def first():
        with cpu.one_core_lent(torch):
            late = threading.Thread(target=second)  # created while the core is lent
            late.start()
            second_in.wait(10)
        first_out.set()
        late.join(10)

    try:
        scorer = threading.Thread(target=first)
        scorer.start()
        scorer.join(20)
        fresh = []
        later = threading.Thread(target=lambda: fresh.append(torch.get_num_threads()))
        later.start()
        later.join(10)
        assert seen == [1] and torch.get_num_threads() == 2 and fresh == [2]
    finally:
        torch.set_num_threads(original)


def test_a_feature_file_is_known_by_its_blake3_and_a_checkpoint_by_its_sha256(tmp_path):
    import hashlib

    from blake3 import blake3

    path = tmp_path / "bytes.bin"
    path.write_bytes(os.urandom(9 * 2**20 + 7))  # more than two reads
    content = path.read_bytes()
    assert storage.fingerprint(path) == hashlib.sha256(content).hexdigest()
    assert storage.fingerprint(path, "blake3") == "blake3:" + blake3(content).hexdigest()


@pytest.mark.skipif(sys.platform != "linux", reason="page-cache residency is read with util-linux's fincore")
def test_a_file_written_uncached_leaves_the_page_cache_as_it_is_written(tmp_path, monkeypatch):
    monkeypatch.setattr(storage.parquet, "UNCACHED_SYNC_BYTES", 2**20)
    shards = [data.generate_shard(6, "train", index, 500) for index in range(16)]  # 1.6 MB each
    resident = {}
    for cached in (True, False):
        path = tmp_path / f"cached-{cached}.parquet"
        storage.write_parquet(path, storage.DATASET_SCHEMA, map(storage.shard_to_batch, shards), cached=cached)
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)], capture_output=True)
        resident[cached] = int(out.stdout) / path.stat().st_size
    assert (tmp_path / "cached-True.parquet").read_bytes() == (tmp_path / "cached-False.parquet").read_bytes()
    # Written cached, the whole file stays in memory; uncached, about the last batch does.
    assert resident[True] > 0.9 and resident[False] < 0.25, resident

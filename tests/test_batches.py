"""Training rows in memory and streamed from Parquet: one order, the same batches, the same model; the memory plan."""

import logging
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
import torch

from featuresum.tasks import batches, data, fitting, handoff, memory, storage, training
from featuresum.tasks.errors import InputError
from featuresum.tasks.settings import TrainConfig


def write_rows(path, seed, sizes):
    """A labelled feature file with one row group of each size (generated rows); returns its tensors."""
    xs, ys = [], []
    with pq.ParquetWriter(path, storage.DATASET_SCHEMA, **storage.PARQUET_OPTIONS) as writer:
        for index, rows in enumerate(sizes):
            shard = data.generate_shard(seed, "train", index, rows)
            writer.write_batch(storage.shard_to_batch(shard))
            xs.append(shard.features.T)
            ys.append(shard.label)
    return torch.cat(xs).contiguous(), torch.cat(ys)


@pytest.fixture
def files(tmp_path):
    """Two files of uneven row groups, and their rows as tensors."""
    first, second = tmp_path / "a.parquet", tmp_path / "b.parquet"
    xa, ya = write_rows(first, 1, [700, 300, 500])
    xb, yb = write_rows(second, 2, [900, 100])
    return [first, second], torch.cat([xa, xb]), torch.cat([ya, yb])


def test_every_block_is_in_one_run_and_every_row_in_its_order():
    blocks = [700, 300, 500, 900, 100]
    plan = batches.epoch_plan(blocks, shuffle_rows=1000, seed=3, epoch=0)
    assert sorted(b for run, _ in plan for b in run) == list(range(5))
    for run, order in plan:
        assert sorted(order.tolist()) == list(range(sum(blocks[b] for b in run)))
    # Every run but the last holds at least shuffle_rows rows; another epoch draws another order.
    assert all(sum(blocks[b] for b in run) >= 1000 for run, _ in plan[:-1])
    orders = [torch.cat([order for _, order in batches.epoch_plan(blocks, 1000, 3, epoch)]) for epoch in (0, 1)]
    assert not torch.equal(*orders)


def test_streamed_rows_give_the_batches_of_the_same_rows_in_memory(files):
    paths, x, y = files
    blocks = [700, 300, 500, 900, 100]
    config = TrainConfig(batch_size=96, seed=4, shuffle_rows=1000)
    streamed = batches.Streamed(batches.row_groups(paths), torch.device("cpu"))
    assert streamed.blocks == blocks and len(streamed) == len(x)
    in_memory = batches.InMemory(x, y, blocks)
    for epoch in (0, 1):
        pairs = list(zip(streamed.batches(config, epoch), in_memory.batches(config, epoch), strict=True))
        assert len(pairs) == -(-len(x) // 96)
        for (sx, sy), (mx, my) in pairs:
            assert torch.equal(sx, mx) and torch.equal(sy, my)
    # A shuffle across runs of blocks, not the files' order.
    first_x, _ = next(in_memory.batches(config, 0))
    assert not torch.equal(first_x, x[:96])


def test_a_model_trained_on_streamed_rows_is_the_model_trained_in_memory(files):
    paths, x, y = files
    config = TrainConfig(epochs=2, batch_size=128, seed=5, shuffle_rows=1000)
    holdout = (x[:300], y[:300])
    models = []
    for rows in (
        batches.Streamed(batches.row_groups(paths), torch.device("cpu")),
        batches.InMemory(x, y, [700, 300, 500, 900, 100]),
    ):
        state = training.new_training_state(config, -(-len(x) // 128), torch.device("cpu"))
        training.fit(state, rows, holdout, config)
        models.append(state)
    streamed, in_memory = models
    assert streamed.history == in_memory.history
    for name, weight in streamed.model.state_dict().items():
        assert torch.equal(weight, in_memory.model.state_dict()[name]), name


def test_the_memory_plan_streams_rows_that_do_not_fit_and_refuses_what_no_mode_fits():
    row = memory.ROW_BYTES
    assert memory.memory_plan(10_000, 1_000, 2_000, budget_mb=100).mode == "memory"
    streamed = memory.memory_plan(1_000_000, 1_000, 2_000, budget_mb=1_000)
    assert streamed.mode == "stream"
    assert streamed.needed == (memory.STREAM_COPIES * (2_000 + data.SHARD_ROWS) + 1_000) * row
    with pytest.raises(InputError, match="even when streaming its rows"):
        memory.memory_plan(1_000_000, 1_000_000, 2_000, budget_mb=1_000)
    # Unset, the budget is most of what the machine has available.
    assert 0 < memory.memory_plan(10, 10, 10).budget


def test_training_a_checkpoint_streams_its_rows_under_a_small_budget(tmp_path, caplog):
    train_path, holdout_path = tmp_path / "train.parquet", tmp_path / "holdout.parquet"
    write_rows(train_path, 8, [500] * 12)
    write_rows(holdout_path, 9, [400])
    settings = TrainConfig(epochs=2, batch_size=128, seed=5, shuffle_rows=500)
    train = [{"path": str(train_path), "fingerprint": storage.fingerprint(train_path)}]
    holdout = {"path": str(holdout_path), "fingerprint": storage.fingerprint(holdout_path)}
    manifests, logger = {}, logging.getLogger("test-batches")
    # 6,400 rows take 19 MB in memory; streamed, 3 buffers of 1,000 rows and the held-out rows take 11 MB.
    for budget in (15, 1000):
        with caplog.at_level(logging.INFO, logger="test-batches"):
            path = tmp_path / f"model-{budget}.pt"
            manifests[budget] = fitting.train_checkpoint(
                train, holdout, settings, "cpu", path, "key", memory_mb=budget, logger=logger
            )
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Training on")]
    assert "streamed from disk, shuffled in runs of at least 500" in lines[0] and "held in memory" in lines[1], lines
    assert manifests[15]["metrics"] == manifests[1000]["metrics"]
    assert manifests[15]["reference"] == manifests[1000]["reference"]
    assert manifests[15]["metrics"]["val_accuracy"] > 0.4
    with pytest.raises(InputError, match="even when streaming"):
        fitting.train_checkpoint(train, holdout, settings, "cpu", tmp_path / "m.pt", "key", memory_mb=5, logger=logger)


def test_rows_handed_over_by_generation_are_the_rows_of_its_file(tmp_path):
    path, rows = str(tmp_path / "part-0.parquet"), data.SHARD_ROWS + 700
    kept = {"path": path, "fingerprint": "spec"}
    with handoff.keeping([path]):
        assert handoff.wanted(path) and not handoff.wanted(str(tmp_path / "other.parquet"))
        collector = handoff.Collector(rows)
        shards = collector.collect(data.generate_dataset(4, "train", rows))
        storage.write_parquet(path, storage.DATASET_SCHEMA, map(storage.shard_to_batch, shards))
        handoff.keep(path, "spec", collector.rows())
        # Only the file with that fingerprint, only a window of that one file, and only once.
        assert handoff.take([{**kept, "fingerprint": "other"}]) is None and handoff.take([kept, kept]) is None
        x, y = handoff.take([kept])
        assert handoff.take([kept]) is None
        read_x, read_y = storage.read_dataset(path)
        assert torch.equal(x, read_x) and torch.equal(y, read_y)
        handoff.keep(path, "spec", (x, y))
    # Released when the step ends; rows nobody asks for are never kept.
    assert not handoff.wanted(path) and handoff.take([kept]) is None
    handoff.keep(path, "spec", (x, y))
    assert handoff.take([kept]) is None


def test_a_run_trains_on_its_generated_rows_without_reading_them_back(prefect, tmp_path):
    from test_flows import run_pipeline

    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("prefect.task_runs")

    def trained(artifacts: str, **options) -> tuple[dict, str]:
        lines.clear()
        logger.addHandler(handler)
        try:
            summary = run_pipeline(tmp_path, artifacts_dir=str(tmp_path / artifacts), **options)
        finally:
            logger.removeHandler(handler)
        [line] = [line for line in lines if line.startswith("Training on")]
        return summary, line

    handed, line = trained("a")
    assert "held in memory" in line and line.endswith(", handed over as generated"), line
    # The same partitions, now cached, are read back from their files: the very same model.
    read, line = trained("b")
    assert "held in memory" in line and "handed over" not in line, line
    assert read["metrics"] == handed["metrics"] and read["checkpoint"] != handed["checkpoint"]


def test_rows_handed_over_count_as_memory_available_to_training(tmp_path, monkeypatch, caplog):
    # The rows generation holds for training were taken from what is available: counted back, they still fit.
    files, held = {}, 0
    with handoff.keeping([str(tmp_path / "train.parquet"), str(tmp_path / "holdout.parquet")]):
        for stream, rows in (("train", 3000), ("holdout", 800)):
            path = str(tmp_path / f"{stream}.parquet")
            collector = handoff.Collector(rows)
            shards = collector.collect(data.generate_dataset(4, stream, rows))
            storage.write_parquet(path, storage.DATASET_SCHEMA, map(storage.shard_to_batch, shards))
            handoff.keep(path, stream, collector.rows())
            files[stream] = {"path": path, "fingerprint": stream}
            held += sum(t.nbytes for t in collector.rows())
        available = held // 2
        monkeypatch.setattr(memory.psutil, "virtual_memory", lambda: SimpleNamespace(available=available))
        settings = TrainConfig(epochs=1, batch_size=128, seed=5, shuffle_rows=500)
        logger = logging.getLogger("test-handed")
        with caplog.at_level(logging.INFO, logger="test-handed"):
            fitting.train_checkpoint(
                [files["train"]], files["holdout"], settings, "cpu", tmp_path / "m.pt", "key", logger=logger
            )
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Training on")]
    assert "held in memory" in line and line.endswith("handed over as generated"), line

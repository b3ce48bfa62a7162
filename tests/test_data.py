"""The labelling rule and deterministic, vectorised generation."""

from datetime import date, timedelta

import pyarrow.parquet as pq
import pytest
import torch

from featuresum.tasks import data, storage


def seed_rule(feature_sum: float) -> int:
    """The original script's if/elif chain, kept verbatim as the reference."""
    for label, bound in enumerate((-10, -5, 0, 5, 10, 15, 20, 25, 30)):
        if feature_sum < bound:
            return label
    return 9


@pytest.mark.parametrize(
    ("value", "label"), [(-10.001, 0), (-10.0, 1), (-5.0, 2), (-0.001, 2), (0.0, 3), (29.999, 8), (30.0, 9), (99, 9)]
)
def test_rule_at_the_boundaries(value, label):
    assert int(data.label_rule(torch.tensor([value], dtype=torch.float64))) == label


def test_rule_matches_the_original_script():
    sums = torch.randn(5000, dtype=torch.float64) * 28
    assert data.label_rule(sums).tolist() == [seed_rule(float(s)) for s in sums]


def test_generated_labels_follow_the_rule():
    shard = data.generate_shard(seed=3, stream="train", index=0, rows=2000)
    assert shard.features.shape == (data.NUM_FEATURES, 2000)
    assert shard.features.dtype == torch.float32
    assert torch.allclose(shard.feature_sum, shard.features.double().sum(dim=0))
    assert torch.equal(shard.label, data.label_rule(shard.feature_sum))
    assert set(shard.label.tolist()) == set(range(data.NUM_CLASSES))


def test_full_shards_do_not_depend_on_dataset_size():
    small = list(data.generate_dataset(1, "train", data.SHARD_ROWS + 5))
    large = list(data.generate_dataset(1, "train", 2 * data.SHARD_ROWS))
    assert [len(s.label) for s in small] == [data.SHARD_ROWS, 5]
    assert torch.equal(small[0].features, large[0].features)
    assert small[1].sample_id.tolist() == list(range(data.SHARD_ROWS, data.SHARD_ROWS + 5))


def test_reused_buffers_give_the_same_shards_each_valid_until_the_one_after():
    day, rows = date(2026, 5, 1), 3 * data.SHARD_ROWS + 11
    fresh = list(data.generate_dataset(2, "train", rows, day, drift=0.01))
    reused = data.generate_dataset(2, "train", rows, day, drift=0.01, reuse=True)
    previous, buffers = None, set()
    for expected, shard in zip(fresh, reused, strict=True):
        buffers.add(shard.features.data_ptr())
        assert torch.equal(shard.features, expected.features) and torch.equal(shard.label, expected.label)
        if previous is not None:  # the last shard is still intact while this one is in hand
            assert torch.equal(previous[0].features, previous[1])
        previous = (shard, expected.features)
    assert len(buffers) == 2 < len(fresh)


def test_streams_and_seeds_differ():
    def first(seed, stream):
        return data.generate_shard(seed, stream, 0, 10).features

    assert not torch.equal(first(0, "train"), first(0, "holdout"))
    assert not torch.equal(first(0, "train"), first(1, "train"))


def write(path, seed, rows=1500):
    batches = map(storage.shard_to_batch, data.generate_dataset(seed, "train", rows))
    return storage.write_parquet(path, storage.DATASET_SCHEMA, batches).rows


def test_same_seed_gives_identical_parquet_bytes(tmp_path):
    assert write(tmp_path / "a.parquet", 7) == 1500
    write(tmp_path / "b.parquet", 7)
    write(tmp_path / "c.parquet", 8)
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()
    assert (tmp_path / "a.parquet").read_bytes() != (tmp_path / "c.parquet").read_bytes()


def test_dataset_schema(tmp_path):
    write(tmp_path / "a.parquet", 0, rows=10)
    schema = pq.read_schema(tmp_path / "a.parquet")
    assert schema.names == ["sample_id", *(f"f{i:03d}" for i in range(784)), "label"]
    assert str(schema.field("sample_id").type) == "int64"
    assert {str(schema.field(f"f{i:03d}").type) for i in range(784)} == {"float"}
    assert str(schema.field("label").type) == "int64"
    table = pq.read_table(tmp_path / "a.parquet")
    assert table.column("sample_id").to_pylist() == list(range(10))


def test_a_dated_partition_is_seeded_by_seed_stream_and_date(tmp_path):
    day = date(2026, 3, 1)
    first = next(data.generate_dataset(0, "train", 500, day))
    again = next(data.generate_dataset(0, "train", 500, day))
    assert torch.equal(first.features, again.features)
    for other in (
        next(data.generate_dataset(0, "train", 500, date(2026, 3, 2))),
        next(data.generate_dataset(0, "score", 500, day)),
    ):
        assert not torch.equal(first.features, other.features)


def test_drift_moves_every_features_mean_per_day_and_keeps_the_rule():
    day = data.REFERENCE_DATE + timedelta(days=40)
    shard = next(data.generate_dataset(1, "train", 20_000, day, drift=0.01))
    assert shard.features.mean().item() == pytest.approx(0.4, abs=0.01)
    assert torch.equal(shard.label, data.label_rule(shard.features.double().sum(dim=0)))
    undrifted = next(data.generate_dataset(1, "train", 20_000, day))
    assert undrifted.features.mean().item() == pytest.approx(0.0, abs=0.01)


def test_partitions_are_hive_folders_that_pandas_reads_as_one_dataset(tmp_path):
    import pandas as pd

    spec = {"stream": "train", "rows": 300, "seed": 0, "drift": 0.0}
    days = [date(2026, 3, 1), date(2026, 3, 2)]
    paths = [storage.partition_path(tmp_path, "train", spec, day) for day in days]
    assert paths[0].parents[1] == paths[1].parents[1]
    assert paths[0].parent.name == "date=2026-03-01"
    for path, day in zip(paths, days, strict=True):
        batches = map(storage.shard_to_batch, data.generate_dataset(0, "train", 300, day))
        storage.write_parquet(path, storage.DATASET_SCHEMA, batches)
        storage.write_manifest(path, key="k")
    frame = pd.read_parquet(paths[0].parents[1])
    assert len(frame) == 600
    assert sorted(frame["date"].astype(str).unique()) == ["2026-03-01", "2026-03-02"]

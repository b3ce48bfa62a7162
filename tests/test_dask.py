"""Sharded scoring on a Dask LocalCluster gives exactly the predictions of the default runner."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from prefect_dask import DaskTaskRunner

from featuresum.flows.pipeline import score_flow
from featuresum.tasks import data, storage


def test_dask_runner_scores_shards_identically(prefect, checkpoint, tmp_path):
    shards = [storage.shard_to_batch(data.generate_shard(9, "dask", 0, 5000))]
    # Five row groups of 1,000 rows, scored in shards of two row groups: three shard task runs.
    pq.write_table(pa.Table.from_batches(shards), tmp_path / "rows.parquet", row_group_size=1000)
    options = {"model": str(checkpoint), "input": str(tmp_path / "rows.parquet"), "shard_rows": 2000}

    default = score_flow(**options, output=str(tmp_path / "default.parquet"))
    cluster = {"n_workers": 2, "processes": True, "threads_per_worker": 1, "host": "127.0.0.1"}
    cluster["dashboard_address"] = None
    on_dask = score_flow.with_options(task_runner=DaskTaskRunner(cluster_kwargs=cluster))
    distributed = on_dask(**options, output=str(tmp_path / "dask.parquet"))

    # Two input fingerprints (unchanged files: cached from the first run), three shards, predictions, monitoring.
    assert sorted(distributed["task_runs"].values()) == ["Cached"] * 2 + ["Completed"] * 5
    expected, actual = pq.read_table(default["predictions"]), pq.read_table(distributed["predictions"])
    assert expected.num_rows == 5000
    assert actual.drop(["confidence"]).equals(expected.drop(["confidence"]))
    # Workers use one BLAS thread each, so float32 softmax values may differ in the last bits.
    np.testing.assert_allclose(actual.column("confidence"), expected.column("confidence"), rtol=1e-5)
    assert not (tmp_path / "dask.parquet.parts").exists()  # shards are removed once combined

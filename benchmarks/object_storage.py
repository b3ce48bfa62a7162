"""Figure 14: scoring from and to S3-compatible object storage (moto's server on loopback) against local disk.

Both sides run the pipeline's own scoring code (`pipeline_calls.score_parquet`: load the checkpoint,
stream the feature file, write the predictions, record the manifest) on the same bytes, interleaved.
moto is a Python test double that holds objects in temporary files: it is far slower than a real
store, so the ratio is an upper bound of what object storage costs, not an estimate of it.
"""

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from benchmarks import pipeline_calls
from benchmarks.measure import REPO, HostLoad, Spread, interleave, ratios, run_watching_rss, timed
from benchmarks.report import Check, Figure, table
from benchmarks.sizes import Sizes
from featuresum.tasks import storage

TITLE = "14. Scoring on object storage"
SEED = 0
BUCKET = "s3://featuresum-bench"
RSS_LIMIT_MIB = 1536.0
STORE = {
    "AWS_ACCESS_KEY_ID": "featuresum",
    "AWS_SECRET_ACCESS_KEY": "featuresum",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@contextmanager
def moto(workdir: Path) -> Iterator[dict[str, str]]:
    """moto's S3 server on a free loopback port with one bucket, its settings in this process's environment."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = {**STORE, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    command = [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    with (workdir / "moto.log").open("w") as log:
        env = {**os.environ, "TMPDIR": str(workdir)}
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    saved = {name: os.environ.get(name) for name in settings}
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{settings['AWS_ENDPOINT_URL']}/moto-api/", timeout=2).close()
                break
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline:
                    raise RuntimeError("moto did not start") from None
                time.sleep(0.2)
        os.environ.update(settings)
        from featuresum.tasks import s3

        s3.client().create_bucket(Bucket=BUCKET.removeprefix("s3://"))
        yield settings
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.terminate()
        server.wait(30)


def _read_all(path: storage.Location) -> None:
    for _ in storage.iter_feature_batches(path):
        pass


def _peak_rss(model: str, rows: str, output: str) -> tuple[float, float]:
    """(seconds, peak RSS in MiB) of scoring in a process of its own, from and to the store."""
    command = [sys.executable, "-m", "benchmarks.score_child", "--model", model, "--input", rows, "--output", output]
    result, peak = run_watching_rss(command, timeout=3600, cwd=REPO)
    if result.returncode != 0:
        raise RuntimeError(f"scoring from the store failed: {result.stderr[-2000:]}")
    return json.loads(result.stdout)["seconds"], peak


def object_storage(sizes: Sizes, workdir: Path) -> Figure:
    """Score the same file from and to local disk and from and to moto's S3 server; report time ratios and RSS."""
    folder = workdir / "object-storage"
    folder.mkdir()
    with HostLoad() as load, moto(folder):
        local_model = folder / "model.pt"
        pipeline_calls.save_untrained_checkpoint(local_model)
        model = f"{BUCKET}/model.pt"
        storage.write_bytes(model, local_model.read_bytes())
        local_rows, rows = folder / "rows.parquet", f"{BUCKET}/rows.parquet"
        pipeline_calls.generate_parquet(local_rows, sizes.object_storage_rows, SEED, "score")
        pipeline_calls.generate_parquet(rows, sizes.object_storage_rows, SEED, "score")
        seconds = interleave(
            sizes.reps,
            {
                "local": lambda: timed(
                    lambda: pipeline_calls.score_parquet(local_model, local_rows, folder / "predictions.parquet")
                ),
                "s3": lambda: timed(lambda: pipeline_calls.score_parquet(model, rows, f"{BUCKET}/predictions.parquet")),
                "local read": lambda: timed(lambda: _read_all(local_rows)),
                "s3 read": lambda: timed(lambda: _read_all(rows)),
            },
        )
        log = folder / "moto.log"
        before = log.read_text().count(" HTTP/1.1")
        pipeline_calls.score_parquet(model, rows, f"{BUCKET}/predictions.parquet")
        requests = log.read_text().count(" HTTP/1.1") - before
        big = f"{BUCKET}/rss-rows.parquet"
        pipeline_calls.generate_parquet(big, sizes.object_storage_rss_rows, SEED + 1, "score")
        rss_seconds, rss = _peak_rss(model, big, f"{BUCKET}/rss-predictions.parquet")
    whole = ratios(seconds["s3"], seconds["local"])
    read = ratios(seconds["s3 read"], seconds["local read"])
    reading_share = Spread.of([r / s for r, s in zip(seconds["s3 read"], seconds["s3"], strict=True)])
    mib = sizes.object_storage_rows * (784 * 4 + 16) / 2**20
    body = [
        f"`pipeline_calls.score_parquet` of {sizes.object_storage_rows:,} rows ({mib:,.0f} MiB of features) from and "
        "to local disk (page cache warm) and from and to moto's S3 server on loopback, interleaved over "
        f"{sizes.reps} repetitions; the reads alone (`storage.iter_feature_batches`) likewise.",
        "",
        *table(
            ["", "local disk (s)", "moto S3 (s)", "S3 / local"],
            [
                [
                    "score (read, model, write, manifest)",
                    Spread.of(seconds["local"]).format(".3g"),
                    Spread.of(seconds["s3"]).format(".3g"),
                    whole.format(".3g"),
                ],
                [
                    "read the features only",
                    Spread.of(seconds["local read"]).format(".3g"),
                    Spread.of(seconds["s3 read"]).format(".3g"),
                    read.format(".3g"),
                ],
            ],
        ),
        "",
        f"One S3 scoring sent {requests} requests to the store: each row group is pre-buffered in a few ranged GETs "
        "(one per column chunk would be 785), then the predictions go up in a multipart upload to a temporary key, "
        "which the store copies to the final key, and the manifest follows. Reading is "
        f"{reading_share.format('.2f')} of the S3 scoring time. moto reads the whole object for every ranged GET, "
        "in Python, so its reads slow down as objects grow: a real store's do not, and these ratios are an upper "
        "bound of what object storage costs.",
        "",
        f"Peak RSS of a process of its own scoring {sizes.object_storage_rss_rows:,} rows from and to the store: "
        f"{rss:,.0f} MiB in {rss_seconds:.0f} s (limit {RSS_LIMIT_MIB:,.0f} MiB).",
    ]
    checks = [
        Check("S3 / local scoring time", whole.format(".3g")),
        Check("S3 / local read time", read.format(".3g")),
        Check(
            f"peak RSS scoring {sizes.object_storage_rss_rows:,} rows on S3",
            f"{rss:,.0f} MiB",
            f"<= {RSS_LIMIT_MIB:,.0f} MiB",
            rss <= RSS_LIMIT_MIB,
        ),
    ]
    return Figure(TITLE, checks, body, load.wall, load.foreign_cores)

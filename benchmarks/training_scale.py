"""Training at scale: peak RSS and samples/s of `featuresum train` as the rows grow past memory.

Each size is one `featuresum train --epochs 1 --batch-size 1024` in a scratch folder with its own
PREFECT_HOME (so the commands share a local server of their own). The sizes of 2M rows and more are
days of 2M rows each (`--window-days`), so the larger windows reuse the partitions already made and
each row is generated once. Every size trains with its rows streamed (`--train-memory-mb`, a budget
far below the rows); the sizes that fit also train with their rows in memory, the default's choice.
The bare baseline, in the same run, is a plain in-memory epoch (benchmarks/bare.py) over the first
size's rows, timed in this process.

    python -m benchmarks.training_scale [--sizes 500000,2000000,8000000,12000000] [--work DIR] [--out FILE]
"""

import argparse
import shutil
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from benchmarks.cli_runs import LocalPrefect
from benchmarks.measure import memory_available_bytes, timed
from benchmarks.report import table, written_by
from featuresum.tasks.memory import memory_plan
from featuresum.tasks.settings import TrainConfig

DAY = date(2026, 6, 1)
PER_DAY = 2_000_000
BATCH = 1024
HOLDOUT = 20_000
STREAM_BUDGET_MB = 2048
MB = 2**20


def train(cli: LocalPrefect, rows: int, label: str, *budget: str) -> dict:
    """One `featuresum train` of `rows` rows; its peak RSS, wall and train-model seconds and samples/s."""
    days = max(1, rows // PER_DAY)
    sizes = ["--train-samples", str(rows), "--window-days", str(days), "--holdout-samples", str(HOLDOUT)]
    options = [*sizes, "--epochs", "1", "--batch-size", str(BATCH), "--date", DAY.isoformat()]
    folders = ["--data-dir", str(cli.workdir / "data"), "--artifacts-dir", str(cli.workdir / f"artifacts-{label}")]
    run = cli.featuresum("train", *options, *folders, *budget)
    seconds = next(s for name, s in cli.task_seconds(run).items() if name.startswith("train-model"))
    return {"rss": run.peak_rss_mib, "wall": run.wall, "train": seconds, "rate": rows / seconds,
            "accuracy": run.summary["metrics"]["val_accuracy"]}  # fmt: skip


def bare_rate(cli: LocalPrefect, rows: int) -> float:
    """Samples/s of a plain in-memory epoch over the first training partition's rows."""
    from benchmarks import bare
    from featuresum.tasks import storage

    part = sorted((cli.workdir / "data").glob(f"train-*/date={DAY.isoformat()}/part-0.parquet"))
    x, y = storage.read_dataset([p for p in part if storage.open_features(p).metadata.num_rows == rows][0])
    model, optimizer, scheduler = bare.new_model(0.003, 0.1, "onecycle", -(-rows // BATCH) + 4, 0)
    bare.train_one_epoch(model, optimizer, scheduler, x[: 4 * BATCH], y[: 4 * BATCH], BATCH)  # warm-up
    return rows / timed(lambda: bare.train_one_epoch(model, optimizer, scheduler, x, y, BATCH))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="500000,2000000,8000000,12000000")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a new one under /tmp); removed at the end")
    parser.add_argument("--out", type=Path, help="also write the Markdown section here")
    parser.add_argument("--stream-budget-mb", type=int, default=STREAM_BUDGET_MB)
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    work = args.work or Path(tempfile.mkdtemp(prefix="featuresum-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    cli, started, available = LocalPrefect(work), time.time(), memory_available_bytes()
    results, rows_out = {}, []
    try:
        for rows in sizes:
            budget = ["--train-memory-mb", str(args.stream_budget_mb)]
            if memory_plan(rows, HOLDOUT, TrainConfig.shuffle_rows, args.stream_budget_mb).mode == "stream":
                results[rows, "stream"] = train(cli, rows, f"{rows}-stream", *budget)
            if memory_plan(rows, HOLDOUT, TrainConfig.shuffle_rows).mode == "memory":
                results[rows, "memory"] = train(cli, rows, f"{rows}-memory")
            print(f"{rows:,} rows: {[r for (n, _), r in results.items() if n == rows]}", file=sys.stderr, flush=True)
        bare = bare_rate(cli, sizes[0])
    finally:
        cli.close()
        shutil.rmtree(work, ignore_errors=True)
    streamed = sorted(rows for rows, mode in results if mode == "stream") or [min(rows for rows, _ in results)]
    reference = next(results[key] for key in [(n, "stream") for n in streamed if n >= PER_DAY] + list(results))
    for (rows, mode), r in sorted(results.items()):
        rows_out.append([f"{rows:,}", "in memory" if mode == "memory" else "streamed", f"{r['rss']:,.0f}",
                         f"{r['rss'] / reference['rss']:.2f}", f"{r['rate']:,.0f}", f"{r['rate'] / bare:.2f}",
                         f"{r['train']:.0f}", f"{r['wall']:.0f}", f"{r['accuracy']:.4f}"])  # fmt: skip
    lines = [
        "## Training beyond memory",
        "",
        f"{written_by('benchmarks.training_scale', started)}, {available / 2**30:.1f} GiB of memory available at"
        " the start.",
        "",
        f"`featuresum train --train-samples N --window-days N/2M --holdout-samples {HOLDOUT} --epochs 1 --batch-size"
        f" {BATCH}`, each a fresh process against the same local server; streamed: with `--train-memory-mb"
        f" {args.stream_budget_mb}` (sizes whose rows fit it train in memory there, so have no streamed row), in"
        " memory: without (what the default chooses when the rows fit in 80% of what is available). Peak RSS: the"
        " process's VmHWM; samples/s: rows over the train-model task's run time (reading, one epoch, evaluation,"
        " the drift reference and the checkpoint), against a bare in-memory epoch (benchmarks/bare.py) over the"
        f" {sizes[0]:,} rows of the first size: {bare:,.0f} samples/s.",
        "",
        *table(
            [
                "rows",
                "rows held",
                "peak RSS MiB",
                "÷ smallest streamed ≥ 2M",
                "samples/s",
                "÷ bare epoch",
                "train-model s",
                "command s",
                "held-out accuracy",
            ],
            rows_out,
        ),  # fmt: skip
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()

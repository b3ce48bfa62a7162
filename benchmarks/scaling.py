"""Figure 6: how training time and accuracy, and scoring time and peak memory, scale with rows."""

import inspect
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from benchmarks import pipeline_calls
from benchmarks.measure import REPO, HostLoad, memory_available_bytes, timed
from benchmarks.report import Check, Figure, table
from benchmarks.sizes import Sizes
from featuresum.tasks import checkpoint, storage, training

SEED = 0
CPU = torch.device("cpu")
BYTES_PER_ROW = 3_160  # 784 float32 features, sample_id and label, uncompressed
RSS_LIMIT_MIB = 1_536
# Rows the pipeline reads per batch; files smaller than one batch need less memory.
BATCH_ROWS = inspect.signature(storage.iter_feature_batches).parameters["batch_rows"].default


def _score_in_child(model: Path, source: Path | None, destination: Path | None) -> dict[str, Any]:
    """Run benchmarks.score_child and return its report (seconds, rows, accuracy, peak RSS)."""
    command = [sys.executable, "-m", "benchmarks.score_child", "--model", str(model)]
    command += ["--input", str(source), "--output", str(destination)] if source else ["--idle"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"scoring child failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return json.loads(result.stdout)


def _training_rows(sizes: Sizes, holdout: tuple[torch.Tensor, torch.Tensor]) -> tuple[list[list[str]], dict[str, Any]]:
    rows_table = []
    config = training.TrainConfig(seed=SEED)
    if sizes.scaling_epochs:
        config = training.TrainConfig(epochs=sizes.scaling_epochs, seed=SEED)
    first_checkpoint = None
    for rows in sizes.scaling_train_rows:
        x, y = pipeline_calls.dataset_in_memory(SEED, "train", rows)
        state = training.new_training_state(config, math.ceil(rows / config.batch_size), CPU)
        with HostLoad() as load:
            training.fit(state, (x, y), holdout, config)
        accuracy = training.accuracy(training.evaluate(state.model, *holdout))
        rows_table.append(
            [
                f"{rows:,}",
                config.epochs,
                f"{load.wall:.1f}",
                f"{rows * config.epochs / load.wall:,.0f}",
                f"{accuracy:.4f}",
                f"{load.foreign_cores:.2f}",
            ]
        )
        if first_checkpoint is None:
            first_checkpoint = training.to_checkpoint(state, config, {})
        del x, y, state
    return rows_table, first_checkpoint


def scaling(sizes: Sizes, workdir: Path) -> Figure:
    """Training rows vs time and held-out accuracy; scoring rows vs time, rows/s and peak RSS of the scorer."""
    with HostLoad() as load:
        holdout = pipeline_calls.dataset_in_memory(SEED, "holdout", sizes.scaling_holdout_rows)
        train_table, trained = _training_rows(sizes, holdout)
        del holdout
        model = workdir / "scaling-model.pt"
        checkpoint.save_checkpoint(model, trained)

        idle = _score_in_child(model, None, None)
        score_table, peaks, skipped = [], {}, []
        for rows in sizes.scaling_score_rows:
            source, destination = workdir / f"scaling-{rows}.parquet", workdir / f"scaling-{rows}-predictions.parquet"
            free = shutil.disk_usage(workdir).free
            if free < 1.2 * rows * BYTES_PER_ROW:
                skipped.append(f"{rows:,} rows skipped: {free / 1e9:.1f} GB free under {workdir}")
                continue
            # A scorer that buffers its whole input must not push a shared machine out of memory.
            available = memory_available_bytes()
            if available < 1.5 * rows * BYTES_PER_ROW + 2**31:
                skipped.append(f"{rows:,} rows skipped: only {available / 2**30:.1f} GiB of memory available")
                continue
            generation = timed(
                lambda source=source, rows=rows: pipeline_calls.generate_parquet(source, rows, SEED, "score")
            )
            file_bytes = source.stat().st_size
            try:
                with HostLoad() as child_load:
                    child = _score_in_child(model, source, destination)
            finally:
                for path in (source, destination):
                    path.unlink(missing_ok=True)
                    path.with_name(path.name + ".json").unlink(missing_ok=True)
            peaks[rows] = child["vm_hwm_mib"]
            score_table.append(
                [
                    f"{rows:,}",
                    f"{file_bytes / 1e9:.2f}",
                    f"{child['seconds']:.1f}",
                    f"{rows / child['seconds']:,.0f}",
                    f"{child['vm_hwm_mib']:,.0f}",
                    f"{child['accuracy']:.4f}",
                    f"{rows / generation:,.0f}",
                    f"{child_load.foreign_cores:.2f}",
                ]
            )

    checks = []
    if peaks:
        largest = max(peaks)
        full_batches = [rows for rows in peaks if rows >= BATCH_ROWS] or [min(peaks)]
        reference = min(full_batches)
        growth = {rows: peaks[rows] / peaks[reference] for rows in peaks}
        worst = max((rows for rows in growth if rows >= reference), key=growth.get)
        for row in score_table:
            row.insert(5, f"{growth[int(row[0].replace(',', ''))]:.3f}")
        checks += [
            Check(
                f"scoring {largest:,} rows: peak RSS",
                f"{peaks[largest]:,.0f} MiB",
                f"< {RSS_LIMIT_MIB:,} MiB",
                peaks[largest] < RSS_LIMIT_MIB,
            ),
            Check(
                f"peak RSS, every size from {reference:,} rows ÷ {reference:,} rows (the largest: {worst:,} rows)",
                f"{growth[worst]:.3f}",
                "flat (<= 1.10)",
                growth[worst] <= 1.10,
            ),
        ]
    body = [
        "**Training** with the pipeline's `training.fit` and default settings "
        f"(batch {training.TrainConfig().batch_size}, AdamW, one-cycle) on rows generated in memory; held-out "
        f"accuracy on {sizes.scaling_holdout_rows:,} fresh rows (another stream), which `fit` also evaluates "
        "after every epoch (included in the time). One measurement per size; the last column is how many "
        "cores other processes kept busy meanwhile (training slows down several times when it is above 0.5).",
        "",
        *table(
            ["training rows", "epochs", "seconds", "samples/s", "held-out accuracy", "other processes' cores"],
            train_table,
        ),
        "",
        "**Scoring**: each feature file is generated with the pipeline's code, then scored by "
        "`python -m benchmarks.score_child` (`load_checkpoint`, `iter_feature_batches`, `score_batches`, "
        "`write_parquet`) in a process of its own, which reports its peak RSS (VmHWM from /proc/self/status; "
        "`ru_maxrss` would not do: Linux carries it across fork and exec, so a child starts with its parent's). "
        f"The model is the one trained on {sizes.scaling_train_rows[0]:,} rows above. A process that only "
        f"imports the pipeline and loads the checkpoint peaks at {idle['vm_hwm_mib']:,.0f} MiB. The files "
        "are read right after being written, so mostly from the page cache. The scorer reads "
        f"{BATCH_ROWS:,} rows at a time, so a file smaller than that never fills a batch and peaks lower; "
        "flatness is judged from the smallest size that fills one.",
        "",
        *table(
            [
                "rows",
                "file GB",
                "scoring s",
                "rows/s",
                "peak RSS MiB",
                "peak RSS ÷ the smallest size that fills a read batch",
                "accuracy",
                "generation rows/s",
                "other processes' cores",
            ],
            score_table,
        ),
        *([""] + skipped if skipped else []),
    ]
    return Figure("6. Scaling", checks, body, load.wall, load.foreign_cores)

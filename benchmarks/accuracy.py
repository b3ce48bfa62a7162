"""Figure 13: where the seed's architecture saturates: held-out accuracy against rows, epochs and batch size.

Each point trains the unchanged 784-128-10 MLP with the pipeline's own training code (`training.fit`,
AdamW with the one-cycle schedule) on fresh in-memory rows and measures accuracy on 100,000 held-out
rows of another stream; training seconds are those of `fit` alone (its per-epoch evaluation included).
"""

import time

import torch

from benchmarks.measure import HostLoad
from benchmarks.pipeline_calls import dataset_in_memory
from benchmarks.report import Check, Figure, table
from benchmarks.sizes import Sizes
from featuresum.flows.presets import PRESETS
from featuresum.tasks import training

HOLDOUT_ROWS = 100_000
TARGET = 0.98
# (rows, epochs, batch size, peak learning rate): the full preset first, then more rows, more epochs,
# larger batches with a higher peak rate.
GRID = (
    (800_000, 6, 256, 0.003),
    (800_000, 10, 256, 0.003),
    (800_000, 10, 1024, 0.006),
    (1_600_000, 6, 1024, 0.006),
    (1_600_000, 10, 1024, 0.006),
    (2_400_000, 8, 2048, 0.01),
)


def time_to_accuracy(sizes: Sizes) -> Figure:
    """Held-out accuracy and training seconds for each point of the grid (scaled down in quick mode)."""
    scale = 1 if sizes.reps > 1 else 0.01
    holdout = dataset_in_memory(0, "holdout", max(1_000, int(HOLDOUT_ROWS * scale)))
    results = []
    with HostLoad() as load:
        for rows, epochs, batch, lr in GRID:
            rows = max(1_000, int(rows * scale))
            x, y = dataset_in_memory(0, "train", rows)
            config = training.TrainConfig(epochs=epochs, batch_size=batch, lr=lr, seed=0)
            state = training.new_training_state(config, -(-rows // batch), torch.device("cpu"))
            start = time.perf_counter()
            training.fit(state, (x, y), holdout, config)
            seconds = time.perf_counter() - start
            accuracy = training.accuracy(training.evaluate(state.model, *holdout))
            results.append((rows, epochs, batch, lr, accuracy, seconds))
            del x, y
    full = PRESETS["full"]
    best = max(results, key=lambda point: point[4])
    reached = [point for point in results if point[4] >= TARGET]
    fastest = min(reached, key=lambda point: point[5]) if reached else None
    body = [
        f"Held-out accuracy on {len(holdout[1]):,} rows of another stream after `training.fit`; "
        f"the `full` preset is {full.train_samples:,} rows, {full.epochs} epochs, batch {full.batch_size}, "
        f"lr {full.lr}. One run per point (seed 0).",
        "",
        *table(
            ["rows", "epochs", "batch", "peak lr", "held-out accuracy", "training s"],
            [
                [f"{rows:,}", epochs, batch, lr, f"{accuracy:.4f}", f"{seconds:.0f}"]
                for rows, epochs, batch, lr, accuracy, seconds in results
            ],
        ),
    ]
    checks = [
        Check("best held-out accuracy (rows, epochs, batch)", f"{best[4]:.4f} ({best[0]:,}, {best[1]}, {best[2]})"),
        Check(
            f"fastest point at >= {TARGET}: training s",
            f"{fastest[5]:.0f} s ({fastest[0]:,} rows, {fastest[1]} epochs, batch {fastest[2]})" if fastest else "none",
        ),
    ]
    return Figure("13. Time to accuracy", checks, body, load.wall, load.foreign_cores)

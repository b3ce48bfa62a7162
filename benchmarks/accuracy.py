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
# (rows, epochs, batch size, peak learning rate, weight decay): the previous full preset, the same
# budget cut to 6 epochs, a higher peak rate, stronger weight decay (the full preset now), and fewer rows.
GRID = (
    (1_600_000, 10, 1024, 0.006, 0.1),
    (1_600_000, 6, 1024, 0.006, 0.1),
    (1_600_000, 6, 1024, 0.012, 0.1),
    (1_600_000, 5, 1024, 0.012, 0.3),
    (1_600_000, 6, 1024, 0.012, 0.3),
    (1_200_000, 7, 1024, 0.012, 0.3),
)


def time_to_accuracy(sizes: Sizes) -> Figure:
    """Held-out accuracy and training seconds for each point of the grid (scaled down in quick mode)."""
    scale = 1 if sizes.reps > 1 else 0.01
    holdout = dataset_in_memory(0, "holdout", max(1_000, int(HOLDOUT_ROWS * scale)))
    results = []
    with HostLoad() as load:
        for rows, epochs, batch, lr, decay in GRID:
            rows = max(1_000, int(rows * scale))
            x, y = dataset_in_memory(0, "train", rows)
            config = training.TrainConfig(epochs=epochs, batch_size=batch, lr=lr, weight_decay=decay, seed=0)
            state = training.new_training_state(config, -(-rows // batch), torch.device("cpu"))
            start = time.perf_counter()
            training.fit(state, (x, y), holdout, config)
            seconds = time.perf_counter() - start
            accuracy = training.accuracy(training.evaluate(state.model, *holdout))
            results.append((rows, epochs, batch, lr, decay, accuracy, seconds))
            del x, y
    full = PRESETS["full"]
    best = max(results, key=lambda point: point[5])
    reached = [point for point in results if point[5] >= TARGET]
    fastest = min(reached, key=lambda point: point[6]) if reached else None
    body = [
        f"Held-out accuracy on {len(holdout[1]):,} rows of another stream after `training.fit`; "
        f"the `full` preset is {full.train_samples:,} rows, {full.epochs} epochs, batch {full.batch_size}, "
        f"peak lr {full.lr}, weight decay {full.weight_decay}. AdamW with the one-cycle schedule; one run per "
        "point (seed 0).",
        "",
        *table(
            ["rows", "epochs", "batch", "peak lr", "weight decay", "held-out accuracy", "training s"],
            [
                [f"{rows:,}", epochs, batch, lr, decay, f"{accuracy:.4f}", f"{seconds:.0f}"]
                for rows, epochs, batch, lr, decay, accuracy, seconds in results
            ],
        ),
    ]
    checks = [
        Check("best held-out accuracy (rows, epochs, batch)", f"{best[5]:.4f} ({best[0]:,}, {best[1]}, {best[2]})"),
        Check(
            f"fastest point at >= {TARGET}: training s",
            f"{fastest[6]:.0f} s ({fastest[0]:,} rows, {fastest[1]} epochs, batch {fastest[2]})" if fastest else "none",
        ),
    ]
    return Figure("13. Time to accuracy", checks, body, load.wall, load.foreign_cores)

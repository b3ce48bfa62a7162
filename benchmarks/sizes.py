"""How big and how often each benchmark runs: the full suite and a quick smoke-sized variant."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Sizes:
    """Row counts and repetitions for every benchmark."""

    reps: int
    # Training epochs are the most sensitive to other processes: more, shorter repetitions.
    training_reps: int
    e2e_reps: int
    # Cached reruns, `import prefect` and the minimal Prefect flow, interleaved (figure 5).
    rerun_reps: int
    generation_rows: int
    training_rows: int
    training_holdout_rows: int
    training_batch_sizes: tuple[int, ...]
    scoring_rows: int
    # Overrides of the default preset for the end-to-end runs, e.g. (("epochs", 1),); empty: defaults.
    e2e_overrides: tuple[tuple[str, int], ...]
    scaling_train_rows: tuple[int, ...]
    scaling_holdout_rows: int
    scaling_epochs: int | None
    scaling_score_rows: tuple[int, ...]
    # (label, `featuresum run` options) of the model-quality runs.
    quality_runs: tuple[tuple[str, tuple[str, ...]], ...]
    sharded_rows: int
    # --shard-rows for `featuresum score`; None keeps its default.
    sharded_shard_rows: int | None
    # Rows of the feature file that `featuresum score` and the bare scorers score in figure 9.
    cli_scoring_rows: int
    # Rows scored from and to object storage against local disk (figure 14), and those of its peak-RSS run.
    object_storage_rows: int
    object_storage_rss_rows: int


TINY = (("train_samples", 2000), ("holdout_samples", 500), ("score_samples", 500), ("epochs", 1))
SEED_SCRIPT = (
    "--train-samples",
    "1000",
    "--epochs",
    "100",
    "--batch-size",
    "64",
    "--lr",
    "0.001",
    "--weight-decay",
    "0",
    "--schedule",
    "constant",
)

FULL = Sizes(
    reps=5,
    training_reps=9,
    e2e_reps=5,
    rerun_reps=9,
    generation_rows=200_000,
    training_rows=50_000,
    training_holdout_rows=20_000,
    training_batch_sizes=(256, 1024),
    scoring_rows=200_000,
    e2e_overrides=(),
    scaling_train_rows=(50_000, 200_000, 800_000),
    scaling_holdout_rows=100_000,
    scaling_epochs=None,
    scaling_score_rows=(10_000, 100_000, 1_000_000, 2_000_000),
    quality_runs=(
        ("`featuresum run --preset full`", ("--preset", "full")),
        ("the seed script's settings", SEED_SCRIPT),
    ),
    sharded_rows=1_000_000,
    sharded_shard_rows=None,
    cli_scoring_rows=1_000_000,
    object_storage_rows=200_000,
    object_storage_rss_rows=1_000_000,
)

QUICK = Sizes(
    reps=1,
    training_reps=1,
    e2e_reps=1,
    rerun_reps=2,
    generation_rows=5_000,
    training_rows=4_000,
    training_holdout_rows=1_000,
    training_batch_sizes=(256, 1024),
    scoring_rows=5_000,
    e2e_overrides=TINY,
    scaling_train_rows=(2_000, 4_000),
    scaling_holdout_rows=2_000,
    scaling_epochs=1,
    scaling_score_rows=(40_000, 80_000),
    quality_runs=(("a tiny run", ("--train-samples", "2000", "--holdout-samples", "500", "--epochs", "1")),),
    sharded_rows=40_000,
    sharded_shard_rows=32_768,
    cli_scoring_rows=40_000,
    object_storage_rows=5_000,
    object_storage_rss_rows=40_000,
)

"""Figure 10: what drift costs a model that is not retrained, and what a day-to-day retrain costs and gains."""

from benchmarks.cli_runs import LocalPrefect
from benchmarks.report import Check, Figure, table
from benchmarks.sizes import Sizes
from featuresum.flows.presets import DEFAULT

# A drift of 0.0005 per feature per day moves the mean feature sum by 784 * 0.0005 * 30 = 11.8 in
# 30 days, about 0.4 of its spread (28): enough to move rows across the class boundaries.
DRIFT = 0.0005
START = "2026-01-01"
NEXT_DAY = "2026-01-02"
LATER = "2026-01-31"
SCORED_ROWS = 20_000


def _train_seconds(cli: LocalPrefect, run) -> float:
    return sum(s for name, s in cli.task_seconds(run).items() if name.startswith("train-model"))


def retraining(sizes: Sizes, cli: LocalPrefect) -> Figure:
    """Accuracy on rows 30 days later of a stale model vs a retrained one; warm vs cold day-to-day retrains."""
    settings = {**DEFAULT.values(), **dict(sizes.e2e_overrides)}
    train_keys = ("train_samples", "holdout_samples", "epochs")
    options = [arg for key in train_keys for arg in (f"--{key.replace('_', '-')}", str(settings[key]))]
    options += ["--drift", str(DRIFT)]
    rows, epochs = settings["train_samples"], settings["epochs"]

    def artifacts(name: str) -> list[str]:
        return ["--data-dir", str(cli.workdir / "retraining-data"), "--artifacts-dir", str(cli.workdir / name)]

    stale = cli.featuresum("train", *options, "--date", START, *artifacts("drift"))
    retrained = cli.featuresum("train", *options, "--date", LATER, *artifacts("drift"))
    batch = ["--samples", str(SCORED_ROWS), "--date", LATER, "--drift", str(DRIFT), *artifacts("drift")]
    accuracy = {}
    for name, run in (("stale", stale), ("retrained", retrained)):
        scored = cli.featuresum("score", "--model", str(run.summary["model_version"]), *batch)
        accuracy[name] = scored.summary["metrics"]["score_accuracy"]

    # Day-to-day: the champion of START retrained on NEXT_DAY from its own weights or from scratch.
    warm_start = cli.featuresum("train", *options, "--date", START, *artifacts("warm"))
    assert warm_start.summary["registry"]["promoted"]
    warm = cli.featuresum("train", *options, "--date", NEXT_DAY, "--init", "champion", *artifacts("warm"))
    cold = cli.featuresum("train", *options, "--date", NEXT_DAY, "--init", "scratch", *artifacts("cold"))
    day_to_day = {
        name: (run.summary["metrics"]["val_accuracy"], _train_seconds(cli, run))
        for name, run in (("--init champion", warm), ("--init scratch", cold))
    }

    body = [
        f"`featuresum train` with {rows:,} training rows, {epochs} epochs and `--drift {DRIFT}` "
        f"(every feature's mean moves by {DRIFT} a day from 2026-01-01), then `featuresum score --samples "
        f"{SCORED_ROWS:,} --date {LATER} --drift {DRIFT}`: the same {SCORED_ROWS:,} labelled rows of {LATER}, scored "
        f"by the model trained on {START} and by one retrained on {LATER}.",
        "",
        *table(
            ["model", f"accuracy on {LATER}'s rows"],
            [
                [f"trained on {START} (30 days stale)", f"{accuracy['stale']:.4f}"],
                [f"retrained on {LATER}", f"{accuracy['retrained']:.4f}"],
            ],
        ),
        "",
        f"A day-to-day retrain on {NEXT_DAY}, from the champion trained on {START} (`--init champion`) or from "
        "scratch; held-out accuracy on that day's held-out rows, and the training task's time:",
        "",
        *table(
            ["retrain", "held-out accuracy", "training s"],
            [[name, f"{acc:.4f}", f"{seconds:.1f}"] for name, (acc, seconds) in day_to_day.items()],
        ),
    ]
    checks = [
        Check(
            "accuracy on rows 30 days later: stale / retrained",
            f"{accuracy['stale']:.4f} / {accuracy['retrained']:.4f}",
        ),
        Check(
            "day-to-day retrain held-out accuracy: --init champion / scratch",
            f"{day_to_day['--init champion'][0]:.4f} / {day_to_day['--init scratch'][0]:.4f}",
        ),
    ]
    return Figure("10. Drift and retraining", checks, body)

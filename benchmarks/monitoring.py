"""Figure 11: what monitoring sees when a champion scores batches further and further from its training date."""

from datetime import date, timedelta

from benchmarks.cli_runs import LocalPrefect
from benchmarks.report import Check, Figure, table
from benchmarks.sizes import Sizes
from featuresum.flows.presets import DEFAULT

# 0.001 per feature per day moves the mean feature sum by 784 * 0.001 = 0.78 a day: 15 days is
# about 0.4 of its spread (28), 30 days about 0.8.
DRIFT = 0.001
TRAINED = date(2026, 1, 1)
DAYS_LATER = (0, 15, 30)
SCORED_ROWS = 20_000


def monitoring(sizes: Sizes, cli: LocalPrefect) -> Figure:
    """Train a champion on one date, score batches 0, 15 and 30 days later with drift; report what monitoring says."""
    settings = {**DEFAULT.values(), **dict(sizes.e2e_overrides)}
    train_keys = ("train_samples", "holdout_samples", "epochs")
    options = [arg for key in train_keys for arg in (f"--{key.replace('_', '-')}", str(settings[key]))]
    folders = cli.fresh_dirs("monitoring")
    cli.featuresum("train", *options, "--drift", str(DRIFT), "--date", TRAINED.isoformat(), *folders)
    batches = []
    for days in DAYS_LATER:
        day = (TRAINED + timedelta(days=days)).isoformat()
        batch = ["--samples", str(SCORED_ROWS), "--date", day, "--drift", str(DRIFT)]
        scored = cli.featuresum("score", "--model", "champion", *batch, *folders).summary
        batches.append((days, day, scored["drift"], scored["metrics"]["score_accuracy"]))

    rows = [
        [day, days, *(f"{drift[key]:.4f}" for key in ("feature_sum_psi", "predicted_class_psi")), drift["level"]]
        + [f"{acc:.4f}"]
        for days, day, drift, acc in batches
    ]
    body = [
        f"`featuresum train --date {TRAINED} --drift {DRIFT}` with {settings['train_samples']:,} training rows and "
        f"{settings['epochs']} epochs, then `featuresum score --model champion --samples {SCORED_ROWS:,} --date D "
        f"--drift {DRIFT}` for D = {', '.join(str(d) for _, d, _, _ in batches)}: the champion's reference against "
        "each batch (levels with the default thresholds: ok below 0.1, warn up to 0.25, alert above).",
        "",
        *table(
            ["batch date", "days after training", "feature-sum PSI", "predicted-class PSI", "level", "accuracy"], rows
        ),
    ]
    levels = " / ".join(drift["level"] for _, _, drift, _ in batches)
    checks = [
        Check(
            f"feature-sum PSI {' / '.join(f'+{d} d' for d in DAYS_LATER)}",
            " / ".join(f"{drift['feature_sum_psi']:.4f}" for _, _, drift, _ in batches),
        ),
        Check("levels", levels),
        Check("accuracy", " / ".join(f"{acc:.4f}" for *_, acc in batches)),
    ]
    return Figure("11. Monitoring drift by date", checks, body)

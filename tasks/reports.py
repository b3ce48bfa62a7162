"""Prefect artifacts that let the UI answer: what ran, how well it did, where the files are."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from featuresum.tasks import monitoring
from featuresum.tasks.data import CLASS_BOUNDARIES, NUM_CLASSES
from featuresum.tasks.figures import format_figure
from featuresum.tasks.scoring import ScoreSummary

if TYPE_CHECKING:
    import torch


def class_range(label: int) -> str:
    """The feature sums a class stands for, e.g. '-10 <= sum < -5'."""
    low = CLASS_BOUNDARIES[label - 1] if label > 0 else None
    high = CLASS_BOUNDARIES[label] if label < len(CLASS_BOUNDARIES) else None
    if low is None:
        return f"sum < {high:g}"
    if high is None:
        return f"sum >= {low:g}"
    return f"{low:g} <= sum < {high:g}"


def _confusion_markdown(confusion: torch.Tensor) -> str:
    """Confusion matrix with each true class's feature-sum range, row count and recall."""
    header = "| true class | feature sum | " + " | ".join(map(str, range(NUM_CLASSES))) + " | rows | recall |"
    rule = "|---" * (NUM_CLASSES + 4) + "|"
    rows = []
    for label, row in enumerate(confusion.tolist()):
        total = sum(row)
        recall = f"{row[label] / total:.3f}" if total else "n/a"
        cells = " | ".join(map(str, row))
        rows.append(f"| **{label}** | {class_range(label)} | {cells} | {total} | {recall} |")
    return "\n".join([header, rule, *rows])


def publish_training(
    history: list[dict[str, float]], metrics: dict[str, Any], confusion: torch.Tensor, checkpoint: str
) -> None:
    """Per-epoch table and a markdown report (final metrics, confusion matrix, checkpoint path)."""
    accuracy = format_figure(metrics["val_accuracy"], "n/a")
    create_table_artifact(
        key="featuresum-training-history",
        table=[
            {
                "epoch": int(h["epoch"]),
                "train_loss": round(h["train_loss"], 4),
                "val_accuracy": round(h["val_accuracy"], 4),
            }
            for h in history
        ],
        description=f"Per-epoch mean training loss and held-out accuracy ({len(history)} epochs)",
    )
    create_markdown_artifact(
        key="featuresum-training-report",
        description="Final metrics of the trained model",
        markdown="\n".join(
            [
                "# Training report",
                f"- held-out accuracy: **{accuracy}** on {metrics['holdout_rows']} rows",
                f"- final training loss: {format_figure(metrics['train_loss'], 'n/a')}",
                f"- epochs: {len(history)}",
                f"- checkpoint: `{checkpoint}`",
                "",
                "## Confusion matrix (held-out rows; true class by predicted class)",
                _confusion_markdown(confusion),
            ]
        ),
    )


def publish_predictions(summary: ScoreSummary, predictions: str) -> None:
    """Class histogram of the predictions, with the file, its row count and labelled accuracy."""
    accuracy = format_figure(summary.accuracy, "n/a")
    create_table_artifact(
        key="featuresum-predictions",
        description=(
            f"{summary.rows} predictions in `{predictions}`; accuracy on the {summary.labelled} labelled rows"
            f" ({summary.rows - summary.labelled} without a label): {accuracy}"
        ),
        table=[
            {
                "predicted_class": label,
                "feature_sum": class_range(label),
                "rows": count,
                "share": round(count / summary.rows, 4) if summary.rows else 0.0,
            }
            for label, count in enumerate(summary.class_counts)
        ],
    )


def publish_promotion(decision: dict[str, Any]) -> None:
    """The promotion gate's decision: both accuracies on the same held-out rows, and why."""
    create_table_artifact(
        key="featuresum-promotion",
        description=(
            f"Challenger version {decision['model_version']} "
            + ("promoted to champion" if decision["promoted"] else "not promoted")
            + f"; the champion is version {decision['champion_version']}: {decision['reason']}"
        ),
        table=[
            {
                "model": "challenger",
                "version": decision["model_version"],
                "held_out_accuracy": format_figure(decision["challenger_accuracy"], "n/a"),
            },
            {
                "model": "champion before the gate",
                "version": decision["previous_champion"],
                "held_out_accuracy": format_figure(decision["champion_accuracy"], "n/a"),
            },
        ],
    )


# Rows of the monitoring history that the UI's table and chart show: the latest ones.
MONITORING_ROWS = 30
# Dates whose drift level the UI shows at a glance, in the artifact of key DRIFT_LEVELS_KEY.
LEVEL_DATES = 14
DRIFT_LEVELS_KEY = "featuresum-drift-levels"


def publish_monitoring(history: list[dict[str, Any]], warn: float, alert: float) -> None:
    """The latest rows of the monitoring history as a table, the drift chart, and the last dates' levels."""
    latest = history[-MONITORING_ROWS:]
    columns = ("run_date", "model_version", "rows", "feature_sum_psi", "predicted_class_psi")
    columns += ("feature_sum_mean", "feature_sum_std", "mean_confidence", "accuracy", "level", "alerted")
    create_table_artifact(
        key="featuresum-monitoring",
        description=f"Drift and accuracy of the last {len(latest)} of {len(history)} scored batches, by date",
        table=[{name: _rounded(row[name]) for name in columns} for row in latest],
    )
    judged = (
        f"Each level is the one the last run that monitored the batch judged (this run: ok below a PSI of "
        f"{warn:g}, warn up to {alert:g}, alert above)."
    )
    create_markdown_artifact(
        key="featuresum-monitoring-chart",
        description="Drift (PSI, log scale, with the warn and alert marks) and accuracy by date",
        markdown="\n".join(["# Drift and accuracy by date", judged, "", monitoring.chart(latest, warn, alert)]),
    )
    dates = monitoring.recent_levels(history, LEVEL_DATES)
    create_markdown_artifact(
        key=DRIFT_LEVELS_KEY,
        description=f"Drift levels of the last {len(dates)} dates" + _level_counts(dates),
        markdown="\n".join(
            [
                f"# Drift levels of the last {len(dates)} dates",
                judged + " A date scored more than once shows its worst batch; PSI is the larger of the two.",
                "",
                monitoring.levels_markdown(history, LEVEL_DATES),
            ]
        ),
    )


def _level_counts(rows: list[dict[str, Any]]) -> str:
    """', up to 2026-01-31: 1 alert, 2 warn, 11 ok' for the rows of some dates (nothing for none)."""
    if not rows:
        return ""
    counts = [f"{sum(row['level'] == name for row in rows)} {name}" for name in reversed(monitoring.LEVELS)]
    return f", up to {rows[-1]['run_date']}: " + ", ".join(count for count in counts if not count.startswith("0 "))


def _rounded(value: Any) -> Any:
    return round(value, 4) if isinstance(value, float) else value

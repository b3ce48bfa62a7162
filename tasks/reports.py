"""Prefect artifacts that let the UI answer: what ran, how well it did, where the files are."""

from typing import Any

import torch
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tasks.data import CLASS_BOUNDARIES, NUM_CLASSES
from tasks.scoring import ScoreSummary


def _confusion_markdown(confusion: torch.Tensor) -> str:
    header = "| true \\ predicted | " + " | ".join(map(str, range(NUM_CLASSES))) + " |"
    rule = "|---" * (NUM_CLASSES + 1) + "|"
    rows = [f"| **{i}** | " + " | ".join(str(int(v)) for v in row) + " |" for i, row in enumerate(confusion)]
    return "\n".join([header, rule, *rows])


def publish_training(
    history: list[dict[str, float]], metrics: dict[str, Any], confusion: torch.Tensor, checkpoint: str
) -> None:
    """Per-epoch table and a markdown report (final metrics, confusion matrix, checkpoint path)."""
    create_table_artifact(
        key="featuresum-training-history",
        table=history,
        description="Per-epoch training loss and held-out accuracy",
    )
    create_markdown_artifact(
        key="featuresum-training-report",
        description="Final metrics of the trained model",
        markdown="\n".join(
            [
                "# Training report",
                f"- held-out accuracy: **{metrics['val_accuracy']:.4f}** on {metrics['holdout_rows']} rows",
                f"- final train loss: {metrics['train_loss']}",
                f"- checkpoint: `{checkpoint}`",
                f"- class boundaries: {list(CLASS_BOUNDARIES)}",
                "",
                "## Confusion matrix (held-out)",
                _confusion_markdown(confusion),
            ]
        ),
    )


def publish_predictions(summary: ScoreSummary, predictions: str) -> None:
    """Class histogram of the predictions, with the file, its row count and labelled accuracy."""
    accuracy = "n/a" if summary.accuracy is None else f"{summary.accuracy:.4f}"
    create_table_artifact(
        key="featuresum-predictions",
        description=f"{summary.rows} predictions in {predictions}; accuracy on labelled rows: {accuracy}",
        table=[
            {"predicted_class": c, "rows": n, "share": round(n / summary.rows, 4) if summary.rows else 0.0}
            for c, n in enumerate(summary.class_counts)
        ],
    )

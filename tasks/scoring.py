"""Scoring: feature batches in, prediction record batches out, with running summary counts."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from featuresum.tasks import cpu
from featuresum.tasks.data import NUM_CLASSES
from featuresum.tasks.storage import PREDICTIONS_SCHEMA

# ScoreSummary is read by reports on cached runs, which never load torch.
if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass
class ScoreSummary:
    """Counts gathered while scoring: rows, class histogram and, for labelled rows, hits."""

    rows: int = 0
    labelled: int = 0
    correct: int = 0
    class_counts: list[int] = field(default_factory=lambda: [0] * NUM_CLASSES)

    def add(self, rows: int, labelled: int, correct: int, class_counts: list[int]) -> None:
        """Fold in the counts of another batch or shard."""
        self.rows += rows
        self.labelled += labelled
        self.correct += correct
        self.class_counts = [a + int(b) for a, b in zip(self.class_counts, class_counts, strict=True)]

    @property
    def accuracy(self) -> float | None:
        """Accuracy on labelled rows, or None when no row had a label."""
        return self.correct / self.labelled if self.labelled else None


def predict(model: nn.Module, features: np.ndarray, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Predicted class and its softmax probability for features of shape (784, rows)."""
    import torch

    # The transposed view goes straight into the matmul; no row-major copy is made on the CPU.
    x = torch.from_numpy(features).to(device).T
    with torch.no_grad():
        confidence, predicted = torch.softmax(model(x), dim=1).max(dim=1)
    return predicted.cpu().numpy().astype(np.int64), confidence.cpu().numpy().astype(np.float32)


def score_batches(
    model: nn.Module,
    batches: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray | None]],
    device: torch.device,
    summary: ScoreSummary,
) -> Iterator[pa.RecordBatch]:
    """Prediction record batches for (sample_id, features, label) batches, updating `summary`.

    The next batch is read (and summed) on a thread of its own while the model scores this one, so
    `batches` must keep each batch's features valid while the next is read. That thread takes a core
    from torch: decoding and the matrix products then overlap (1.3-1.6x faster on two cores). Close the
    generator if it is left before its end, so the core is given back at once.
    """
    import torch

    model.eval()
    with cpu.one_core_lent(torch):
        for item in cpu.ahead(_with_sums(iter(batches))):
            yield _scored(model, device, summary, *item)


def _with_sums(batches: Iterator[tuple]) -> Iterator[tuple]:
    for sample_id, features, label in batches:
        yield sample_id, features, label, np.add.reduce(features, axis=0, dtype=np.float64)


def _scored(
    model: nn.Module,
    device: torch.device,
    summary: ScoreSummary,
    sample_id: np.ndarray,
    features: np.ndarray,
    label: np.ndarray | None,
    feature_sum: np.ndarray,
) -> pa.RecordBatch:
    predicted, confidence = predict(model, features, device)
    # A null label reads as NaN: the row is scored, but left out of the accuracy.
    known = np.zeros(len(sample_id), dtype=bool) if label is None else label == label
    labelled, correct = int(known.sum()), int((predicted[known] == label[known]).sum()) if known.any() else 0
    summary.add(len(sample_id), labelled, correct, np.bincount(predicted, minlength=NUM_CLASSES).tolist())
    return pa.RecordBatch.from_arrays(
        [pa.array(sample_id), pa.array(feature_sum), pa.array(predicted), pa.array(confidence)],
        schema=PREDICTIONS_SCHEMA,
    )

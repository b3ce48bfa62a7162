"""Bare baselines: the same work done with PyTorch and pyarrow directly, as a short script would do it.

Only the model class and the data rule's constants come from the pipeline, so both sides train the
same network on the same kind of data; the DataLoader loop is written without even the model class,
as a user of PyTorch's tutorials would write it. Parquet files use the pipeline's write options (no
compression, no dictionary, no statistics), so both sides write the same bytes per row.
"""

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from featuresum.tasks.data import CLASS_BOUNDARIES, NUM_FEATURES
from featuresum.tasks.model import FeatureSumMLP

FEATURE_NAMES = [f"f{i:03d}" for i in range(NUM_FEATURES)]
PARQUET_WRITE = {"compression": "none", "use_dictionary": False, "write_statistics": False}


def generate_parquet(path: str, rows: int, seed: int) -> None:
    """Draw `rows` standard-normal rows, label them by their sum and write one Parquet file."""
    generator = torch.Generator().manual_seed(seed)
    # One tensor row per Parquet column, so each column goes to Arrow without a copy.
    features = torch.randn(NUM_FEATURES, rows, generator=generator)
    boundaries = torch.tensor(CLASS_BOUNDARIES, dtype=torch.float64)
    label = torch.bucketize(features.sum(dim=0, dtype=torch.float64), boundaries, right=True)
    columns = {"sample_id": np.arange(rows, dtype=np.int64)}
    columns.update(zip(FEATURE_NAMES, features.numpy(), strict=True))
    columns["label"] = label.numpy()
    pq.write_table(pa.table(columns), path, **PARQUET_WRITE)


def read_parquet(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(sample_id, features of shape (784, rows), label or None) of a whole Parquet file."""
    table = pq.read_table(path)
    features = np.stack([table.column(name).to_numpy() for name in FEATURE_NAMES])
    label = table.column("label").to_numpy() if "label" in table.column_names else None
    return table.column("sample_id").to_numpy(), features, label


def rows_tensor(features: np.ndarray) -> torch.Tensor:
    """Row-major (rows, 784) tensor of column-major features, as training wants them."""
    return torch.from_numpy(np.ascontiguousarray(features.T))


def new_model(lr: float, weight_decay: float, schedule: str, total_steps: int, seed: int):
    """Model, AdamW optimiser and (one-cycle) scheduler, as in the pipeline's settings."""
    torch.manual_seed(seed)
    model = FeatureSumMLP()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = None
    if schedule == "onecycle":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max(1, total_steps))
    return model, optimizer, scheduler


def train_one_epoch(model, optimizer, scheduler, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> None:
    """A tight loop over shuffled minibatches of in-memory tensors."""
    model.train()
    order = torch.randperm(len(x))
    for start in range(0, len(x), batch_size):
        index = order[start : start + batch_size]
        loss = nn.functional.cross_entropy(model(x[index]), y[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


def dataloader_model(lr: float, weight_decay: float, seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The seed article's network as a user writes it, without the project's classes, and AdamW."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(NUM_FEATURES, 128), nn.ReLU(), nn.Linear(128, len(CLASS_BOUNDARIES) + 1))
    return model, torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)


def train_one_epoch_dataloader(
    model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, batch_size: int
) -> None:
    """One epoch the way PyTorch's tutorials write it: a TensorDataset, a shuffling DataLoader, a loss module."""
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size, shuffle=True)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for features, labels in loader:
        optimizer.zero_grad()
        loss = loss_fn(model(features), labels)
        loss.backward()
        optimizer.step()


def train(
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    schedule: str,
    seed: int,
):
    """Train a fresh model for `epochs` epochs; returns (model, optimizer)."""
    steps = epochs * math.ceil(len(x) / batch_size)
    model, optimizer, scheduler = new_model(lr, weight_decay, schedule, steps, seed)
    for _ in range(epochs):
        train_one_epoch(model, optimizer, scheduler, x, y, batch_size)
    return model, optimizer


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Share of rows whose predicted class is the label."""
    model.eval()
    return (model(x).argmax(dim=1) == y).double().mean().item()


def save_checkpoint(path: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Weights and optimiser state, loadable with weights_only=True."""
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, path)


def load_model(path: str) -> FeatureSumMLP:
    """The model saved by save_checkpoint (or a pipeline checkpoint: both keep weights under "model")."""
    model = FeatureSumMLP()
    model.load_state_dict(torch.load(path, weights_only=True)["model"])
    return model.eval()


@torch.no_grad()
def score_parquet(model: nn.Module, source: str, destination: str) -> int:
    """Read a feature file whole, predict, and write sample_id, feature_sum, class and confidence."""
    sample_id, features, _ = read_parquet(source)
    confidence, predicted = torch.softmax(model(torch.from_numpy(features).T), dim=1).max(dim=1)
    predictions = pa.table(
        {
            "sample_id": sample_id,
            "feature_sum": features.sum(axis=0, dtype=np.float64),
            "predicted_class": predicted.numpy().astype(np.int64),
            "confidence": confidence.numpy(),
        }
    )
    pq.write_table(predictions, destination, **PARQUET_WRITE)
    return len(sample_id)


@torch.no_grad()
def stream_score_parquet(model: nn.Module, source: str, destination: str, batch_rows: int = 65_536) -> int:
    """Score a feature file batch by batch (pyarrow's default batch size), writing each batch as it comes."""
    schema = pa.schema(
        [
            ("sample_id", pa.int64()),
            ("feature_sum", pa.float64()),
            ("predicted_class", pa.int64()),
            ("confidence", pa.float32()),
        ]
    )
    rows = 0
    with pq.ParquetWriter(destination, schema, **PARQUET_WRITE) as writer:
        for batch in pq.ParquetFile(source).iter_batches(batch_size=batch_rows, columns=["sample_id", *FEATURE_NAMES]):
            features = np.stack([batch.column(name).to_numpy() for name in FEATURE_NAMES])
            confidence, predicted = torch.softmax(model(torch.from_numpy(features).T), dim=1).max(dim=1)
            predictions = {
                "sample_id": batch.column("sample_id"),
                "feature_sum": features.sum(axis=0, dtype=np.float64),
                "predicted_class": predicted.numpy().astype(np.int64),
                "confidence": confidence.numpy(),
            }
            writer.write_batch(pa.record_batch(predictions, schema=schema))
            rows += batch.num_rows
    return rows


def decode_parquet(source: str, batch_rows: int = 16_384) -> int:
    """Decode the feature columns of a file batch by batch and keep nothing: the floor's first part."""
    parquet = pq.ParquetFile(source, pre_buffer=False)
    rows = 0
    for batch in parquet.iter_batches(batch_size=batch_rows, columns=FEATURE_NAMES):
        rows += batch.num_rows
    return rows


@torch.no_grad()
def matrix_products(model: nn.Module, rows: int, batch_rows: int = 16_384) -> int:
    """The model's forward pass over `rows` rows of one batch held in memory: the floor's second part."""
    features = torch.randn(NUM_FEATURES, batch_rows)
    for start in range(0, rows, batch_rows):
        model(features[:, : min(batch_rows, rows - start)].T)
    return rows

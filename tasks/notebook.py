"""The notebook API: load a registered model or a checkpoint and score a DataFrame; the registry as a DataFrame.

Plain code, no Prefect: `from featuresum import load_model, registry` in a notebook.
"""

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from torch import nn

from featuresum.tasks import scoring, storage
from featuresum.tasks.checkpoint import load_checkpoint, model_from_checkpoint
from featuresum.tasks.errors import InputError
from featuresum.tasks.registry import Registry, Version

# The batch size `featuresum score` reads feature files with, so a DataFrame scores as the same file would.
BATCH_ROWS = 16_384
REGISTRY_COLUMNS = ["version", "checkpoint", "run_date", "val_accuracy", "aliases", "created", "flow_run_id"]


@dataclass(frozen=True)
class Model:
    """A loaded classifier with its registry version (None when it is not registered) and its metrics."""

    module: nn.Module = field(repr=False)
    device: torch.device = field(repr=False)
    checkpoint: str
    version: int | None
    metrics: dict

    def predict(self, df: pd.DataFrame) -> pd.DataFrame:
        """Predictions for the rows of `df`, in its order, exactly as `featuresum score` computes them.

        `df` needs the columns f000..f783 (numbers, no NaN); other columns are ignored, except
        `sample_id`, which is kept (rows are numbered from 0 without it). The result has the columns of a
        predictions file: sample_id int64, feature_sum float64, predicted_class int64, confidence float32.
        """
        summary = scoring.ScoreSummary()
        batches = scoring.score_batches(self.module, _feature_batches(df), self.device, summary)
        table = pa.Table.from_batches(list(batches), schema=storage.PREDICTIONS_SCHEMA)
        return table.to_pandas()


def _check_columns(df: pd.DataFrame) -> None:
    """InputError unless `df` is a DataFrame with the feature columns, once each, of the types a feature file has."""
    if not isinstance(df, pd.DataFrame):
        raise InputError(f"expected a pandas DataFrame with columns f000..f783, got {type(df).__name__}")
    missing = [name for name in storage.FEATURE_COLUMNS if name not in df.columns]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise InputError(f"expected the feature columns f000..f783: missing {missing[0]}{more}")
    if df.columns.duplicated().any():
        raise InputError(f"column {df.columns[df.columns.duplicated()][0]} appears more than once")
    # A label, like any other column, is ignored: predictions do not read it.
    checked = [*storage.FEATURE_COLUMNS, *(["sample_id"] if "sample_id" in df.columns else [])]
    storage.check_column_types(_column_type(name, df[name].dtype) for name in checked)
    if "sample_id" in df.columns and df["sample_id"].isna().any():
        raise InputError("column sample_id has missing values")


def _column_type(name: str, kind: object) -> tuple[str, object, bool, bool]:
    number = pd.api.types.is_numeric_dtype(kind) and not pd.api.types.is_bool_dtype(kind)
    return name, kind, number, pd.api.types.is_integer_dtype(kind)


def _feature_batches(df: pd.DataFrame) -> Iterator[tuple[np.ndarray, np.ndarray, None]]:
    """(sample_id, features (784, rows) float32, no label) batches of a DataFrame, checked first."""
    _check_columns(df)
    for start in range(0, len(df), BATCH_ROWS):
        block = df.iloc[start : start + BATCH_ROWS]
        # Column-major, as generated data and Parquet columns are: the layout `featuresum score` scores.
        features = np.stack(
            [block[name].to_numpy(dtype=np.float32, na_value=np.nan) for name in storage.FEATURE_COLUMNS]
        )
        if not np.isfinite(features).all():
            raise InputError("features contain NaN, infinite or missing values")
        if "sample_id" in df.columns:
            sample_id = block["sample_id"].to_numpy(dtype=np.int64)
        else:
            sample_id = np.arange(start, start + len(block), dtype=np.int64)
        yield sample_id, features, None


def _registered(reference: str | int | Path, registry: Registry) -> Version | None:
    """The registry version a reference names, or None when it names a checkpoint file."""
    if isinstance(reference, bool) or not isinstance(reference, str | int | Path):
        raise InputError(f"expected a checkpoint path, a version number or `champion`, got {reference!r}")
    if isinstance(reference, int):
        return registry.resolve(str(reference))
    if isinstance(reference, Path) or storage.is_remote(reference) or Path(reference).exists():
        return None
    text = reference.strip()
    # Anything that looks like a file name is one; a bare word is an alias such as `champion`.
    if text.isdecimal() or (text and "/" not in text and "." not in text):
        return registry.resolve(text)
    return None


def load_model(reference: str | int | Path, artifacts_dir: str | Path = "artifacts", device: str = "cpu") -> Model:
    """A model by checkpoint path, version number (3 or "3") or alias ("champion") of the registry in artifacts_dir."""
    registry = Registry(artifacts_dir)
    version = _registered(reference, registry)
    path = storage.at(version.checkpoint if version else reference)
    checkpoint = load_checkpoint(path, version.fingerprint if version else None)  # a version's own weights
    if version is None:
        version = registry.find(storage.fingerprint(path))
    target = torch.device(device)
    return Model(
        module=model_from_checkpoint(checkpoint, target),
        device=target,
        checkpoint=str(path),
        version=version.version if version else None,
        metrics=dict(version.metrics if version else checkpoint.get("metrics") or {}),
    )


def registry(artifacts_dir: str | Path = "artifacts") -> pd.DataFrame:
    """One row per registered version, oldest first; aliases as a comma-joined string."""
    rows = [
        {
            "version": v.version,
            "checkpoint": v.checkpoint,
            "run_date": v.run_date,
            "val_accuracy": v.metrics.get("val_accuracy"),
            "aliases": ",".join(v.aliases),
            "created": v.created,
            "flow_run_id": v.flow_run_id,
        }
        for v in Registry(artifacts_dir).versions()
    ]
    table = pd.DataFrame(rows, columns=REGISTRY_COLUMNS)
    return table.astype({"version": "int64", "val_accuracy": "float64"})

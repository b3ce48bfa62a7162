"""Models in the original script's format: a plain state_dict of SimpleNN (fc1, fc2) saved with torch.save.

`import_state_dict` wraps such a file into a featuresum checkpoint, measures it on the pipeline's held-out
rows and registers it as a version; `export_state_dict` writes a checkpoint's weights back as a plain
state_dict, which the original script's `SimpleNN().load_state_dict(torch.load(path))` accepts.

Importing is idempotent by content: the same .pth bytes (from any path) always give the same version,
measured once. The registry keys a version by its checkpoint file's fingerprint, as for trained models,
and an import records the .pth file's SHA-256 in the version's config, which a later import looks for
first. The wrapped checkpoint is named by that SHA-256, so one .pth has one checkpoint file; it holds only
the weights, where they were first imported from and that SHA-256 (no metrics, no time, and torch.save
writes the same bytes for the same content), and a readable one already there is reused as it is.
"""

import hashlib
import io
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path
from typing import Any

import torch
from torch import nn

from featuresum.tasks import data, storage, training
from featuresum.tasks.checkpoint import (
    CHECKPOINT_FORMAT,
    ZIP_MAGIC,
    load_checkpoint,
    load_weights_only,
    model_from_checkpoint,
    save_checkpoint,
)
from featuresum.tasks.errors import InputError
from featuresum.tasks.model import FeatureSumMLP, ModelConfig
from featuresum.tasks.registry import Registry, Version

IMPORTED_PREFIX = "model-imported-"
STATE_DICT = "a state_dict saved with torch.save(model.state_dict(), path)"


@dataclass(frozen=True)
class Imported:
    """The version an imported file is registered as, and whether an earlier import registered it."""

    version: Version
    already_registered: bool


def expected_shapes() -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of the classifier: those of the original script's SimpleNN."""
    # On the meta device no memory is allocated and no random draw is made.
    with torch.device("meta"):
        model = FeatureSumMLP(ModelConfig())
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def _names(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def check_state_dict(state_dict: object, where: str | Path) -> dict[str, torch.Tensor]:
    """The original SimpleNN's tensors as float32, contiguous, on the CPU, in layer order; InputError otherwise."""
    if isinstance(state_dict, Mapping) and state_dict.get("format") == CHECKPOINT_FORMAT:
        raise InputError(f"{where}: is a featuresum checkpoint, not {STATE_DICT}; use it as it is")
    if not isinstance(state_dict, Mapping) or not all(
        isinstance(name, str) and isinstance(value, torch.Tensor) for name, value in state_dict.items()
    ):
        raise InputError(
            f"{where}: not a state_dict of tensors (found {type(state_dict).__name__}); expected {STATE_DICT}"
        )
    expected = expected_shapes()
    missing = [name for name in expected if name not in state_dict]
    unexpected = [name for name in state_dict if name not in expected]
    if missing or unexpected:
        problems = [f"missing {_names(missing)}"] if missing else []
        problems += [f"unexpected {_names(unexpected)}"] if unexpected else []
        raise InputError(f"{where}: not the original SimpleNN's state_dict ({'; '.join(problems)})")
    weights = {}
    for name, shape in expected.items():
        tensor = state_dict[name]
        if tuple(tensor.shape) != shape:
            raise InputError(f"{where}: {name} has shape {tuple(tensor.shape)}, expected {shape} (784 -> 128 -> 10)")
        if not tensor.is_floating_point():
            raise InputError(f"{where}: {name} has dtype {tensor.dtype}, expected floating point")
        tensor = tensor.detach().to("cpu", torch.float32).contiguous().clone()
        if not torch.isfinite(tensor).all():
            raise InputError(f"{where}: {name} holds NaN or infinite values")
        weights[name] = tensor
    return weights


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a plain state_dict without running code stored in it, and check it fits the classifier."""
    if path.is_dir():
        raise InputError(f"{path}: is a directory; expected {STATE_DICT}")
    try:
        with path.open("rb") as f:
            magic = f.read(len(ZIP_MAGIC))
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except OSError as error:
        raise InputError(f"{path}: cannot be read ({error.strerror})") from None
    if magic != ZIP_MAGIC:
        raise InputError(f"{path}: not a PyTorch file (nothing was loaded); expected {STATE_DICT}")
    refused = (
        f"it holds more than tensors, e.g. a whole pickled model (loading it could run code); expected {STATE_DICT}"
    )
    return check_state_dict(load_weights_only(path, path, "file", refused), path)


def wrap_state_dict(weights: dict[str, torch.Tensor], source: str, source_fingerprint: str) -> dict[str, Any]:
    """A featuresum checkpoint of imported weights: it loads and scores like a trained one, but cannot resume."""
    return {
        "format": CHECKPOINT_FORMAT,
        "model": weights,
        "model_config": asdict(ModelConfig()),
        "class_boundaries": list(data.CLASS_BOUNDARIES),
        "train_config": {"imported_from": source},
        "optimizer": None,
        "scheduler": None,
        "rng_state": None,
        "epoch": 0,
        "history": [],
        "source_fingerprint": source_fingerprint,
    }


def imported_checkpoint_path(artifacts_dir: storage.Location, source_fingerprint: str) -> storage.Location:
    """Where the checkpoint wrapping the .pth file with this SHA-256 is kept."""
    return storage.join(artifacts_dir, f"{IMPORTED_PREFIX}{source_fingerprint[:16]}.pt")


def _holds_import(path: storage.Location, source_fingerprint: str) -> bool:
    """Whether `path` is a readable checkpoint wrapping the .pth file with this SHA-256."""
    if not storage.exists(path):
        return False
    try:
        return load_checkpoint(path).get("source_fingerprint") == source_fingerprint
    except InputError:
        return False  # a damaged or foreign file under our name is replaced


def _imported_version(registry: Registry, source_fingerprint: str) -> Version | None:
    """The version an earlier import of the .pth file with this SHA-256 registered, if any."""
    for version in registry.versions():
        if version.config.get("source_fingerprint") == source_fingerprint:
            return version
    return None


def _restore_checkpoint(version: Version, weights: dict[str, torch.Tensor], source_fingerprint: str) -> None:
    """Write an imported version's deleted checkpoint again, if its bytes come out the same (the same torch)."""
    buffer = io.BytesIO()
    torch.save(wrap_state_dict(weights, version.config["imported_from"], source_fingerprint), buffer)
    if hashlib.sha256(buffer.getbuffer()).hexdigest() == version.fingerprint:
        storage.write_bytes(version.checkpoint, buffer.getvalue())


def holdout_accuracy(
    model: nn.Module, seed: int, rows: int, day: date | None = None, drift: float = 0.0
) -> tuple[float, int]:
    """Accuracy on held-out rows of the seed (of its partition for `day`), generated in memory; and their count."""
    confusion = torch.zeros(data.NUM_CLASSES, data.NUM_CLASSES, dtype=torch.int64)
    for shard in data.generate_dataset(seed, "holdout", rows, day, drift):
        # Row-major like the rows training reads from Parquet, so the numbers match the promotion gate's.
        confusion += training.evaluate(model, shard.features.T.contiguous(), shard.label)
    return training.accuracy(confusion), int(confusion.sum())


def import_state_dict(
    path: Path,
    artifacts_dir: storage.Location,
    holdout_samples: int,
    seed: int,
    day: date | None = None,
    drift: float = 0.0,
) -> Imported:
    """Register a plain state_dict file as a model version, measured on held-out rows; the champion stays as it is.

    With `day`, the rows are that date's held-out partition, the rows a pipeline run of that date (same
    seed and drift) is judged on; without, the seed's undated held-out rows.
    """
    weights = read_state_dict(path)
    source_fingerprint = storage.fingerprint(path)
    target = imported_checkpoint_path(storage.resolve(artifacts_dir), source_fingerprint)
    registry = Registry(artifacts_dir)
    # One import of a file at a time, so two at once neither rewrite the checkpoint nor measure it twice.
    with storage.local_lock(target):
        if (known := _imported_version(registry, source_fingerprint)) is not None:
            if not storage.exists(known.checkpoint):
                _restore_checkpoint(known, weights, source_fingerprint)
            return Imported(known, already_registered=True)
        if not _holds_import(target, source_fingerprint):
            save_checkpoint(target, wrap_state_dict(weights, str(path.resolve()), source_fingerprint))
        fingerprint = storage.fingerprint(target)
        if (known := registry.find(fingerprint)) is not None:
            return Imported(known, already_registered=True)
        checkpoint = load_checkpoint(target)
        model = model_from_checkpoint(checkpoint, torch.device("cpu"))
        accuracy, rows = holdout_accuracy(model, seed, holdout_samples, day, drift)
        dated = {"date": day.isoformat(), "drift": drift} if day else {}
        version = registry.register(
            str(target),
            fingerprint,
            config={**checkpoint["train_config"], "source_fingerprint": source_fingerprint, "seed": seed, **dated},
            metrics={"val_accuracy": accuracy, "holdout_rows": rows},
        )
    return Imported(version, already_registered=False)


def _is_checkpoint(path: storage.Location) -> bool:
    try:
        load_checkpoint(path)
    except InputError:
        return False
    return True


def export_state_dict(
    checkpoint_path: storage.Location, output: storage.Location, fingerprint: str | None = None
) -> None:
    """Write a checkpoint's weights to `output` as a plain state_dict (fc1, fc2 on the CPU), atomically.

    With `fingerprint` (a registered version's), other bytes at `checkpoint_path` are refused.
    """
    if not storage.is_remote(output) and Path(output).is_dir():
        raise InputError(f"{output}: is a directory; give a file name such as model.pth")
    if storage.resolve(output) == storage.resolve(checkpoint_path):
        raise InputError(f"{output}: is the checkpoint being exported; choose another file")
    if storage.exists(output) and _is_checkpoint(output):  # another project's version, say
        raise InputError(f"{output}: is a featuresum checkpoint, which export never writes over; choose another file")
    weights = check_state_dict(load_checkpoint(checkpoint_path, fingerprint)["model"], checkpoint_path)
    # Serialised in memory first: torch reports a failed file write as a RuntimeError without its errno.
    buffer = io.BytesIO()
    torch.save(weights, buffer)
    storage.write_bytes(output, buffer.getvalue())

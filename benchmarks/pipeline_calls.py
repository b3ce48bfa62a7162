"""The pipeline's plain code, called the way its Prefect tasks call it (without Prefect)."""

from pathlib import Path
from typing import Any

import numpy as np
import torch

from featuresum.tasks import checkpoint, cpu, data, scoring, storage, training


def _task_key(task: str, parameters: dict[str, Any]) -> str:
    """A cache key as the Prefect tasks record one in their manifests (the same hashing work)."""
    return storage.spec_key({"task": task, **parameters})


def generate_parquet(path: Path, rows: int, seed: int, stream: str = "train") -> dict[str, Any]:
    """What the generate task does: stream generated shards to Parquet, then record the manifest."""
    # Each next shard drawn into one of two reused buffers while the last is written, as in the task.
    shards = map(storage.shard_to_batch, cpu.ahead(data.generate_dataset(seed, stream, rows, reuse=True)))
    written = storage.write_parquet(path, storage.DATASET_SCHEMA, shards)
    spec = {"stream": stream, "rows": rows, "seed": seed, "code": storage.code_version()}
    key = _task_key("generate_dataset", {"stream": stream, "rows": rows, "seed": seed, "path": str(path)})
    return storage.write_manifest(path, key, storage.spec_key(spec), written, rows=written.rows)


def dataset_in_memory(seed: int, stream: str, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Generated rows as row-major (rows, 784) features and labels, without a Parquet round trip."""
    features = np.empty((rows, data.NUM_FEATURES), dtype=np.float32)
    labels = np.empty(rows, dtype=np.int64)
    start = 0
    for shard in data.generate_dataset(seed, stream, rows):
        end = start + len(shard.label)
        features[start:end] = shard.features.numpy().T
        labels[start:end] = shard.label.numpy()
        start = end
    return torch.from_numpy(features), torch.from_numpy(labels)


def save_untrained_checkpoint(path: Path, seed: int = 0) -> None:
    """A valid checkpoint of a freshly initialised model (scoring speed does not depend on the weights)."""
    config = training.TrainConfig(seed=seed)
    state = training.new_training_state(config, 1, torch.device("cpu"))
    checkpoint.save_checkpoint(path, training.to_checkpoint(state, config, {}))


def score_parquet(model: Path, source: Path, destination: Path, device: str = "cpu") -> scoring.ScoreSummary:
    """What the score task does: load the checkpoint, stream batches through the model into Parquet."""
    target = torch.device(device)
    classifier = checkpoint.model_from_checkpoint(checkpoint.load_checkpoint(model), target)
    summary = scoring.ScoreSummary()
    batches = storage.iter_feature_batches(source)
    predictions = scoring.score_batches(classifier, batches, target, summary)
    written = storage.write_parquet(destination, storage.PREDICTIONS_SCHEMA, predictions)
    key = _task_key("score_shard", {"model": str(model), "features": str(source), "device": device})
    storage.write_manifest(destination, key, written=written, rows=written.rows, score_accuracy=summary.accuracy)
    return summary

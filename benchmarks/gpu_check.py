"""Train and score with the pipeline's code on cuda and on the CPU, same data; print a markdown table.

`python -m benchmarks.gpu_check` (200k training rows, 3 epochs) or `--quick` (tiny). Without a GPU
it says so, measures the CPU rows only, and exits 0.
"""

import argparse
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks import pipeline_calls
from benchmarks.measure import cpu_model
from benchmarks.report import table
from featuresum.tasks import data, scoring, training

SEED = 0


@dataclass(frozen=True)
class Outcome:
    """What one (device, batch size) configuration achieved."""

    device: str
    batch_size: int
    epoch_seconds: tuple[float, ...]
    held_out_accuracy: float
    score_seconds: float
    score_accuracy: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    device: str,
    batch_size: int,
    epochs: int,
    train: tuple[torch.Tensor, torch.Tensor],
    holdout: tuple[torch.Tensor, torch.Tensor],
    score_shards: list[data.Shard],
) -> Outcome:
    """Train with training.train_epoch, evaluate, then score with scoring.score_batches, on one device."""
    target = torch.device(device)
    x, y = (t.to(target) for t in train)
    holdout_x, holdout_y = (t.to(target) for t in holdout)
    # Warm-up on a throwaway model: the first steps pay for kernel selection and allocator growth.
    warm = training.TrainConfig(epochs=1, batch_size=batch_size, seed=SEED)
    training.train_epoch(training.new_training_state(warm, 2, target), (x[: 2 * batch_size], y[: 2 * batch_size]), warm)
    config = training.TrainConfig(epochs=epochs, batch_size=batch_size, seed=SEED)
    state = training.new_training_state(config, math.ceil(len(x) / batch_size), target)
    epoch_seconds = []
    for _ in range(epochs):
        _sync(target)
        start = time.perf_counter()
        training.train_epoch(state, (x, y), config)
        _sync(target)
        epoch_seconds.append(time.perf_counter() - start)
    held_out = training.accuracy(training.evaluate(state.model, holdout_x, holdout_y))
    # Scoring starts from host memory, as the pipeline's does (each batch is copied to the device).
    batches = [(s.sample_id.numpy(), s.features.numpy(), s.label.numpy()) for s in score_shards]
    summary = scoring.ScoreSummary()
    _sync(target)
    start = time.perf_counter()
    for _ in scoring.score_batches(state.model, batches, target, summary):
        pass
    _sync(target)
    score_seconds = time.perf_counter() - start
    return Outcome(device, batch_size, tuple(epoch_seconds), held_out, score_seconds, summary.accuracy or 0.0)


def main() -> None:
    """Measure cpu (batch 1024) and, where present, cuda (batch 1024 and 8192); print the table."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that it works, not how fast")
    parser.add_argument("--rows", type=int, default=200_000, help="training rows (also the rows scored)")
    parser.add_argument("--holdout-rows", type=int, default=50_000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--output", type=Path, help="also write the table to this file")
    args = parser.parse_args()
    rows, holdout_rows, epochs = (20_000, 5_000, 1) if args.quick else (args.rows, args.holdout_rows, args.epochs)

    has_cuda = torch.cuda.is_available()
    gpu = torch.cuda.get_device_name(0) if has_cuda else None
    if not has_cuda:
        print("No GPU is present (torch.cuda.is_available() is False): measuring the CPU only.", file=sys.stderr)
    started = time.perf_counter()
    train = pipeline_calls.dataset_in_memory(SEED, "train", rows)
    holdout = pipeline_calls.dataset_in_memory(SEED, "holdout", holdout_rows)
    score_shards = list(data.generate_dataset(SEED, "score", rows))
    configurations = [("cpu", 1024)] + ([("cuda", 1024), ("cuda", 8192)] if has_cuda else [])
    outcomes = []
    for device, batch_size in configurations:
        outcomes.append(measure(device, batch_size, epochs, train, holdout, score_shards))
        print(f"measured {device} batch {batch_size}", file=sys.stderr, flush=True)

    cpu = outcomes[0]

    def train_rate(outcome: Outcome) -> float:
        return rows / statistics.median(outcome.epoch_seconds)

    def score_rate(outcome: Outcome) -> float:
        return rows / outcome.score_seconds

    body = [
        [
            f"{o.device} ({gpu if o.device == 'cuda' else f'{torch.get_num_threads()} threads'})",
            o.batch_size,
            f"{train_rate(o):,.0f}",
            f"{train_rate(o) / train_rate(cpu):.1f}",
            f"{sum(o.epoch_seconds):.1f}",
            f"{o.held_out_accuracy:.4f}",
            f"{score_rate(o):,.0f}",
            f"{score_rate(o) / score_rate(cpu):.1f}",
            f"{o.score_accuracy:.4f}",
        ]
        for o in outcomes
    ]
    lines = [
        f"GPU: {gpu or 'none present'}; CPU: {cpu_model()}, "
        f"torch {torch.__version__}, TF32 matmul {'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'}.",
        f"{rows:,} training rows, {epochs} epoch(s), AdamW lr 0.003 one-cycle (the pipeline's defaults but the batch "
        f"size); held-out accuracy on {holdout_rows:,} rows; {rows:,} rows scored with `scoring.score_batches` from "
        "host memory. Training samples/s is the median epoch's; a few warm-up steps are not timed.",
        "",
        *table(
            [
                "device",
                "batch",
                "train samples/s",
                "× cpu",
                "train s (all epochs)",
                "held-out accuracy",
                "scoring rows/s",
                "× cpu",
                "scored accuracy",
            ],
            body,
        ),
        "",
        f"Total {time.perf_counter() - started:.0f} s including data generation.",
    ]
    text = "\n".join(lines)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")


if __name__ == "__main__":
    main()

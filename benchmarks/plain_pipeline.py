"""The whole job as one plain script, no Prefect: the end-to-end baseline for `featuresum run`.

Generates the training, held-out and score files to Parquet, reads them back, trains, evaluates,
saves a checkpoint, scores the score file and writes predictions; prints one JSON object with the
held-out accuracy and the seconds of each stage.
"""

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks import bare


def main() -> None:
    """Run the job with the given sizes and settings."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--train-samples", type=int, required=True)
    parser.add_argument("--holdout-samples", type=int, required=True)
    parser.add_argument("--score-samples", type=int, required=True)
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--weight-decay", type=float, required=True)
    parser.add_argument("--schedule", choices=("onecycle", "constant"), required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    args.out_dir.mkdir(parents=True, exist_ok=True)
    files = {name: str(args.out_dir / f"{name}.parquet") for name in ("train", "holdout", "score")}
    stages: dict[str, float] = {}
    clock = time.perf_counter()

    def stage(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        stages[name] = now - clock
        clock = now

    bare.generate_parquet(files["train"], args.train_samples, args.seed)
    bare.generate_parquet(files["holdout"], args.holdout_samples, args.seed + 1)
    bare.generate_parquet(files["score"], args.score_samples, args.seed + 2)
    stage("generate")
    _, features, label = bare.read_parquet(files["train"])
    x, y = bare.rows_tensor(features), torch.from_numpy(label)
    _, features, label = bare.read_parquet(files["holdout"])
    holdout_x, holdout_y = bare.rows_tensor(features), torch.from_numpy(label)
    del features
    stage("read")
    model, optimizer = bare.train(
        x, y, args.epochs, args.batch_size, args.lr, args.weight_decay, args.schedule, args.seed
    )
    stage("train")
    val_accuracy = bare.accuracy(model, holdout_x, holdout_y)
    stage("evaluate")
    checkpoint = str(args.out_dir / "model.pt")
    bare.save_checkpoint(checkpoint, model, optimizer)
    stage("checkpoint")
    rows = bare.score_parquet(bare.load_model(checkpoint), files["score"], str(args.out_dir / "predictions.parquet"))
    stage("score")
    print(json.dumps({"val_accuracy": val_accuracy, "scored_rows": rows, "stages": stages}))


if __name__ == "__main__":
    main()

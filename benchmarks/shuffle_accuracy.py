"""Held-out accuracy of the block shuffle that lets training stream, against a shuffle of every row.

For each seed, the same rows, initial weights and settings train twice with the pipeline's own code
(`training.fit` on rows in memory): once in the order training uses (row groups of 32,768 rows in a
random order, then the rows of each run of `shuffle_rows` rows in a random order), once with every
row of the epoch in one random order (one block, one run: a plain `torch.randperm` per epoch, the
order training used before it could stream). Only the order differs.

    python -m benchmarks.shuffle_accuracy [--preset default] [--seeds 0,1,2,3,4] [--out FILE]
"""

import argparse
import statistics
import sys
import time
from dataclasses import replace

import torch

from benchmarks.measure import HostLoad
from benchmarks.pipeline_calls import dataset_in_memory
from benchmarks.report import table, written_by
from featuresum.flows.options import PipelineOptions
from featuresum.tasks import batches, training


def held_out_accuracy(config: training.TrainConfig, rows: batches.InMemory, holdout: tuple) -> tuple[float, float]:
    """Held-out accuracy after `fit` on `rows`, and fit's seconds."""
    state = training.new_training_state(config, -(-len(rows) // config.batch_size), torch.device("cpu"))
    start = time.perf_counter()
    training.fit(state, rows, holdout, config)
    return training.accuracy(training.evaluate(state.model, *holdout)), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="default")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--out", help="also write the Markdown section here")
    args = parser.parse_args()
    options = PipelineOptions.from_preset(args.preset)
    started, results = time.time(), []
    with HostLoad() as load:
        for seed in map(int, args.seeds.split(",")):
            config = replace(options.train_config(), seed=seed)
            x, y = dataset_in_memory(seed, "train", options.train_samples)
            holdout = dataset_in_memory(seed, "holdout", options.holdout_samples)
            block, block_s = held_out_accuracy(config, batches.InMemory(x, y), holdout)
            whole = replace(config, shuffle_rows=len(x))
            every, every_s = held_out_accuracy(whole, batches.InMemory(x, y, [len(x)]), holdout)
            results.append((seed, every, block, block - every, every_s, block_s))
            print(results[-1], file=sys.stderr, flush=True)
            del x, y
    differences = [r[3] for r in results]
    lines = [
        "## The block shuffle's accuracy",
        "",
        f"{written_by('benchmarks.shuffle_accuracy', started)}; other processes kept {load.foreign_cores:.2f}"
        " cores busy on average.",
        "",
        f"The {args.preset} preset ({options.train_samples:,} rows, {options.epochs} epochs, batch"
        f" {options.batch_size}, lr {options.lr}), trained per seed with `training.fit` on the same rows and"
        f" initial weights, in two orders: every row shuffled at once, and the block shuffle (row groups of"
        f" 32,768 rows, runs of {options.shuffle_rows:,} rows). Held-out accuracy on {options.holdout_samples:,}"
        " rows of the seed's held-out stream.",
        "",
        *table(
            ["seed", "every row shuffled", "block shuffle", "difference", "fit s (every row)", "fit s (block)"],
            [[s, f"{a:.4f}", f"{b:.4f}", f"{d:+.4f}", f"{sa:.1f}", f"{sb:.1f}"] for s, a, b, d, sa, sb in results],
        ),
        "",
        f"Mean difference {statistics.mean(differences):+.4f}; median {statistics.median(differences):+.4f};"
        f" largest {max(differences, key=abs):+.4f}. Seed to seed, the accuracy with every row shuffled spans"
        f" {min(r[1] for r in results):.4f} to {max(r[1] for r in results):.4f}.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as out:
            out.write(text)


if __name__ == "__main__":
    main()

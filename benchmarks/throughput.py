"""Figures 1-3: generation, training and scoring throughput of the pipeline's code against bare baselines."""

import math
from pathlib import Path

import pyarrow.parquet as pq
import torch

from benchmarks import bare, pipeline_calls
from benchmarks.measure import HostLoad, Spread, best_ratio, interleave, ratios, settle_disk, timed
from benchmarks.report import Check, Figure, table
from benchmarks.sizes import Sizes
from featuresum.tasks import training

SEED = 0
CPU = torch.device("cpu")


def _clear(path: Path) -> None:
    """Remove an output (and its manifest) and flush dirty pages, so no repetition pays for another's writes."""
    path.unlink(missing_ok=True)
    path.with_name(path.name + ".json").unlink(missing_ok=True)
    settle_disk()


def _rates(rows: int, seconds: list[float]) -> Spread:
    return Spread.of([rows / s for s in seconds])


def generation(sizes: Sizes, workdir: Path) -> Figure:
    """Rows/s of generating a labelled dataset into Parquet: pipeline path vs torch.randn + write_table."""
    rows = sizes.generation_rows
    ours, theirs = workdir / "generated-pipeline.parquet", workdir / "generated-bare.parquet"

    def pipeline() -> float:
        _clear(ours)
        return timed(lambda: pipeline_calls.generate_parquet(ours, rows, SEED))

    def baseline() -> float:
        _clear(theirs)
        return timed(lambda: bare.generate_parquet(str(theirs), rows, SEED))

    with HostLoad() as load:
        pipeline_calls.generate_parquet(ours, 1_000, SEED)
        bare.generate_parquet(str(theirs), 1_000, SEED)
        seconds = interleave(sizes.reps, {"pipeline": pipeline, "bare": baseline})
        file_sizes = {path.name: path.stat().st_size for path in (ours, theirs)}
        _clear(ours)
        _clear(theirs)
    ratio = ratios(seconds["bare"], seconds["pipeline"])
    body = [
        f"{rows:,} rows of 784 float32 features, `sample_id` and `label` per repetition, {sizes.reps} repetitions, "
        "pipeline and bare interleaved; dirty pages are flushed (untimed) before each repetition.",
        "",
        "- **pipeline**: `storage.write_parquet(path, DATASET_SCHEMA, map(shard_to_batch, "
        "cpu.ahead(data.generate_dataset(..., reuse=True))))` then `storage.write_manifest(path, content_key=...)` "
        "(generated in shards, each next one "
        "drawn into one of two reused buffers while the last is written, renamed into place after an fsync).",
        "- **bare**: one `torch.randn(784, rows)`, labels by `bucketize` of the float64 sums, `pq.write_table` with "
        "dictionary, compression and statistics off (the pipeline's options), no fsync.",
        "",
        *table(
            ["", "rows/s (min / **median** / max)", "file bytes"],
            [
                ["pipeline", _rates(rows, seconds["pipeline"]).format(",.0f"), f"{file_sizes[ours.name]:,}"],
                ["bare", _rates(rows, seconds["bare"]).format(",.0f"), f"{file_sizes[theirs.name]:,}"],
                ["pipeline ÷ bare", ratio.format(".2f"), ""],
                ["fastest pipeline ÷ fastest bare", f"{best_ratio(seconds['bare'], seconds['pipeline']):.2f}", ""],
            ],
        ),
    ]
    check = Check("generation rows/s, pipeline ÷ bare", ratio.format(".2f"), ">= 0.8", ratio.median >= 0.8)
    return Figure("1. Generation to Parquet", [check], body, load.wall, load.foreign_cores)


def training_throughput(sizes: Sizes, workdir: Path) -> Figure:
    """Samples/s of one epoch: the pipeline's train_epoch and fit against a bare loop (same model and optimiser)."""
    rows, holdout_rows = sizes.training_rows, sizes.training_holdout_rows
    x, y = pipeline_calls.dataset_in_memory(SEED, "train", rows)
    holdout = pipeline_calls.dataset_in_memory(SEED, "holdout", holdout_rows)
    checks, lines = [], []
    with HostLoad() as load:
        for batch_size in sizes.training_batch_sizes:
            config = training.TrainConfig(epochs=1, batch_size=batch_size, seed=SEED)
            steps = math.ceil(rows / batch_size)

            def pipeline_epoch(config=config, steps=steps) -> float:
                state = training.new_training_state(config, steps, CPU)
                return timed(lambda: training.train_epoch(state, (x, y), config))

            def pipeline_fit(config=config, steps=steps) -> float:
                state = training.new_training_state(config, steps, CPU)
                return timed(lambda: training.fit(state, (x, y), holdout, config))

            def bare_epoch(config=config, steps=steps, evaluate=False) -> float:
                model, optimizer, scheduler = bare.new_model(
                    config.lr, config.weight_decay, config.schedule, steps, SEED
                )

                def work() -> None:
                    bare.train_one_epoch(model, optimizer, scheduler, x, y, config.batch_size)
                    if evaluate:
                        bare.accuracy(model, *holdout)

                return timed(work)

            def dataloader_epoch(config=config) -> float:
                model, optimizer = bare.dataloader_model(config.lr, config.weight_decay, SEED)
                return timed(lambda: bare.train_one_epoch_dataloader(model, optimizer, x, y, config.batch_size))

            variants = {
                "train_epoch": pipeline_epoch,
                "bare epoch": bare_epoch,
                "DataLoader epoch": dataloader_epoch,
                "fit": pipeline_fit,
                "bare epoch + evaluation": lambda bare_epoch=bare_epoch: bare_epoch(evaluate=True),
            }
            # Warm-up: first calls pay for thread pools and allocator growth.
            warm = training.TrainConfig(epochs=1, batch_size=batch_size, seed=SEED)
            training.train_epoch(
                training.new_training_state(warm, 4, CPU), (x[: 4 * batch_size], y[: 4 * batch_size]), warm
            )
            model, optimizer, scheduler = bare.new_model(warm.lr, warm.weight_decay, warm.schedule, 4, SEED)
            bare.train_one_epoch(model, optimizer, scheduler, x[: 4 * batch_size], y[: 4 * batch_size], batch_size)
            seconds = interleave(sizes.training_reps, variants)
            pairs = {"train_epoch": "bare epoch", "fit": "bare epoch + evaluation"}
            paired = {ours: ratios(seconds[theirs], seconds[ours]) for ours, theirs in pairs.items()}
            user = ratios(seconds["DataLoader epoch"], seconds["train_epoch"])
            labels = {
                "train_epoch": "pipeline `train_epoch`",
                "bare epoch": "bare epoch",
                "DataLoader epoch": "user's DataLoader epoch",
                "fit": "pipeline `fit` (1 epoch + held-out evaluation)",
                "bare epoch + evaluation": "bare epoch + held-out evaluation",
            }
            lines += [f"**Batch {batch_size}** ({steps} steps per epoch)", ""]
            lines += table(
                ["", "samples/s (min / **median** / max)"],
                [[labels[name], _rates(rows, s).format(",.0f")] for name, s in seconds.items()]
                + [[f"`{ours}` ÷ {theirs}", paired[ours].format(".2f")] for ours, theirs in pairs.items()]
                + [
                    [f"fastest `{ours}` ÷ fastest {theirs}", f"{best_ratio(seconds[theirs], seconds[ours]):.2f}"]
                    for ours, theirs in pairs.items()
                ]
                + [["`train_epoch` ÷ user's DataLoader epoch", user.format(".2f")]],
            )
            lines.append("")
            checks += [
                Check(
                    f"`{ours}` samples/s ÷ bare, batch {batch_size}", ratio.format(".2f"), ">= 0.9", ratio.median >= 0.9
                )
                for ours, ratio in paired.items()
            ]
            checks.append(
                Check(f"`train_epoch` samples/s ÷ user's DataLoader loop, batch {batch_size}", user.format(".2f"))
            )
    config = training.TrainConfig()
    body = [
        f"{rows:,} in-memory training rows and {holdout_rows:,} held-out rows; FeatureSumMLP, AdamW "
        f"(lr {config.lr}, weight decay {config.weight_decay}), one-cycle over the epoch; "
        f"{sizes.training_reps} repetitions, the five variants interleaved in rotating order. The bare loop is "
        "`randperm`, index the batch, forward, cross-entropy, `zero_grad`, backward, step, scheduler step. The "
        "user's DataLoader loop is written independently, as PyTorch's tutorials teach: an `nn.Sequential` of the "
        "same layers, `TensorDataset` + `DataLoader(shuffle=True)`, `nn.CrossEntropyLoss`, AdamW, no schedule.",
        "",
        *lines,
    ]
    return Figure("2. Training throughput", checks, body, load.wall, load.foreign_cores)


def scoring_throughput(sizes: Sizes, workdir: Path) -> Figure:
    """Rows/s of scoring a feature file into a predictions file: streamed pipeline path vs two bare scorers."""
    rows = sizes.scoring_rows
    source, model = workdir / "score-input.parquet", workdir / "model.pt"
    outputs = {
        name: workdir / f"predictions-{name}.parquet" for name in ("pipeline", "bare whole-file", "bare streaming")
    }
    pipeline_calls.generate_parquet(source, rows, SEED, "score")
    pipeline_calls.save_untrained_checkpoint(model)
    scorers = {
        "pipeline": lambda: pipeline_calls.score_parquet(model, source, outputs["pipeline"]),
        "bare whole-file": lambda: bare.score_parquet(
            bare.load_model(str(model)), str(source), str(outputs["bare whole-file"])
        ),
        "bare streaming": lambda: bare.stream_score_parquet(
            bare.load_model(str(model)), str(source), str(outputs["bare streaming"])
        ),
    }

    def repetition(name: str) -> float:
        _clear(outputs[name])
        return timed(scorers[name])

    with HostLoad() as load:
        for score in scorers.values():
            score()
        seconds = interleave(sizes.reps, {name: lambda name=name: repetition(name) for name in scorers})
        predicted = [pq.read_table(path, columns=["predicted_class"]) for path in outputs.values()]
        same = all(table.equals(predicted[0]) for table in predicted[1:])
        for path in outputs.values():
            _clear(path)
    source_bytes = source.stat().st_size
    source.unlink()
    baselines = ("bare whole-file", "bare streaming")
    paired = {name: ratios(seconds[name], seconds["pipeline"]) for name in baselines}
    body = [
        f"{rows:,} labelled rows ({source_bytes:,} bytes) scored by "
        f"the same checkpoint, {sizes.reps} repetitions of the three scorers interleaved, in this process; the "
        "input is in the page cache for all.",
        "",
        "- **pipeline**: `load_checkpoint`, `iter_feature_batches` (streamed batches, finiteness check), "
        "`scoring.score_batches`, `write_parquet(..., PREDICTIONS_SCHEMA, ...)` (atomic, fsync), `write_manifest`.",
        "- **bare whole-file**: `torch.load`, `pq.read_table` of the whole file, one forward pass, `pq.write_table`.",
        "- **bare streaming**: `torch.load`, `pq.ParquetFile(path).iter_batches(65,536 rows)`, a forward pass and "
        "a `pq.ParquetWriter.write_batch` per batch (no fsync), with pyarrow's defaults: `pre_buffer=True` keeps "
        "the column chunks it has read, so its memory grows with the file (the pipeline opens files with "
        "`pre_buffer=False`); the whole-file scorer holds the file twice over.",
        f"- All three wrote the same predicted classes: {'yes' if same else '**no**'}.",
        "",
        *table(
            ["", "rows/s (min / **median** / max)"],
            [
                *[[name, _rates(rows, seconds[name]).format(",.0f")] for name in scorers],
                *[[f"pipeline ÷ {name}", paired[name].format(".2f")] for name in baselines],
                *[
                    [f"fastest pipeline ÷ fastest {name}", f"{best_ratio(seconds[name], seconds['pipeline']):.2f}"]
                    for name in baselines
                ],
            ],
        ),
    ]
    whole, streaming = paired["bare whole-file"], paired["bare streaming"]
    checks = [
        Check("scoring rows/s, pipeline ÷ bare whole-file", whole.format(".2f"), ">= 0.7", whole.median >= 0.7),
        Check("scoring rows/s, pipeline ÷ bare streaming", streaming.format(".2f")),
    ]
    return Figure("3. Scoring Parquet to predictions", checks, body, load.wall, load.foreign_cores)

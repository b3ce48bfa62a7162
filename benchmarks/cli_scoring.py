"""Figure 9: `featuresum score` of a large feature file against bare scorers, and the same command repeated.

Every command is a whole process, interpreter start-up included, so the bare scorers run as
subprocesses too (`python -m benchmarks.score_child`). The feature file is generated once with the
pipeline's own code and stays in the page cache for every run.
"""

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from benchmarks import pipeline_calls
from benchmarks.cli_runs import COMMAND_TIMEOUT, CliRun, LocalPrefect, code_digest
from benchmarks.measure import (
    REPO,
    HostLoad,
    Spread,
    best_ratio,
    interleave,
    memory_available_bytes,
    ratios,
    run_watching_rss,
    settle_disk,
    timed,
)
from benchmarks.report import Check, Figure, table
from benchmarks.scaling import BYTES_PER_ROW
from benchmarks.sizes import Sizes
from featuresum.tasks import storage

SEED = 0
TITLE = "9. `featuresum score` of a large file"
CLI = "`featuresum score`"
STREAMING = "bare streaming script"
WHOLE_FILE = "bare whole-file script"
DECODE = "decode alone"
PRODUCTS = "matrix products alone"
# What the input's fingerprint could be: every hash hashlib always has, and BLAKE3.
DIGESTS = ("sha256", "sha1", "md5", "blake2b", "blake3")
# Tasks left out of the all-Cached test of the repeat, which run on every command by design: the
# fingerprint in some revisions (it hashes the inputs that key the cache), and monitoring.
UNCACHED_TASKS = ("fingerprint", "monitor-")


def _remove_output(path: Path) -> None:
    """Delete a predictions file, its manifest and its shard parts, then flush dirty pages (untimed)."""
    path.unlink(missing_ok=True)
    path.with_name(path.name + ".json").unlink(missing_ok=True)
    shutil.rmtree(path.with_name(path.name + ".parts"), ignore_errors=True)
    settle_disk()


def _task_group(name: str) -> str:
    for prefix in ("fingerprint", "score-shard", "write-predictions"):
        if name.startswith(prefix):
            return prefix
    return name


def _grouped(seconds: dict[str, float]) -> dict[str, float]:
    """Task run seconds summed per kind of task (all shards together, both fingerprints together)."""
    groups: dict[str, float] = {}
    for name, value in seconds.items():
        groups[_task_group(name)] = groups.get(_task_group(name), 0.0) + value
    return groups


def _score_child(scorer: str, model: Path, source: Path, destination: Path) -> tuple[float, dict[str, Any]]:
    """Run a bare scorer as a process of its own; returns its wall seconds and its JSON report."""
    command = [sys.executable, "-m", "benchmarks.score_child", scorer, "--model", str(model)]
    command += ["--input", str(source), "--output", str(destination)]
    with HostLoad() as load:
        result, _ = run_watching_rss(command, COMMAND_TIMEOUT, cwd=REPO)
    if result.returncode != 0:
        raise RuntimeError(f"{scorer} scoring failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return load.wall, {**json.loads(result.stdout), "foreign_cores": load.foreign_cores}


def _floor_part(flag: list[str], model: Path, source: Path) -> float:
    """Seconds one part of the floor takes inside a process of its own (imports and loading left out)."""
    command = [sys.executable, "-m", "benchmarks.score_child", *flag, "--model", str(model), "--input", str(source)]
    result, _ = run_watching_rss(command, COMMAND_TIMEOUT, cwd=REPO)
    if result.returncode != 0:
        raise RuntimeError(f"{flag[0]} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return json.loads(result.stdout)["seconds"]


def _digest_seconds(source: Path, reps: int) -> dict[str, Spread]:
    """Seconds each candidate hash takes over the file, read the way storage.fingerprint reads it."""
    seconds: dict[str, list[float]] = {name: [] for name in DIGESTS}
    for _ in range(reps):
        for name in DIGESTS:
            if name in ("sha256", "blake3"):
                seconds[name].append(timed(lambda name=name: storage.fingerprint(source, name)))
            else:
                seconds[name].append(timed(lambda name=name: hashlib.file_digest(source.open("rb"), name)))
    return {name: Spread.of(values) for name, values in seconds.items()}


def _skip(reason: str) -> Figure:
    return Figure(TITLE, [Check(f"{CLI} rows/s ÷ {STREAMING}", "not measured")], [reason])


def cli_scoring(sizes: Sizes, cli: LocalPrefect) -> Figure:
    """Rows/s of a first `featuresum score --input`, against bare scorers; its repeat as a share of it."""
    rows = sizes.cli_scoring_rows
    file_bytes = rows * BYTES_PER_ROW
    free = shutil.disk_usage(cli.workdir).free
    if free < 1.2 * file_bytes:
        return _skip(f"Not measured: {rows:,} rows need {file_bytes / 1e9:.1f} GB; {free / 1e9:.1f} GB free.")
    # The whole-file scorer holds the table and a stacked copy of its features.
    available = memory_available_bytes()
    whole_file = available >= 2.5 * file_bytes + 2**31
    cli.warm_up()
    source, model = cli.workdir / "cli-scoring-input.parquet", cli.workdir / "cli-scoring-model.pt"
    outputs = iter(range(1_000_000))
    first_runs: list[CliRun] = []
    repeats: list[CliRun] = []
    first_loads: list[float] = []
    cli_tasks: list[dict[str, float]] = []
    repeat_tasks: list[dict[str, float]] = []
    flow_seconds: list[float] = []
    repeat_flow_seconds: list[float] = []
    bare_reports: dict[str, list[dict[str, Any]]] = {STREAMING: [], WHOLE_FILE: []}
    predicted: dict[str, Any] = {}
    edited: list[int] = []

    def keep_classes(name: str, path: Path) -> None:
        if name not in predicted:
            predicted[name] = pq.read_table(path, columns=["predicted_class"])

    def featuresum_score() -> float:
        for attempt in range(3):
            output = cli.workdir / f"cli-scoring-{next(outputs)}.parquet"
            args = ["score", "--model", str(model), "--input", str(source), "--output", str(output)]
            before = code_digest()
            # A touched input is a new file to featuresum (its identity changed), so the first run
            # fingerprints it again, as it would a file it never saw; the content stays the same.
            os.utime(source)
            with HostLoad() as first_load:
                first = cli.featuresum(*args)
            repeat = cli.featuresum(*args)
            keep_classes(CLI, output)
            _remove_output(output)
            if code_digest() == before:
                break
            # Someone changed the pipeline's code meanwhile: the repeat missed the cache for that reason.
            edited.append(attempt)
        first_runs.append(first)
        repeats.append(repeat)
        first_loads.append(first_load.foreign_cores)
        cli_tasks.append(_grouped(cli.task_seconds(first)))
        repeat_tasks.append(_grouped(cli.task_seconds(repeat)))
        flow_seconds.append(cli.flow_seconds(first))
        repeat_flow_seconds.append(cli.flow_seconds(repeat))
        return first.wall

    def bare(name: str, scorer: str) -> float:
        output = cli.workdir / f"cli-scoring-bare-{next(outputs)}.parquet"
        wall, report = _score_child(scorer, model, source, output)
        keep_classes(name, output)
        _remove_output(output)
        bare_reports[name].append(report)
        return wall

    variants = {CLI: featuresum_score, STREAMING: lambda: bare(STREAMING, "--bare-stream")}
    if whole_file:
        variants[WHOLE_FILE] = lambda: bare(WHOLE_FILE, "--bare")
    variants[DECODE] = lambda: _floor_part(["--decode"], model, source)
    variants[PRODUCTS] = lambda: _floor_part(["--matmul", str(rows)], model, source)
    try:
        with HostLoad() as load:
            generation = timed(lambda: pipeline_calls.generate_parquet(source, rows, SEED, "score"))
            pipeline_calls.save_untrained_checkpoint(model)
            source_bytes = source.stat().st_size
            settle_disk()
            seconds = interleave(sizes.e2e_reps, variants)
            digests = _digest_seconds(source, sizes.e2e_reps)
    finally:
        source.unlink(missing_ok=True)
        source.with_name(source.name + ".json").unlink(missing_ok=True)

    scored = {run.summary.get("predicted_rows") for run in first_runs + repeats}
    scored |= {report["rows"] for reports in bare_reports.values() for report in reports}
    same = all(classes.equals(predicted[CLI]) for classes in predicted.values())
    baselines = [name for name in (STREAMING, WHOLE_FILE) if name in seconds]
    paired = {name: ratios(seconds[name], seconds[CLI]) for name in baselines}
    repeat_share = ratios([run.wall for run in repeats], [run.wall for run in first_runs])
    floor = [decode + products for decode, products in zip(seconds[DECODE], seconds[PRODUCTS], strict=True)]
    over_floor = ratios(seconds[CLI], floor)
    shards_over_floor = ratios([times.get("score-shard", 0.0) for times in cli_tasks], floor)
    all_cached = all(
        state == "Cached"
        for run in repeats
        for name, state in run.summary["task_states"].items()
        if not name.startswith(UNCACHED_TASKS)
    )
    peaks = {CLI: Spread.of([run.peak_rss_mib for run in first_runs])}
    peaks.update({name: Spread.of([report["vm_hwm_mib"] for report in bare_reports[name]]) for name in baselines})

    def rate(walls: list[float]) -> str:
        return Spread.of([rows / wall for wall in walls]).format(",.0f")

    def task(group: str, runs: list[dict[str, float]]) -> str:
        return Spread.of([times.get(group, 0.0) for times in runs]).format(".1f")

    summary_rows = [
        [CLI + " (first run)", Spread.of(seconds[CLI]).format(".1f"), rate(seconds[CLI]), peaks[CLI].format(",.0f")],
        [
            CLI + " (repeat, same output)",
            Spread.of([run.wall for run in repeats]).format(".1f"),
            rate([run.wall for run in repeats]),
            Spread.of([run.peak_rss_mib for run in repeats]).format(",.0f"),
        ],
        *[
            [name, Spread.of(seconds[name]).format(".1f"), rate(seconds[name]), peaks[name].format(",.0f")]
            for name in baselines
        ],
        *[[f"{CLI} rows/s ÷ {name}", paired[name].format(".2f"), "", ""] for name in baselines],
        *[
            [f"fastest {CLI} ÷ fastest {name}", f"{best_ratio(seconds[name], seconds[CLI]):.2f}", "", ""]
            for name in baselines
        ],
        ["repeat ÷ first run, wall time", repeat_share.format(".3f"), "", ""],
        [f"the floor: {DECODE} + {PRODUCTS} (inside their processes)", Spread.of(floor).format(".1f"), "", ""],
        [f"{CLI} wall time ÷ the floor", over_floor.format(".2f"), "", ""],
        [f"{CLI}'s score-shard tasks (sum) ÷ the floor", shards_over_floor.format(".2f"), "", ""],
    ]
    breakdown_rows = [
        [
            "flow run time recorded by Prefect",
            Spread.of(flow_seconds).format(".1f"),
            Spread.of(repeat_flow_seconds).format(".1f"),
        ],
        [
            "process wall − flow run time (imports, the CLI's input check, waiting for task-run records)",
            Spread.of([run.wall - flow for run, flow in zip(first_runs, flow_seconds, strict=True)]).format(".1f"),
            Spread.of([run.wall - flow for run, flow in zip(repeats, repeat_flow_seconds, strict=True)]).format(".1f"),
        ],
        *[
            [
                f"task `{group}`" + (" (sum)" if group != "write-predictions" else ""),
                task(group, cli_tasks),
                task(group, repeat_tasks),
            ]
            for group in ("fingerprint", "score-shard", "write-predictions")
        ],
        *[
            [
                f"{name}: scoring inside the process (no imports)",
                Spread.of([r["seconds"] for r in bare_reports[name]]).format(".1f"),
                "",
            ]
            for name in baselines
        ],
        *[[f"{name}, inside the process", Spread.of(seconds[name]).format(".1f"), ""] for name in (DECODE, PRODUCTS)],
    ]
    per_rep = []
    for i, first in enumerate(first_runs):
        streaming = bare_reports[STREAMING][i]
        per_rep.append(
            [
                i + 1,
                f"{first.wall:.1f}",
                f"{first_loads[i]:.2f}",
                f"{repeats[i].wall:.1f}",
                ", ".join(sorted(set(repeats[i].states))),
                f"{seconds[STREAMING][i]:.1f}",
                f"{streaming['foreign_cores']:.2f}",
                f"{seconds[WHOLE_FILE][i]:.1f}" if WHOLE_FILE in seconds else "-",
                f"{seconds[STREAMING][i] / first.wall:.2f}",
            ]
        )
    command = f"featuresum score --model M --input {rows // 1000}k.parquet --output OUT.parquet --json"
    body = [
        f"`{command}` on a {rows:,}-row feature file ({source_bytes:,} bytes: `sample_id`, 784 float32 features, "
        f"`label`; generated once with the pipeline's own code at {rows / generation:,.0f} rows/s), an untrained "
        "checkpoint (scoring speed does not depend on the weights), against the warm local server. Each first run "
        "writes to an output path no earlier run used and follows a touch of the input (a changed identity), so "
        "nothing of it is cached: the input is fingerprinted and scored; "
        "the repeat is the identical command right after it, which should be served from the cache. Versus two "
        "bare scorers, each a `python -m benchmarks.score_child` process: **streaming** "
        "(`pq.ParquetFile(path).iter_batches(65,536 rows)`, the model rebuilt from the checkpoint in eval mode "
        "under `no_grad`, feature sums, a `pq.ParquetWriter` writing `sample_id`, `feature_sum`, "
        "`predicted_class`, `confidence`) and **whole-file** (`pq.read_table`, one forward pass, `pq.write_table`)."
        f" {sizes.e2e_reps} repetitions, the scorers interleaved in rotating order; all wall times are whole "
        "processes, interpreter start-up included. Peak RSS is VmHWM: the bare scorers report their own, the "
        "`featuresum` process's is read from /proc every 50 ms while it runs. The streaming script keeps "
        "pyarrow's default `pre_buffer=True`, which holds on to the column chunks it has read, so its peak grows "
        "with the file; the pipeline opens files with `pre_buffer=False`.",
        "",
        *table(["", "wall s (min / **median** / max)", "rows/s", "peak RSS MiB"], summary_rows),
        "",
        f"Where {CLI}'s time goes (Prefect's records of the flow and task runs):",
        "",
        *table(["", "first run s", "repeat s"], breakdown_rows),
        "",
        "Per repetition, with the cores other processes kept busy meanwhile (the local Prefect server counts "
        "as another process):",
        "",
        *table(
            [
                "repetition",
                f"{CLI} s",
                "other cores",
                "repeat s",
                "repeat task states",
                f"{STREAMING} s",
                "other cores",
                f"{WHOLE_FILE} s",
                f"{CLI} rows/s ÷ streaming",
            ],
            per_rep,
        ),
        "",
        f"The floor is what any scorer of this file pays on this machine before anything else: **{DECODE}** "
        "(`pq.ParquetFile(path, pre_buffer=False).iter_batches(16,384 rows)` over the 784 feature columns, "
        f"nothing kept) and **{PRODUCTS}** (the model's forward pass over {rows:,} rows of one in-memory "
        "16,384-row batch, on every core), each in a process of its own, interleaved with the scorers above; "
        f"their sum per repetition. {CLI} overlaps them (the next batch is decoded on a thread of its own while "
        "the model scores the last), so its scoring tasks can come below the floor's sum.",
        "",
        f"The input's fingerprint: seconds to hash the {source_bytes / 1e9:.2f} GB file with each candidate "
        "(`storage.fingerprint` for SHA-256 and BLAKE3, `hashlib.file_digest` for the rest), "
        f"{sizes.e2e_reps} times each:",
        "",
        *table(
            ["hash", "seconds", "GB/s"],
            [[name, took.format(".2f"), f"{source_bytes / 1e9 / took.median:.2f}"] for name, took in digests.items()],
        ),
        "",
        f"Every run scored all {rows:,} rows: {'yes' if scored == {rows} else f'**no** ({sorted(scored, key=str)})'}."
        f" Every scorer wrote the same predicted classes: {'yes' if same else '**no**'}.",
    ]
    if not whole_file:
        body.append(f"\nThe whole-file scorer was left out: only {available / 2**30:.1f} GiB of memory available.")
    if edited:
        body.append(f"\n{len(edited)} repetition(s) were measured again because the pipeline's code changed meanwhile.")
    if not all_cached:
        body.append("\nNot every scoring task of every repeat was Cached; see the states above.")
    checks = [
        Check(
            f"{CLI} rows/s ÷ {STREAMING}, {rows:,} rows",
            paired[STREAMING].format(".2f"),
            ">= 1.5",
            paired[STREAMING].median >= 1.5,
        ),
        Check(f"{CLI} wall time ÷ the floor, {rows:,} rows", over_floor.format(".2f"), "<= 2", over_floor.median <= 2),
        *[Check(f"{CLI} rows/s ÷ {name}, {rows:,} rows", paired[name].format(".2f")) for name in baselines[1:]],
        Check(
            f"repeated {CLI} ÷ first run, wall time",
            repeat_share.format(".3f"),
            "< 0.10",
            repeat_share.median < 0.10 and all_cached,
        ),
        Check(
            f"peak RSS: {CLI} / {' / '.join(baselines)}",
            " / ".join(f"{peaks[name].median:,.0f}" for name in (CLI, *baselines)) + " MiB",
        ),
    ]
    return Figure(TITLE, checks, body, load.wall, load.foreign_cores)

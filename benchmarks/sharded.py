"""Figure 8: sharded scoring with `featuresum score --runner dask`, one worker against two.

Kept apart from the other figures because it measures an optional runner: it checks that
`featuresum score --help` offers `--runner` and says so in the results when it does not.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import pipeline_calls
from benchmarks.cli_runs import FEATURESUM, LocalPrefect
from benchmarks.measure import REPO, HostLoad, Spread, interleave, ratios
from benchmarks.report import Check, Figure, table
from benchmarks.sizes import Sizes

SEED = 0


def runner_option(cli: LocalPrefect | None = None) -> bool:
    """Whether `featuresum score --help` lists a --runner option."""
    env = dict(cli.env) if cli else dict(os.environ)
    env["COLUMNS"] = "200"  # the help is rendered to the terminal width; keep option names unwrapped
    result = subprocess.run(
        [str(FEATURESUM), "score", "--help"], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    return "--runner" in result.stdout


def _remove_output(path: Path) -> None:
    path.unlink(missing_ok=True)
    path.with_name(path.name + ".json").unlink(missing_ok=True)
    shutil.rmtree(path.with_name(path.name + ".parts"), ignore_errors=True)


def _task_group(name: str) -> str:
    for prefix in ("fingerprint", "score-shard", "write-predictions"):
        if name.startswith(prefix):
            return prefix
    return name


def sharded_scoring(sizes: Sizes, cli: LocalPrefect) -> Figure:
    """Rows/s of `featuresum score --input` on Dask with 1 and 2 workers, the default runner and two bare scorers."""
    title = "8. Sharded scoring on Dask"
    if not runner_option(cli):
        note = "`featuresum score --help` shows no `--runner` option in this checkout, so this was not measured."
        return Figure(title, [Check("1 vs 2 Dask workers", "not available")], [note])
    cli.warm_up()
    rows = sizes.sharded_rows
    source, model = cli.workdir / "sharded-input.parquet", cli.workdir / "sharded-model.pt"
    pipeline_calls.generate_parquet(source, rows, SEED, "score")
    pipeline_calls.save_untrained_checkpoint(model)
    shard_option = ["--shard-rows", str(sizes.sharded_shard_rows)] if sizes.sharded_shard_rows else []
    task_times: dict[str, list[dict[str, float]]] = {}
    outputs = iter(range(1_000_000))

    def featuresum_score(label: str, *runner: str) -> float:
        output = cli.workdir / f"sharded-predictions-{next(outputs)}.parquet"
        args = ["score", "--model", str(model), "--input", str(source), "--output", str(output), *runner]
        run = cli.featuresum(*args, *shard_option, "--refresh")
        _remove_output(output)
        times: dict[str, float] = {}
        for name, seconds in cli.task_seconds(run).items():
            times[_task_group(name)] = times.get(_task_group(name), 0.0) + seconds
        times["shards"] = sum(name.startswith("score-shard") for name in run.summary["task_states"])
        task_times.setdefault(label, []).append(times)
        return run.wall

    def bare_score(scorer: str) -> float:
        output = cli.workdir / f"sharded-bare-{next(outputs)}.parquet"
        command = [sys.executable, "-m", "benchmarks.score_child", scorer, "--model", str(model)]
        start = time.perf_counter()
        result = subprocess.run(
            [*command, "--input", str(source), "--output", str(output)], cwd=REPO, capture_output=True, text=True
        )
        wall = time.perf_counter() - start
        output.unlink(missing_ok=True)
        if result.returncode != 0:
            raise RuntimeError(f"bare scoring failed ({result.returncode}):\n{result.stderr[-3000:]}")
        json.loads(result.stdout)
        return wall

    variants = {
        "dask, 1 worker": lambda: featuresum_score("dask, 1 worker", "--runner", "dask", "--dask-workers", "1"),
        "dask, 2 workers": lambda: featuresum_score("dask, 2 workers", "--runner", "dask", "--dask-workers", "2"),
        "default runner (threads)": lambda: featuresum_score("default runner (threads)", "--runner", "default"),
        "bare whole-file script": lambda: bare_score("--bare"),
        "bare streaming script": lambda: bare_score("--bare-stream"),
    }
    try:
        with HostLoad() as load:
            seconds = interleave(sizes.e2e_reps, variants)
    finally:
        source.unlink(missing_ok=True)
    speedup = ratios(seconds["dask, 1 worker"], seconds["dask, 2 workers"])
    rows_table = []
    bare_names = ("bare whole-file script", "bare streaming script")
    for name, walls in seconds.items():
        vs_bare = [ratios(seconds[bare], walls).format(".2f") if name not in bare_names else "-" for bare in bare_names]
        groups = task_times.get(name, [])

        def task(group: str, groups: list[dict[str, float]] = groups) -> str:
            return Spread.of([times.get(group, 0.0) for times in groups]).format(".1f") if groups else "-"

        rows_table.append(
            [
                name,
                Spread.of(walls).format(".1f"),
                Spread.of([rows / wall for wall in walls]).format(",.0f"),
                *vs_bare,
                task("fingerprint"),
                task("score-shard"),
                task("write-predictions"),
            ]
        )
    shards = task_times["dask, 1 worker"][0]["shards"]
    body = [
        f"`featuresum score --input` of a {rows:,}-row feature file ({shards} shards"
        f"{' of ' + format(sizes.sharded_shard_rows, ',') + ' rows' if sizes.sharded_shard_rows else ''}, "
        "`--refresh`, a fresh `--output` each time) against the warm local server, versus two bare scorers, "
        "each a subprocess: the whole-file one (`pq.read_table`) and a streaming one (`iter_batches`, "
        f"a `ParquetWriter`); {sizes.e2e_reps} repetitions interleaved. Wall time is the whole "
        "command: imports, the input check the CLI makes before the flow, the content hash of the input "
        "(`fingerprint` task), a Dask LocalCluster's start (dask runs), the shards, and their concatenation "
        "(`write-predictions`). Task columns sum the run times Prefect recorded (shards overlap in time when "
        "they run in parallel).",
        "",
        *table(
            [
                "",
                "wall s",
                "rows/s",
                "rows/s ÷ bare whole-file",
                "rows/s ÷ bare streaming",
                "fingerprint s",
                "score-shard s (sum)",
                "write-predictions s",
            ],
            rows_table,
        ),
        "",
        f"Two Dask workers ÷ one, wall time speed-up: {speedup.format('.2f')} (two cores on this machine).",
    ]
    checks = [Check("Dask 2 workers ÷ 1 worker, speed-up", speedup.format(".2f"))]
    return Figure(title, checks, body, load.wall, load.foreign_cores)

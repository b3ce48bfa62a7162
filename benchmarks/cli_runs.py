"""Figures 4, 5 and 7: whole `featuresum run` commands against a local server, and the plain script.

Every command runs as a subprocess with PREFECT_HOME in a temporary folder, so the CLI starts a
local Prefect server of its own (stopped at the end) and the task cache starts empty.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.measure import REPO, HostLoad, Spread, interleave, ratios, run_watching_rss
from benchmarks.report import Check, Figure, table
from benchmarks.sizes import TINY, Sizes

FEATURESUM = Path(sys.executable).parent / "featuresum"
COMMAND_TIMEOUT = 3600


def cli_options(overrides: tuple[tuple[str, Any], ...] | dict[str, Any]) -> list[str]:
    """`featuresum` options for {option_name: value} pairs."""
    pairs = overrides.items() if isinstance(overrides, dict) else overrides
    return [arg for name, value in pairs for arg in (f"--{name.replace('_', '-')}", str(value))]


def code_digest() -> str:
    """Digest of the code that keys the pipeline's cache, to notice edits made while a run is timed."""
    from featuresum import tasks

    # The imported package, not REPO/tasks: under `--rev` that is a copy of another revision.
    digest = hashlib.sha256()
    for source in sorted(Path(tasks.__file__).parent.glob("*.py")):
        digest.update(source.read_bytes())
    return digest.hexdigest()


@dataclass
class CliRun:
    """One finished `featuresum` command: wall seconds, its --json summary and its peak RSS (MiB)."""

    wall: float
    summary: dict[str, Any]
    peak_rss_mib: float

    @property
    def states(self) -> list[str]:
        return list(self.summary["task_states"].values())


class LocalPrefect:
    """`featuresum` subprocesses sharing one temporary PREFECT_HOME, hence one local server."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.home = workdir / "prefect-home"
        self.env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
        self.env.update(PREFECT_HOME=str(self.home), DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false")
        self._runs = 0
        self.startup: tuple[CliRun, CliRun] | None = None

    def warm_up(self) -> tuple[CliRun, CliRun]:
        """Once: a tiny run that starts the local server (cold), then the same run warm; returns both."""
        if self.startup is None:
            tiny = cli_options(TINY)
            cold_dirs, warm_dirs = self.fresh_dirs("cold"), self.fresh_dirs("warm")
            cold = self.featuresum("run", *tiny, *cold_dirs)
            warm = self.featuresum("run", *tiny, *warm_dirs)
            _remove_run(cold_dirs)
            _remove_run(warm_dirs)
            self.startup = (cold, warm)
        return self.startup

    def fresh_dirs(self, label: str) -> list[str]:
        """--data-dir and --artifacts-dir options naming folders no earlier run used."""
        self._runs += 1
        root = self.workdir / f"{label}-{self._runs}"
        return ["--data-dir", str(root / "data"), "--artifacts-dir", str(root / "artifacts")]

    def featuresum(self, *args: str) -> CliRun:
        """Run `featuresum ARGS --json` and time it; raises with its stderr if it fails."""
        start = time.perf_counter()
        result, peak = run_watching_rss(
            [str(FEATURESUM), *args, "--json"], COMMAND_TIMEOUT, cwd=self.workdir, env=self.env
        )
        wall = time.perf_counter() - start
        if result.returncode != 0:
            raise RuntimeError(f"featuresum {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
        return CliRun(wall, json.loads(result.stdout), peak)

    def _api(self, path: str, body: dict | None = None) -> Any:
        from featuresum.flows import local_server

        status = local_server.server_status(self.home)
        if status is None:
            raise RuntimeError(f"no local Prefect server is up under {self.home}")
        url = status["api_url"]
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{url}{path}", data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def task_seconds(self, run: CliRun) -> dict[str, float]:
        """Run time of each task run of a flow run, as the Prefect API recorded it."""
        body = {"flow_runs": {"id": {"any_": [run.summary["flow_run_id"]]}}, "limit": 200}
        return {task["name"]: task["total_run_time"] for task in self._api("/task_runs/filter", body)}

    def flow_seconds(self, run: CliRun) -> float:
        """Run time of the flow run, as the Prefect API recorded it."""
        return self._api(f"/flow_runs/{run.summary['flow_run_id']}")["total_run_time"]

    def close(self) -> None:
        """Stop the local server the commands started."""
        from featuresum.flows import local_server

        local_server.stop_local_server(self.home)


def _run_settings(options: tuple[str, ...]) -> dict[str, Any]:
    """The preset's values overridden by explicit `featuresum run` options."""
    from featuresum.flows.presets import PRESETS

    pairs = zip(options[::2], options[1::2], strict=True)
    given = {name.removeprefix("--").replace("-", "_"): value for name, value in pairs}
    settings = PRESETS[given.pop("preset", "default")].values()
    settings.update({key: type(settings[key])(value) for key, value in given.items() if key in settings})
    return settings


def _task_kind(name: str) -> str:
    """`generate-train-300000rows-seed0` -> `generate-train`; `score-/path` -> `score`."""
    if name.startswith("generate-"):
        return "-".join(name.split("-")[:2])
    return name.split("-")[0] if not name.startswith("train-model") else "train-model"


def _plain(workdir: Path, settings: dict[str, Any], label: str) -> tuple[float, dict[str, Any]]:
    out_dir = workdir / label
    command = [sys.executable, "-m", "benchmarks.plain_pipeline", "--out-dir", str(out_dir), *cli_options(settings)]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    wall = time.perf_counter() - start
    shutil.rmtree(out_dir, ignore_errors=True)
    if result.returncode != 0:
        raise RuntimeError(f"the plain script failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return wall, json.loads(result.stdout)


def _remove_run(args: list[str]) -> None:
    shutil.rmtree(Path(args[1]).parent, ignore_errors=True)


def end_to_end(sizes: Sizes, cli: LocalPrefect, workdir: Path) -> tuple[list[Figure], list[dict[str, Any]]]:
    """Figures 4 and 5, plus the metrics of the end-to-end runs (for figure 7)."""
    from featuresum.flows.presets import PRESETS

    with HostLoad() as load:
        cold, warm = cli.warm_up()
        overrides = dict(sizes.e2e_overrides)
        settings = {**PRESETS["default"].values(), **overrides}
        first_runs: list[CliRun] = []
        reruns: list[CliRun] = []
        plain_runs: list[dict[str, Any]] = []
        task_times: list[dict[str, float]] = []
        flow_times: list[float] = []
        edited: list[int] = []
        loads: dict[str, list[float]] = {"featuresum run": [], "plain script": []}

        def pipeline() -> float:
            for attempt in range(3):
                dirs = cli.fresh_dirs("e2e")
                before = code_digest()
                with HostLoad() as first_load:
                    first = cli.featuresum("run", *cli_options(overrides), *dirs)
                rerun = cli.featuresum("run", *cli_options(overrides), *dirs)
                _remove_run(dirs)
                if code_digest() == before:
                    break
                # Someone changed tasks/ meanwhile: the rerun missed the cache for that reason; measure again.
                edited.append(attempt)
            first_runs.append(first)
            loads["featuresum run"].append(first_load.foreign_cores)
            reruns.append(rerun)
            task_times.append(cli.task_seconds(first))
            flow_times.append(cli.flow_seconds(first))
            return first.wall

        def plain() -> float:
            with HostLoad() as plain_load:
                wall, summary = _plain(workdir, settings, f"plain-{len(plain_runs)}")
            plain_runs.append(summary)
            loads["plain script"].append(plain_load.foreign_cores)
            return wall

        seconds = interleave(sizes.e2e_reps, {"featuresum run": pipeline, "plain script": plain})

    overhead = ratios(seconds["featuresum run"], seconds["plain script"])
    cached = ratios([run.wall for run in reruns], [run.wall for run in first_runs])
    size_text = ", ".join(f"{k.replace('_', ' ')} {f'{v:,}' if isinstance(v, int) else v}" for k, v in settings.items())
    kinds = sorted({_task_kind(name) for times in task_times for name in times})
    per_kind = {
        kind: Spread.of([sum(s for n, s in t.items() if _task_kind(n) == kind) for t in task_times]) for kind in kinds
    }
    stages = list(plain_runs[0]["stages"])
    outside = Spread.of([wall - flow for wall, flow in zip(seconds["featuresum run"], flow_times, strict=True)])
    outside = outside.format(".1f")
    e2e_body = [
        f"`featuresum run{' ' + ' '.join(cli_options(overrides)) if overrides else ''}` ({size_text}) against a warm "
        "local server, each run with a fresh `--data-dir` and `--artifacts-dir` (nothing cached), versus "
        f"`python -m benchmarks.plain_pipeline` with the same sizes and settings; {sizes.e2e_reps} repetitions "
        "interleaved. Both are timed as whole processes, interpreter start-up included.",
        "",
        *table(
            ["", "seconds (min / **median** / max)"],
            [
                ["`featuresum run`", Spread.of(seconds["featuresum run"]).format(".1f")],
                ["plain script", Spread.of(seconds["plain script"]).format(".1f")],
                ["featuresum ÷ plain", overhead.format(".2f")],
                ["flow run time recorded by Prefect", Spread.of(flow_times).format(".1f")],
                ["process wall − flow run time (imports, server check, waiting for task-run records)", outside],
                *[[f"task `{kind}`", spread.format(".1f")] for kind, spread in per_kind.items()],
                *[
                    [f"plain stage `{stage}`", Spread.of([run["stages"][stage] for run in plain_runs]).format(".1f")]
                    for stage in stages
                ],
            ],
        ),
        "",
        "Held-out accuracy: `featuresum run` "
        + Spread.of([run.summary["metrics"]["val_accuracy"] for run in first_runs]).format(".4f")
        + ", plain script "
        + Spread.of([run["val_accuracy"] for run in plain_runs]).format(".4f")
        + ".",
    ]
    e2e_body += [
        "",
        "Per repetition, with the cores other processes kept busy during each command (the local Prefect "
        "server counts as another process):",
        "",
        *table(
            ["repetition", "`featuresum run` s", "other cores", "plain script s", "other cores", "ratio"],
            [
                [
                    i + 1,
                    f"{a:.1f}",
                    f"{loads['featuresum run'][i]:.2f}",
                    f"{b:.1f}",
                    f"{loads['plain script'][i]:.2f}",
                    f"{a / b:.2f}",
                ]
                for i, (a, b) in enumerate(zip(seconds["featuresum run"], seconds["plain script"], strict=True))
            ],
        ),
    ]
    if edited:
        e2e_body.append(
            f"\n{len(edited)} pipeline repetition(s) were measured again because `tasks/` changed while they ran."
        )
    e2e_body += [
        "",
        "**Cold start**: the first command against a fresh PREFECT_HOME starts the local server (database "
        f"migrations included). A tiny run (`{' '.join(cli_options(TINY))}`) took {cold.wall:.1f} s cold and "
        f"{warm.wall:.1f} s warm: start-up costs about **{cold.wall - warm.wall:.1f} s**, once per machine.",
    ]
    cached_body = [
        "The same `featuresum run` repeated with identical options right after each first run above.",
        "",
        *table(
            ["repetition", "first run s", "rerun s", "rerun ÷ first", "rerun task states"],
            [
                [i + 1, f"{a.wall:.1f}", f"{b.wall:.1f}", f"{b.wall / a.wall:.3f}", ", ".join(sorted(set(b.states)))]
                for i, (a, b) in enumerate(zip(first_runs, reruns, strict=True))
            ],
        ),
    ]
    all_cached = all(_only_monitoring_ran(run) for run in reruns)
    if not all_cached:
        cached_body.append("\nNot every file task of every rerun was Cached; see the states above.")
    floor_checks, floor_body = _cached_floor(sizes, cli, overrides)
    cached_body += ["", *floor_body]
    figures = [
        Figure(
            "4. End to end",
            [
                Check(
                    "`featuresum run` ÷ plain script, wall time",
                    overhead.format(".2f"),
                    "<= 1.05",
                    overhead.median <= 1.05,
                ),
                Check("cold start-up of the local server (once)", f"{cold.wall - warm.wall:.1f} s"),
            ],
            e2e_body,
            load.wall,
            load.foreign_cores,
        ),
        Figure(
            "5. Cached rerun",
            [
                Check(
                    "rerun ÷ first run, wall time", cached.format(".3f"), "< 0.10", cached.median < 0.10 and all_cached
                ),
                *floor_checks,
            ],
            cached_body,
            0.0,
            load.foreign_cores,
        ),
    ]
    return figures, [run.summary["metrics"] for run in first_runs]


def _majority_share(holdout: str) -> float:
    """The accuracy of always predicting the held-out rows' most common class."""
    import pyarrow.parquet as pq

    labels = pq.read_table(holdout, columns=["label"]).column("label").to_pylist()
    return max(labels.count(label) for label in set(labels)) / len(labels)


def _only_monitoring_ran(run: CliRun) -> bool:
    """Whether every task of a rerun was Cached but the monitoring task, which runs for every scored batch."""
    return {state for name, state in run.summary["task_states"].items() if not name.startswith("monitor-")} == {
        "Cached"
    }


def _process_seconds(command: list[str], env: dict[str, str]) -> float:
    """Wall seconds of a command, timed as `LocalPrefect.featuresum` times the reruns (RSS watched alike)."""
    start = time.perf_counter()
    result, _ = run_watching_rss(command, COMMAND_TIMEOUT, cwd=REPO, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def _cached_floor(sizes: Sizes, cli: LocalPrefect, overrides: dict[str, Any]) -> tuple[list[Check], list[str]]:
    """The cached rerun against `import prefect` and a minimal Prefect flow of the same shape, interleaved."""
    from featuresum.flows import local_server

    dirs = cli.fresh_dirs("cached")
    run_args = ["run", *cli_options(overrides), *dirs]
    cli.featuresum(*run_args)
    floor_env = {**cli.env, "PREFECT_API_URL": local_server.server_status(cli.home)["api_url"]}
    floor = [sys.executable, "-m", "benchmarks.prefect_floor"]
    _process_seconds(floor, floor_env)  # fills the floor flow's cache
    probe = subprocess.run(
        [sys.executable, "-m", "benchmarks.rerun_probe", *run_args, "--json"],
        cwd=REPO,
        env=cli.env,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
    )
    if probe.returncode != 0:
        raise RuntimeError(f"the traced rerun failed ({probe.returncode}):\n{probe.stderr[-3000:]}")
    report = json.loads(probe.stderr.rsplit("PROBE ", 1)[1].splitlines()[0])
    reruns: list[CliRun] = []

    def rerun() -> float:
        reruns.append(cli.featuresum(*run_args))
        return reruns[-1].wall

    seconds = interleave(
        sizes.rerun_reps,
        {
            "cached `featuresum run`": rerun,
            '`python -c "import prefect"`': lambda: _process_seconds([sys.executable, "-c", "import prefect"], cli.env),
            "minimal Prefect flow (`python -m benchmarks.prefect_floor`)": lambda: _process_seconds(floor, floor_env),
        },
    )
    _remove_run(dirs)
    rerun_s, import_s, floor_s = seconds.values()
    to_import, to_floor = ratios(rerun_s, import_s), ratios(rerun_s, floor_s)
    all_cached = all(_only_monitoring_ran(run) for run in reruns)
    requests = report["requests"]
    body = [
        f"**Against the floor**: one more run's folders, then {sizes.rerun_reps} repetitions, interleaved, of its "
        'cached rerun, of `python -c "import prefect"`, and of a minimal Prefect flow of the same shape '
        "against the same server (five cached tasks with JSON results, then one uncached task, as the rerun's "
        "five cached file tasks and its monitoring task). All three are timed as whole processes.",
        "",
        *table(
            ["", "seconds (min / **median** / max)"],
            [[name, Spread.of(values).format(".2f")] for name, values in seconds.items()]
            + [
                ["rerun ÷ `import prefect`", to_import.format(".2f")],
                ["rerun ÷ minimal Prefect flow", to_floor.format(".2f")],
            ],
        ),
        "",
        f"One rerun traced (`python -m benchmarks.rerun_probe`): torch imported: "
        f"{'yes' if report['imported']['torch'] else 'no'}; pandas imported: "
        f"{'yes' if report['imported']['pandas'] else 'no'}; {len(requests)} HTTP requests to the Prefect API "
        "(task-run states travel as events over one websocket, and featuresum's `/health` checks, one before "
        "the run and one a second while it runs, over urllib: neither is counted):",
        "",
        *table(["request", "count"], [[f"`{name}`", requests.count(name)] for name in dict.fromkeys(requests)]),
    ]
    if not all_cached:
        body.append("\nNot every file task of every timed rerun was Cached.")
    checks = [
        Check("rerun ÷ `import prefect`, wall time", to_import.format(".2f"), "<= 2", to_import.median <= 2),
        Check("rerun ÷ minimal Prefect flow of the same shape", to_floor.format(".2f")),
    ]
    return checks, body


def model_quality(sizes: Sizes, cli: LocalPrefect, end_to_end_metrics: list[dict[str, Any]]) -> Figure:
    """Figure 7: held-out accuracy and training time of named settings, each a fresh `featuresum run`."""
    rows, checks = [], []
    cli.warm_up()
    with HostLoad() as load:
        for label, options in sizes.quality_runs:
            dirs = cli.fresh_dirs("quality")
            with HostLoad() as run_load:
                run = cli.featuresum("run", *options, *dirs)
            majority = _majority_share(run.summary["holdout_data"])
            _remove_run(dirs)
            tasks = cli.task_seconds(run)
            train_seconds = sum(s for name, s in tasks.items() if name.startswith("train-model"))
            metrics = run.summary["metrics"]
            settings = _run_settings(options)
            samples = settings["train_samples"] * run.summary["epochs_completed"]
            rows.append(
                [
                    label,
                    f"{metrics['val_accuracy']:.4f}",
                    f"{majority:.4f}",
                    metrics["holdout_rows"],
                    f"{train_seconds:.1f}",
                    f"{samples / train_seconds:,.0f}",
                    f"{run.wall:.1f}",
                    f"{run_load.foreign_cores:.2f}",
                ]
            )
            if options == ("--preset", "full"):
                accuracy = metrics["val_accuracy"]
                checks += [
                    Check("`--preset full` held-out accuracy", f"{accuracy:.4f}", ">= 0.98", accuracy >= 0.98),
                    Check("`--preset full` whole run", f"{run.wall:.1f} s", "<= 90 s", run.wall <= 90),
                    Check("`--preset full` training time (train task)", f"{train_seconds:.1f} s"),
                ]
            else:
                checks.append(
                    Check(
                        f"{label}: held-out accuracy (majority-class share)",
                        f"{metrics['val_accuracy']:.4f} ({majority:.4f})",
                    )
                )
    if end_to_end_metrics:
        accuracy = Spread.of([metrics["val_accuracy"] for metrics in end_to_end_metrics])
        holdout_rows = end_to_end_metrics[0]["holdout_rows"]
        label = "`featuresum run` " + ("(defaults" if not sizes.e2e_overrides else "(figure 4's sizes") + ", figure 4)"
        rows.append([label, accuracy.format(".4f"), "-", holdout_rows, "-", "-", "-", "-"])
        checks.append(Check(f"{label}: held-out accuracy", accuracy.format(".4f")))
    body = [
        "Each run is a fresh `featuresum run --json` against the warm local server. Training time is the "
        "`train-model` task's run time as Prefect recorded it: taking the training and held-out rows (handed "
        "over by the generating tasks of the same run, see docs/caching-and-recovery.md), all epochs with a "
        "held-out evaluation and a checkpoint after each, and the final checkpoint.",
        "",
        *table(
            [
                "settings",
                "held-out accuracy",
                "majority-class share of the held-out rows",
                "held-out rows",
                "training s",
                "training samples/s",
                "whole run s",
                "other processes' cores",
            ],
            rows,
        ),
    ]
    return Figure("7. Model quality", checks, body, load.wall, load.foreign_cores)

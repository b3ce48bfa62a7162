"""`python -m benchmarks.run`: run the benchmark suite and write the results as markdown.

Every throughput or time figure is a ratio against a bare baseline measured in the same run,
reported as min / median / max over interleaved repetitions.
"""

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from benchmarks import (
    accuracy,
    cli_runs,
    cli_scoring,
    contention,
    monitoring,
    object_storage,
    retraining,
    scaling,
    sharded,
    throughput,
)
from benchmarks.measure import REPO, machine, source_state
from benchmarks.report import Figure, render
from benchmarks.sizes import FULL, QUICK

ALL = (
    "generation",
    "training",
    "contention",
    "scoring",
    "end-to-end",
    "scaling",
    "quality",
    "time-to-accuracy",
    "sharded",
    "cli-scoring",
    "retraining",
    "monitoring",
    "object-storage",
)
# Quick mode leaves out the figures that run whole `featuresum` commands against a local server
# (its first start alone takes 10-30 s); name them with --only to include them.
QUICK_DEFAULT = ("generation", "training", "scoring", "scaling")
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "RESULTS.md"


def _gpu_results() -> str:
    """Links to the gpu_check tables saved beside the results (GPU-<card>.md), measured on other machines."""
    saved = sorted(DEFAULT_OUTPUT.parent.glob("GPU-*.md"))
    if not saved:
        return " and prints its own table"
    links = ", ".join(f"[{path.name}]({path.name})" for path in saved)
    return f"; its figures from {', '.join(path.stem.removeprefix('GPU-') for path in saved)} are in {links}"


def _log(message: str) -> None:
    print(f"[benchmarks {datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)


def run_suite(selected: tuple[str, ...], quick: bool, workdir: Path) -> list[Figure]:
    """Run the selected benchmarks in a fixed order; returns their figures."""
    sizes = QUICK if quick else FULL
    figures: list[Figure] = []
    cli = (
        cli_runs.LocalPrefect(workdir)
        if {"end-to-end", "quality", "sharded", "cli-scoring", "retraining", "monitoring"} & set(selected)
        else None
    )
    end_to_end_metrics: list[dict] = []

    def end_to_end() -> list[Figure]:
        found, metrics = cli_runs.end_to_end(sizes, cli, workdir)
        end_to_end_metrics.extend(metrics)
        return found

    steps: dict[str, Callable[[], Figure | list[Figure]]] = {
        "generation": lambda: throughput.generation(sizes, workdir),
        "training": lambda: throughput.training_throughput(sizes, workdir),
        "contention": lambda: contention.contention(sizes),
        "scoring": lambda: throughput.scoring_throughput(sizes, workdir),
        "end-to-end": end_to_end,
        "scaling": lambda: scaling.scaling(sizes, workdir),
        "quality": lambda: cli_runs.model_quality(sizes, cli, end_to_end_metrics),
        "time-to-accuracy": lambda: accuracy.time_to_accuracy(sizes),
        "sharded": lambda: sharded.sharded_scoring(sizes, cli),
        "cli-scoring": lambda: cli_scoring.cli_scoring(sizes, cli),
        "retraining": lambda: retraining.retraining(sizes, cli),
        "monitoring": lambda: monitoring.monitoring(sizes, cli),
        "object-storage": lambda: object_storage.object_storage(sizes, workdir),
    }
    try:
        for name in ALL:
            if name not in selected:
                continue
            _log(f"{name} ...")
            start = time.perf_counter()
            found = steps[name]()
            figures += found if isinstance(found, list) else [found]
            _log(f"{name} done in {time.perf_counter() - start:.0f} s")
    finally:
        if cli is not None:
            cli.close()
    return figures


# Run in a child with the snapshot's environment: where each package is imported from.
_WHERE_IMPORTED = (
    "import json, featuresum.flows.cli, featuresum.tasks.storage; "
    "print(json.dumps([featuresum.flows.cli.__file__, featuresum.tasks.storage.__file__]))"
)


def _check_imports_copy(snapshot: Path, env: dict[str, str], commit: str) -> None:
    """Fail unless a child process with `env` imports featuresum.flows and featuresum.tasks from the copy.

    `-P` leaves the working directory off sys.path, as for the `featuresum` console script.
    """
    result = subprocess.run(
        [sys.executable, "-P", "-c", _WHERE_IMPORTED], cwd=snapshot, env=env, capture_output=True, text=True
    )
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no error output"])[-1]
        sys.exit(
            f"the copy of {commit} does not import as featuresum.flows and featuresum.tasks ({last}); "
            "revisions before that layout cannot be measured by these benchmarks"
        )
    imported = [Path(path) for path in json.loads(result.stdout)]
    outside = [str(path) for path in imported if not path.is_relative_to(snapshot)]
    if outside:
        sys.exit(f"the copy of {commit} is shadowed: a child imports {', '.join(outside)}")


def _on_snapshot(args: argparse.Namespace) -> int:
    """Rerun the suite on a copy of flows/ and tasks/ as committed at args.rev (and benchmarks/ as it is).

    The copy is laid out as installed, <snapshot>/featuresum/{flows,tasks}, and <snapshot> leads
    PYTHONPATH: the editable install's finder comes after the path-based one, so the copy wins.
    """
    commit = subprocess.run(
        ["git", "rev-parse", "--short", f"{args.rev}^{{commit}}"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()
    snapshot = Path(tempfile.mkdtemp(prefix="featuresum-source-", dir=args.tmp)).resolve()
    try:
        archive = subprocess.run(
            ["git", "archive", commit, "flows", "tasks"], cwd=REPO, capture_output=True, check=True
        )
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            tar.extractall(snapshot / "featuresum", filter="data")
        shutil.copytree(REPO / "benchmarks", snapshot / "benchmarks", ignore=shutil.ignore_patterns("__pycache__"))
        paths = [str(snapshot), *filter(None, [os.environ.get("PYTHONPATH")])]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
        _check_imports_copy(snapshot, env, commit)
        command = [sys.executable, "-m", "benchmarks.run", "--output", str(args.output.resolve())]
        command += ["--quick"] if args.quick else []
        command += ["--only", *args.only] if args.only else []
        command += ["--tmp", str(args.tmp.resolve())] if args.tmp else []
        command += ["--source-label", f"{commit} (flows/ and tasks/ as committed, run from a copy)"]
        return subprocess.run(command, cwd=snapshot, env=env, check=False).returncode
    finally:
        shutil.rmtree(snapshot, ignore_errors=True)


def main() -> None:
    """Parse the options, run the suite in a temporary folder, write the results file."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and one repetition: a smoke run")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="markdown file to write")
    parser.add_argument("--only", nargs="+", choices=ALL, help="run only these benchmarks")
    parser.add_argument("--tmp", type=Path, default=None, help="folder for the temporary files (default: $TMPDIR)")
    parser.add_argument(
        "--rev",
        help="measure flows/ and tasks/ as committed at this revision (a copy), not the working tree others may edit",
    )
    parser.add_argument("--source-label", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rev:
        sys.exit(_on_snapshot(args))
    selected = tuple(args.only or (QUICK_DEFAULT if args.quick else ALL))

    described = machine()
    source = args.source_label or source_state()
    started = datetime.now(UTC)
    start = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="featuresum-bench-", dir=args.tmp))
    try:
        figures = run_suite(selected, args.quick, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    described["load average at end"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    if not args.source_label and source != source_state():
        source = f"{source} at the start, {source_state()} at the end"
    described["source"] = source
    command = "python -m benchmarks.run" + (" --quick" if args.quick else "")
    command += f" --only {' '.join(args.only)}" if args.only else ""
    command += f" --rev {source.split()[0]}" if args.source_label else ""
    preamble = [
        f"Written by `{command}` on {started:%Y-%m-%d %H:%M} UTC in {(time.perf_counter() - start) / 60:.1f} "
        f"minutes{' (quick mode: tiny sizes, one repetition; not figures to quote)' if args.quick else ''}.",
        "",
        "How to read it: each throughput figure is the pipeline's rate divided by a bare PyTorch/pyarrow "
        "baseline's rate (higher is better, 1.0 is parity); each time figure is the pipeline's time divided by "
        "the baseline's (lower is better). Pipeline and baseline repetitions are interleaved, the ratio is taken "
        "per repetition pair, and min / **median** / max are over those pairs. Training figures use every core "
        "torch sees; nothing is pinned.",
        "",
        "**Noise**: this is a shared two-core machine; other engineers' tests and servers ran during the "
        "measurements (the line under each figure says how many cores other processes kept busy on average, "
        "and the load averages are below). Single repetitions varied by up to several times under that load "
        "(PyTorch's threads spin-wait when a core is taken away), which is why only medians of paired ratios are "
        "headline figures. Absolute rates are lower bounds for an idle machine.",
        "",
        "GPU: none here. `python -m benchmarks.gpu_check` trains and scores on cuda and on the CPU "
        f"where a GPU is present{_gpu_results()}.",
    ]
    args.output.write_text(render("Benchmark results", preamble, described, figures))
    _log(f"wrote {args.output.relative_to(REPO) if args.output.is_relative_to(REPO) else args.output}")


if __name__ == "__main__":
    main()

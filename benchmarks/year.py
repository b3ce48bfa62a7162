"""A year unattended: 365 daily dates through the installed `featuresum` commands, with retention.

In a scratch folder with its own PREFECT_HOME (so the commands start a local server of their own,
stopped at the end) and no PREFECT_API_URL, `featuresum backfill` runs the dates in chunks of 30
from 2026-01-01 at small sizes, and `featuresum gc --keep-days 30 --json` follows every chunk.
It reports the time per date along the year, the bytes on disk after every chunk, the registry's,
history's and Prefect's sizes at the end and the everyday commands' times with a year of versions;
then one default-preset date measures a date's disk, and the full preset's is computed from rows.

    python -m benchmarks.year [--dates 365] [--work DIR] [--out FILE]
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path

from benchmarks.measure import HostLoad
from benchmarks.report import table, written_by
from featuresum.flows import local_server

ROOT = Path(__file__).resolve().parents[1]
FEATURESUM = str(Path(sys.executable).parent / "featuresum")
START = date(2026, 1, 1)
CHUNK = 30
KEEP_DAYS = 30
SIZES = ["--train-samples", "2000", "--holdout-samples", "500", "--score-samples", "300", "--epochs", "1"]
SCORE = ("score", "--model", "champion", "--samples", "300")
FLOW_LOG = re.compile(r"^(\d\d):(\d\d):(\d\d\.\d+) \| \w+ +\| Flow run 'pipeline-(\d{4}-\d\d-\d\d)-\S*' - (Beg|Fin)")
MB = 1e6


def tree_bytes(root: Path) -> int:
    """Bytes of the files under root (apparent sizes)."""
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.exists() else 0


def file_bytes(path: Path) -> int:
    """Bytes of a SQLite file with its -wal and -shm files, or of a plain file."""
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*") if p.is_file())


def per_date_seconds(stderr: str) -> dict[str, float]:
    """Seconds per date of one backfill, from the flow-run log: previous date's finish to this one's.

    The first date of a command counts from its flow run's start, so the command's start-up is left out.
    """
    seconds, begun, previous = {}, {}, None
    for line in stderr.splitlines():
        if not (match := FLOW_LOG.match(line)):
            continue
        hh, mm, ss, day, kind = match.groups()
        at = int(hh) * 3600 + int(mm) * 60 + float(ss)
        if kind == "Beg":
            begun[day] = at
            continue
        since = previous if previous is not None else begun.get(day, at)
        seconds[day] = (at - since) % 86400
        previous = at
    return seconds


class Soak:
    """`featuresum` subprocesses in one scratch folder with its own PREFECT_HOME."""

    def __init__(self, work: Path):
        self.work, self.home = work, work / "prefect-home"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        self.env.update(PREFECT_HOME=str(self.home), DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false")

    def call(self, *args: str, env: dict[str, str] | None = None) -> tuple[float, subprocess.CompletedProcess]:
        start = time.perf_counter()
        done = subprocess.run(args, cwd=self.work, env=env or self.env, capture_output=True, text=True, timeout=7200)
        return time.perf_counter() - start, done

    def featuresum(self, *args: str) -> tuple[float, subprocess.CompletedProcess]:
        return self.call(FEATURESUM, *args)

    def median_wall(self, *variants: tuple[str, ...], env: dict[str, str] | None = None) -> tuple[float, list[float]]:
        """Median of one run of each variant (the same command, or one per new date); raises if any fails."""
        walls = []
        for args in variants:
            wall, done = self.call(*args, env=env)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr[-2000:]}")
            walls.append(wall)
        return statistics.median(walls), walls


def score_new_dates(cli: Soak, days: list[date]) -> tuple[float, list[float]]:
    """Median wall time of `featuresum score --model champion` of a fresh 300-row batch, one per date."""
    return cli.median_wall(*[(FEATURESUM, *SCORE, "--date", d.isoformat()) for d in days])


def soak(cli: Soak, dates: int) -> tuple[list[dict], dict[str, float], str | None, tuple | None]:
    """Backfill `dates` dates in chunks with gc after each.

    Returns chunk rows, seconds per date, the failure, and the times of scoring with the champion after
    the first chunk (batches dated before the year, so no later backfill or gc meets them).
    """
    chunks, per_date, early = [], {}, None
    for first in range(0, dates, CHUNK):
        d1, d2 = START + timedelta(days=first), START + timedelta(days=min(first + CHUNK, dates) - 1)
        command = ["backfill", "--from", d1.isoformat(), "--to", d2.isoformat(), *SIZES, "--json"]
        with HostLoad() as chunk_load:
            wall, done = cli.featuresum(*command)
        seconds = per_date_seconds(done.stderr)
        per_date.update(seconds)
        states = [run["state"] for run in json.loads(done.stdout)["runs"]] if done.returncode == 0 else []
        if done.returncode != 0 or set(states) != {"Completed"}:
            failure = f"`featuresum {' '.join(command)}` exited {done.returncode}: {done.stderr[-1500:]}"
            return chunks, per_date, failure, early
        before = tree_bytes(cli.work / "data") + tree_bytes(cli.work / "artifacts")
        gc_wall, gc = cli.featuresum("gc", "--keep-days", str(KEEP_DAYS), "--json")
        if gc.returncode != 0:
            return chunks, per_date, f"`featuresum gc` after {d2} exited {gc.returncode}: {gc.stderr[-1500:]}", early
        data, artifacts = tree_bytes(cli.work / "data"), tree_bytes(cli.work / "artifacts")
        chunks.append(
            {"dates": f"{d1:%m-%d}..{d2:%m-%d}", "n": (d2 - START).days + 1, "wall": wall, "gc": gc_wall,
             "median": statistics.median(seconds.values()), "freed": json.loads(gc.stdout)["freed_bytes"],
             "data": data, "artifacts": artifacts, "before": before, "db": file_bytes(cli.home / "prefect.db"),
             "other": chunk_load.foreign_cores}
        )  # fmt: skip
        print(f"{d2}: {wall:.0f} s, {(data + artifacts) / MB:.1f} MB after gc", file=sys.stderr, flush=True)
        if early is None:
            early = (chunks[-1]["n"], score_new_dates(cli, [START - timedelta(days=i) for i in (3, 2, 1)]))
    return chunks, per_date, None, early


def window_median(per_date: dict[str, float], last: int) -> float:
    """Median seconds per date over the CHUNK dates ending at date number `last` (1-based)."""
    days = [(START + timedelta(days=n)).isoformat() for n in range(max(0, last - CHUNK), last)]
    return statistics.median(per_date[d] for d in days if d in per_date)


def one_default_date(cli: Soak) -> dict[str, int]:
    """Bytes one default-preset `featuresum run --date` writes, by kind, in folders of its own."""
    folder = cli.work / "default-date"
    dirs = ["--data-dir", str(folder / "data"), "--artifacts-dir", str(folder / "artifacts")]
    wall, done = cli.featuresum("run", "--date", "2026-06-01", *dirs, "--json")
    if done.returncode != 0:
        raise RuntimeError(f"featuresum run --date failed ({done.returncode}): {done.stderr[-2000:]}")
    art = folder / "artifacts"
    sizes = {
        "wall": int(wall),
        "data": tree_bytes(folder / "data"),
        "checkpoints": sum(p.stat().st_size for p in art.glob("model-*")),
        "predictions": sum(tree_bytes(p) if p.is_dir() else p.stat().st_size for p in art.glob("predictions-*")),
    }
    sizes["artifacts"] = tree_bytes(art)
    shutil.rmtree(folder)
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dates", type=int, default=365)
    parser.add_argument("--work", type=Path, help="scratch folder (default: a new one under /tmp)")
    parser.add_argument("--out", type=Path, help="also write the Markdown section here")
    parser.add_argument("--skip-default-date", action="store_true", help="do not run one default-preset date")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="featuresum-year-"))
    work.mkdir(parents=True, exist_ok=True)
    cli, started, load0 = Soak(work), time.time(), Path("/proc/loadavg").read_text().split()[:3]
    with HostLoad() as load:
        chunks, per_date, failure, early = soak(cli, args.dates)
        run_dates = chunks[-1]["n"] if chunks else 0
        art = work / "artifacts"
        ends = {"registry": file_bytes(art / "registry.sqlite"), "history": file_bytes(art / "monitoring.parquet"),
                "db": file_bytes(cli.home / "prefect.db"), "results": tree_bytes(cli.home / "storage"),
                "result_files": sum(1 for _ in (cli.home / "storage").glob("*"))}  # fmt: skip
        py = sys.executable
        baselines = {
            '`python -c "import torch"`': cli.median_wall(*[(py, "-c", "import torch")] * 3),
            "`featuresum --help`": cli.median_wall(*[(FEATURESUM, "--help")] * 3),
            "`featuresum models list`": cli.median_wall(*[(FEATURESUM, "models", "list")] * 3),
            "`featuresum monitor`": cli.median_wall(*[(FEATURESUM, "monitor")] * 3),
            "`featuresum monitor --last 365`": cli.median_wall(*[(FEATURESUM, "monitor", "--last", "365")] * 3),
        }
        scored = "`featuresum score --model champion --samples 300 --date D`"
        if early:
            baselines[f"{scored} (3 new dates, at {early[0]} versions)"] = early[1]
        new = [START + timedelta(days=run_dates + i) for i in range(3)]
        baselines[f"{scored} (3 new dates)"] = score_new_dates(cli, new)
        baselines[f"{scored} (the first new date again: cached)"] = score_new_dates(cli, new[:1] * 3)
        # Prefect's own cost of a flow run of this shape against the same server: the first call fills its cache.
        floor = (sys.executable, "-m", "benchmarks.prefect_floor")
        floor_env = {
            **cli.env,
            "PREFECT_API_URL": local_server.server_status(cli.home)["api_url"],
            "PYTHONPATH": str(ROOT),
        }
        cli.call(*floor, env=floor_env)
        baselines["minimal Prefect flow (`python -m benchmarks.prefect_floor`, cached)"] = cli.median_wall(
            *[floor] * 3, env=floor_env
        )
        default = None if args.skip_default_date else one_default_date(cli)
        cli.featuresum("server", "stop")
    load1 = Path("/proc/loadavg").read_text().split()[:3]
    lines = [
        "## A year unattended",
        "",
        f"{written_by('benchmarks.year', started)}"
        " shared with other work: other processes (the local Prefect server among them) kept"
        f" {load.foreign_cores:.2f} cores busy on average; load"
        f" average {' '.join(load0)} at the start, {' '.join(load1)} at the end.",
        "",
        f"{run_dates} daily dates from {START} in a scratch folder with its own PREFECT_HOME (a local server started"
        f" by the first command), as `featuresum backfill --from D1 --to D{CHUNK} {' '.join(SIZES)} --json` in chunks"
        f" of {CHUNK} dates (default `--window-days`, preset otherwise), each followed by `featuresum gc --keep-days"
        f" {KEEP_DAYS} --json`. Seconds per date: from one flow run's finish to the next's in the backfill's log,"
        " median over the chunk; bytes: apparent sizes of the files in data/ and artifacts/ after gc, and before"
        " it; other cores: how many cores other processes (the local server among them) kept busy during the backfill.",
        "",
    ]
    if failure:
        lines += [f"**Stopped early**: {failure}", ""]
    lines += table(
        ["dates", "backfill s", "s per date", "gc s", "freed MB", "data MB", "artifacts MB", "total MB",
         "total before gc MB", "prefect.db MB", "other cores"],
        [[c["dates"], f"{c['wall']:.0f}", f"{c['median']:.2f}", f"{c['gc']:.1f}", f"{c['freed'] / MB:.1f}",
          f"{c['data'] / MB:.1f}", f"{c['artifacts'] / MB:.1f}", f"{(c['data'] + c['artifacts']) / MB:.1f}",
          f"{c['before'] / MB:.1f}", f"{c['db'] / MB:.1f}", f"{c['other']:.2f}"] for c in chunks],
    )  # fmt: skip
    if chunks:
        marks = sorted({min(CHUNK, run_dates), min(115, run_dates), run_dates})
        medians = {m: window_median(per_date, m) for m in marks}
        first = medians[marks[0]]
        total = chunks[-1]["data"] + chunks[-1]["artifacts"]
        lines += ["", "Seconds per date, median over 30 dates:", ""]
        spans = [[f"{max(1, m - CHUNK + 1)}..{m}", f"{medians[m]:.2f}", f"{medians[m] / first:.2f}"] for m in marks]
        lines += table(["dates", "s per date", "÷ first"], spans)
        lines += [
            "",
            f"At the end: {total / MB:.1f} MB on disk ({chunks[-1]['data'] / MB:.1f} MB data, "
            f"{chunks[-1]['artifacts'] / MB:.1f} MB artifacts), {total / KEEP_DAYS / MB:.2f} MB per kept day; the"
            f" largest total after any gc was {max(c['data'] + c['artifacts'] for c in chunks) / MB:.1f} MB. Registry"
            f" (registry.sqlite) {ends['registry'] / 1e3:.0f} kB, monitoring history {ends['history'] / 1e3:.0f} kB,"
            f" Prefect's database (prefect.db with its -wal and -shm) {ends['db'] / MB:.1f} MB, Prefect's"
            f" result files (PREFECT_HOME/storage) {ends['results'] / MB:.1f} MB in {ends['result_files']:,} files.",
        ]
    lines += ["", f"Command wall times with {run_dates} versions, median of 3 (each run shown):", ""]
    timings = [[name, f"{m:.2f}", ", ".join(f"{w:.2f}" for w in walls)] for name, (m, walls) in baselines.items()]
    lines += table(["command", "median s", "runs s"], timings)
    if default:
        rows = 300_000 + 20_000 + 10_000
        full_rows, per_row = 1_600_000 + 100_000 + 100_000, default["data"] / rows
        full_art = default["artifacts"] + default["predictions"] * 9
        lines += [
            "",
            "Disk one date costs:",
            "",
            *table(
                ["preset", "data MB", "artifacts MB", "how"],
                [
                    [
                        "default (330,000 rows)",
                        f"{default['data'] / MB:.0f}",
                        f"{default['artifacts'] / MB:.1f}",
                        f"measured: one `featuresum run --date` ({default['wall']} s)",
                    ],
                    [
                        f"full ({full_rows:,} rows)",
                        f"{per_row * full_rows / MB:.0f}",
                        f"{full_art / MB:.1f}",
                        "computed: default's bytes per row (uncompressed float32 Parquet) × rows; predictions × 10",
                    ],
                ],
            ),  # fmt: skip
        ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    if failure:
        sys.exit(1)


if __name__ == "__main__":
    main()

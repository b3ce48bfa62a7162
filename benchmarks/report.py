"""Figures as data, and the markdown file they are written to."""

import os
import sys
import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Check:
    """One headline figure: what was measured, against which target, and whether it met it."""

    name: str
    measured: str
    target: str = "-"
    met: bool | None = None


@dataclass
class Figure:
    """A benchmark's outcome: its headline checks and the tables and notes that explain them."""

    title: str
    checks: list[Check] = field(default_factory=list)
    body: list[str] = field(default_factory=list)
    seconds: float = 0.0
    foreign_cores: float = 0.0


def table(header: list[str], rows: list[list[object]]) -> list[str]:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def _verdict(met: bool | None) -> str:
    return {True: "met", False: "**missed**", None: "-"}[met]


def render(title: str, preamble: list[str], machine: dict[str, str], figures: list[Figure]) -> str:
    """The whole results document."""
    lines = [f"# {title}", "", *preamble, "", "## Machine", ""]
    lines += table(["", ""], [[key, value] for key, value in machine.items()])
    lines += ["", "## Summary", ""]
    summary = [
        [figure.title, check.name, check.measured, check.target, _verdict(check.met)]
        for figure in figures
        for check in figure.checks
    ]
    lines += table(["figure", "quantity", "measured (min / **median** / max)", "target", ""], summary)
    for figure in figures:
        lines += ["", f"## {figure.title}", ""]
        lines += figure.body
        if figure.seconds:
            load = f"other processes kept {figure.foreign_cores:.2f} cores busy on average"
            lines += ["", f"_Took {figure.seconds:.0f} s; {load}._"]
    return "\n".join(lines) + "\n"


def written_by(module: str, started: float) -> str:
    """How a section was made: the command as given, when (`started`, epoch seconds), how long, from what source."""
    from benchmarks.measure import cpu_model, source_state

    command = f"python -m {module}" + "".join(f" {a}" for a in sys.argv[1:])
    return (
        f"Written by `{command}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))} in"
        f" {(time.time() - started) / 60:.1f} minutes (source {source_state()}). Machine: {cpu_model()},"
        f" {os.cpu_count()} cores"
    )

"""Figure 8: sharded scoring on Dask, one worker against two, once `featuresum score` offers a runner."""

import os
import subprocess

from benchmarks.cli_runs import FEATURESUM, LocalPrefect
from benchmarks.report import Check, Figure
from benchmarks.sizes import Sizes


def runner_option(cli: LocalPrefect | None = None) -> bool:
    """Whether `featuresum score --help` lists a --runner option."""
    env = dict(cli.env) if cli else dict(os.environ)
    env["COLUMNS"] = "200"  # the help is rendered to the terminal width; keep option names unwrapped
    result = subprocess.run(
        [str(FEATURESUM), "score", "--help"], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    return "--runner" in result.stdout


def sharded_scoring(sizes: Sizes, cli: LocalPrefect | None) -> Figure:
    """Rows/s of `featuresum score --runner dask` with one and with two workers."""
    if not runner_option(cli):
        note = "`featuresum score --help` shows no `--runner` option in this checkout, so this was not measured."
        return Figure("8. Sharded scoring on Dask", [Check("1 vs 2 Dask workers", "not available")], [note])
    raise NotImplementedError("`featuresum score --runner` exists now; its benchmark is still to be written")

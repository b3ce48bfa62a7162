"""The embedded default: every task run of a many-task flow reaches the database before the CLI exits."""

import sqlite3
import subprocess
import sys
from pathlib import Path

from featuresum.flows import runtime


def test_every_task_run_of_a_many_task_flow_is_recorded(cli):
    script = Path(__file__).with_name("many_tasks_flow.py")
    result = subprocess.run(
        [sys.executable, str(script), "120"], env=cli.env, cwd=Path(__file__).parents[1],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    for bad in ("ERROR", "Traceback", "database is locked"):
        assert bad not in result.stderr
    flow_run_ids = result.stdout.split()
    assert len(flow_run_ids) == 2

    home = Path(cli.env["PREFECT_HOME"])
    assert runtime.local_server_url(home).startswith("http://127.0.0.1:")
    with sqlite3.connect(home / "prefect.db") as db:
        for flow_run_id in flow_run_ids:
            states = db.execute(
                "SELECT state_type, count(*) FROM task_run WHERE flow_run_id = ? GROUP BY state_type", (flow_run_id,)
            ).fetchall()
            assert states == [("COMPLETED", 120)]

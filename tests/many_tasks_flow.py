"""A flow of many quick tasks, run twice through the project's local Prefect server as the CLI runs flows.

Prints the flow run ids and exits at once, which is when Prefect's ephemeral mode loses task runs.
"""

import sys

from prefect import flow, task
from prefect.runtime import flow_run

from featuresum.flows import local_server


@task(task_run_name="square-{i}")
def square(i: int) -> int:
    """Square a number."""
    return i * i


@flow(name="many-quick-tasks")
def many_quick_tasks(count: int) -> dict:
    """Run `count` tasks; return the flow run id and each task run's id and state."""
    states = {}
    for i in range(count):
        state = square(i, return_state=True)
        states[str(state.state_details.task_run_id)] = state.name
    return {"flow_run_id": str(flow_run.id), "task_runs": states}


if __name__ == "__main__":
    local_server.quiet_defaults()
    with local_server.prefect_api():
        for _ in range(2):
            summary = many_quick_tasks(int(sys.argv[1]))
            local_server.wait_for_task_runs(summary["flow_run_id"], list(summary["task_runs"]))
            print(summary["flow_run_id"])

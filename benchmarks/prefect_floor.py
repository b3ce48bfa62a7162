"""`python -m benchmarks.prefect_floor`: the least a Prefect flow run of featuresum's shape can cost.

A flow of five cached tasks and one uncached task (featuresum's cached rerun: five file tasks
served from the cache, the monitoring task that always runs), each returning a small JSON result,
against the API in PREFECT_API_URL. The first call fills the cache; later calls are all Cached
but the last task. Its wall time, as a process, is the floor of a cached `featuresum run`.
"""

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

STEPS = ("generate-train", "generate-holdout", "train-model", "generate-score", "write-predictions")


def _same_key(context, parameters) -> str:
    return f"featuresum-floor-{parameters['name']}"


@task(cache_key_fn=_same_key, persist_result=True, result_serializer="json", task_run_name="{name}")
def step(name: str) -> dict:
    """A cached task with a manifest-sized result."""
    return {"path": f"/tmp/{name}", "fingerprint": "0" * 64}


@task(task_run_name="monitor", cache_policy=NO_CACHE)
def monitor(results: list[dict]) -> dict:
    """An uncached task, as featuresum's monitoring is."""
    return {"rows": len(results)}


@flow(name="featuresum-floor")
def floor() -> dict:
    """Five cached tasks, then one that always runs."""
    return monitor([step(name) for name in STEPS])


if __name__ == "__main__":
    floor()

"""The event a change of the champion sends, so automations, notifications and the UI's event feed see it.

The gate, `featuresum models promote` and `models rollback` each move the champion through the
registry, which is plain code; this is where the move is told to Prefect.
"""

import logging
from typing import Any

from featuresum.flows.automations import PROMOTED_EVENT, ROLLED_BACK_EVENT
from featuresum.tasks import storage
from featuresum.tasks.registry import AliasChange, Registry


def _accuracy(registry: Registry, version: int | None) -> float | None:
    return None if version is None else registry.get(version).metrics.get("val_accuracy")


def champion_event(
    registry: Registry,
    artifacts_dir: storage.Location,
    change: AliasChange,
    *,
    rolled_back: bool = False,
    accuracies: tuple[float | None, float | None] | None = None,
    flow_run_name: str | None = None,
) -> dict[str, Any]:
    """The event of one move of the champion: its name, resource and payload, ready for `emit_event`.

    The accuracies are the old and the new champion's held-out accuracy: as the gate measured them
    on the same rows when given, else as recorded when each version was trained.
    """
    from prefect.settings import PREFECT_UI_URL

    old, new = accuracies or (_accuracy(registry, change.previous), _accuracy(registry, change.version))
    folder = str(storage.resolve(artifacts_dir))
    ui = PREFECT_UI_URL.value()
    return {
        "event": ROLLED_BACK_EVENT if rolled_back else PROMOTED_EVENT,
        "resource": {
            "prefect.resource.id": f"featuresum.champion.{folder}",
            "prefect.resource.name": f"champion of {folder}",
            "featuresum.artifacts-dir": folder,
        },
        "related": [
            {"prefect.resource.id": f"featuresum.model.{change.version}", "prefect.resource.role": "model"},
        ],
        "payload": {
            "old_version": change.previous,
            "new_version": change.version,
            "old_accuracy": old,
            "new_accuracy": new,
            "reason": change.reason,
            "run_date": registry.get(change.version).run_date,
            "flow_run_id": change.flow_run_id,
            "flow_run_name": flow_run_name,
            "ui": f"{ui}/runs/flow-run/{change.flow_run_id}" if ui and change.flow_run_id else ui,
        },
    }


def announce(registry: Registry, artifacts_dir: storage.Location, change: AliasChange, **details: Any) -> bool:
    """Send the event of a move of the champion; whether Prefect took it (False with no API to send to)."""
    from prefect.events import emit_event

    return emit_event(**champion_event(registry, artifacts_dir, change, **details)) is not None


def announce_by_hand(
    registry: Registry, artifacts_dir: storage.Location, change: AliasChange, *, rolled_back: bool = False
) -> str | None:
    """Send the event of a move by `models promote` or `rollback`; the API it went to, None when none is up.

    The configured API (PREFECT_API_URL), else featuresum's local server when it runs: a command that
    only edits the registry starts no server for its event.
    """
    from prefect.events.worker import EventsWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from featuresum.flows import local_server

    url = local_server.configured_api_url()
    if url is None and (status := local_server.server_status(local_server.prefect_home())):
        url = status["api_url"]
    if url is None or local_server.api_health(url) != "ok":
        return None
    # The worker warns "Still processing items" while it drains the one event: that is the sending itself.
    drain_warnings = logging.getLogger(EventsWorker.__name__)
    with temporary_settings({PREFECT_API_URL: url}):
        sent = announce(registry, artifacts_dir, change, rolled_back=rolled_back)
        level, drain_warnings.level = drain_warnings.level, logging.ERROR
        try:
            EventsWorker.drain_all(timeout=10.0)
        finally:
            drain_warnings.setLevel(level)
    return url if sent else None

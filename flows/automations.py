"""The automations featuresum keeps on the Prefect server: dead runs marked Crashed, and notifications.

Both run in the server's own services (triggers and actions), so they work when the process of the
run they are about is gone: a run killed by SIGKILL, the out-of-memory killer or a reboot stops
sending heartbeats, and the server marks it Crashed and tells the webhooks of its deployment.
"""

import json
from datetime import timedelta
from typing import Any

DEAD_RUNS = "featuresum: mark dead runs crashed"
NOTIFY = "featuresum: notify"
# The events that end a run's heartbeats without its process dying.
RUN_ENDED = ["Completed", "Failed", "Cancelled", "Crashed", "Cancelling", "Paused", "Suspended"]
PROMOTED_EVENT = "featuresum.model.promoted"
ROLLED_BACK_EVENT = "featuresum.model.rolled-back"


def _upsert(client: Any, automation: Any) -> None:
    """Create the automation, or replace the one of the same name (and remove any copies of it)."""
    found = client.read_automations_by_name(automation.name)
    if not found:
        client.create_automation(automation)
        return
    client.update_automation(found[0].id, automation)
    for extra in found[1:]:
        client.delete_automation(extra.id)


def heartbeat_bound(frequency: int) -> timedelta:
    """How long after a run's last heartbeat it counts as dead: two and a half heartbeats."""
    return timedelta(seconds=frequency * 5 // 2)


def watch_dead_runs(client: Any) -> timedelta | None:
    """Keep the automation that marks a featuresum run Crashed when its heartbeats stop; its bound.

    Every flow run sends `prefect.flow-run.heartbeat` every PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds
    while its process lives. A run of ours (tagged `featuresum`) that, once Running, sends neither
    another heartbeat nor a final state within the bound is set to Crashed. Runs of other projects on the server are
    not touched. None (and no automation) when heartbeats are switched off.
    """
    from prefect.automations import AutomationCore
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.settings import get_current_settings

    frequency = get_current_settings().flows.heartbeat_frequency
    if frequency is None:
        return None
    bound = heartbeat_bound(max(frequency, 30))
    trigger = EventTrigger(
        # From Running on (the server records it), so a run killed before its first heartbeat left counts too.
        after={"prefect.flow-run.heartbeat", "prefect.flow-run.Running"},
        expect={"prefect.flow-run.heartbeat", *(f"prefect.flow-run.{state}" for state in RUN_ENDED)},
        match={"prefect.resource.id": "prefect.flow-run.*"},
        match_related={"prefect.resource.id": "prefect.tag.featuresum"},
        for_each={"prefect.resource.id"},
        posture=Posture.Proactive,
        threshold=1,
        within=bound,
    )
    message = f"no heartbeat for {int(bound.total_seconds())} s: its process is gone (killed, out of memory, a reboot)"
    _upsert(
        client,
        AutomationCore(
            name=DEAD_RUNS,
            description="Mark a featuresum flow run Crashed when its heartbeats stop before it ends.",
            trigger=trigger,
            actions=[ChangeFlowRunState(state=StateType.CRASHED, name="Crashed", message=message)],
        ),
    )
    return bound


def _payload(deployment: str, **fields: str) -> str:
    """The JSON every notification POSTs, as a template the server fills in from the event."""
    template = {
        "event": "{{ event.event | tojson }}",
        "deployment": json.dumps(deployment),
        "flow_run_id": "null",
        "flow_run_name": "null",
        "run_date": "null",
        "state": "null",
        "message": "null",
        "model_version": "null",
        "ui": "null",
        **fields,
    }
    return "{" + ", ".join(f"{json.dumps(key)}: {value}" for key, value in template.items()) + "}"


# The run's date: its run_date parameter, else the date tag it gave itself.
_RUN_DATE = (
    '{% set day = namespace(value=flow_run.parameters.get("run_date")) %}'
    '{% for tag in flow_run.tags %}{% if not day.value and tag.startswith("date-") %}'
    "{% set day.value = tag[5:] %}{% endif %}{% endfor %}"
)
_RUN_FIELDS = {
    "flow_run_id": "{{ flow_run.id | string | tojson }}",
    "flow_run_name": "{{ flow_run.name | tojson }}",
}


def _notifications(deployment_id: str, name: str, artifacts_dir: str, ui: str) -> dict[str, tuple[Any, str]]:
    """{what: (trigger, payload template)} of the three notifications of a deployment."""
    from prefect.events.schemas.automations import EventTrigger, Posture

    from featuresum.tasks import monitoring

    run_ui = json.dumps(ui + "/runs/flow-run/") + " ~ (flow_run.id | string)"
    ended = EventTrigger(
        expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed"},
        match={"prefect.resource.id": "prefect.flow-run.*"},
        match_related={"prefect.resource.id": f"prefect.deployment.{deployment_id}"},
        posture=Posture.Reactive,
        threshold=1,
    )
    ended_payload = _RUN_DATE + _payload(
        name,
        **_RUN_FIELDS,
        run_date="{{ day.value | default(none) | tojson }}",
        state='{{ event.resource["prefect.state-name"] | default(none) | tojson }}',
        message='{{ event.resource["prefect.state-message"] | default(none) | tojson }}',
        ui="{{ (" + run_ui + ") | tojson }}",
    )
    drift = EventTrigger(
        expect={monitoring.DRIFT_EVENT},
        match={"featuresum.artifacts-dir": artifacts_dir},
        posture=Posture.Reactive,
        threshold=1,
    )
    drift_payload = _payload(
        name,
        flow_run_id="{{ ((flow_run.id | string) if flow_run else none) | tojson }}",
        flow_run_name="{{ (flow_run.name if flow_run else none) | tojson }}",
        run_date="{{ event.payload.date | default(none) | tojson }}",
        message='{{ ("batch of " ~ event.payload.date ~ " drifted to level " ~ event.payload.level'
        ' ~ ": feature-sum PSI " ~ event.payload.feature_sum_psi ~ ", predicted-class PSI "'
        " ~ event.payload.predicted_class_psi) | tojson }}",
        model_version="{{ event.payload.model_version | default(none) | tojson }}",
        ui="{{ ((" + run_ui + ") if flow_run else " + json.dumps(ui) + ") | tojson }}",
    )
    champion = EventTrigger(
        expect={PROMOTED_EVENT, ROLLED_BACK_EVENT},
        match={"featuresum.artifacts-dir": artifacts_dir},
        posture=Posture.Reactive,
        threshold=1,
    )
    champion_payload = _payload(
        name,
        flow_run_id="{{ event.payload.flow_run_id | default(none) | tojson }}",
        flow_run_name="{{ event.payload.flow_run_name | default(none) | tojson }}",
        run_date="{{ event.payload.run_date | default(none) | tojson }}",
        message="{{ event.payload.reason | default(none) | tojson }}",
        model_version="{{ event.payload.new_version | default(none) | tojson }}",
        ui="{{ event.payload.ui | default(none) | tojson }}",
    )
    return {
        "run failed or crashed": (ended, ended_payload),
        "drift alert": (drift, drift_payload),
        "champion changed": (champion, champion_payload),
    }


def _notify_names(name: str) -> list[str]:
    return [f"{NOTIFY} {what} ({name})" for what in ("run failed or crashed", "drift alert", "champion changed")]


def notify(client: Any, deployment_id: str, name: str, artifacts_dir: str, urls: list[str], ui: str) -> list[str]:
    """Keep the automations that POST JSON to `urls` about a deployment; none (removed) without urls.

    One automation per kind of news (a run ended Failed or Crashed, a batch scored with the
    deployment's artifacts folder drifted to alert, the champion of that folder changed), each with
    a call-webhook action per URL through a saved Webhook block. The names of the automations kept.
    """
    from prefect.automations import AutomationCore
    from prefect.blocks.webhook import Webhook
    from prefect.events.actions import CallWebhook

    names = _notify_names(name)
    if not urls:
        for automation in client.read_automations():
            if automation.name in names:
                client.delete_automation(automation.id)
        return []
    blocks = []
    for number, url in enumerate(urls):
        block = Webhook(url=url, headers={"Content-Type": "application/json"})
        # Named by the deployment's id: names that differ only in punctuation never share a block.
        block_name = f"featuresum-notify-{deployment_id}-{number}"
        blocks.append(block.save(block_name, overwrite=True))
    for automation_name, (what, (trigger, payload)) in zip(
        names, _notifications(deployment_id, name, artifacts_dir, ui).items(), strict=True
    ):
        _upsert(
            client,
            AutomationCore(
                name=automation_name,
                description=f"POST to {len(urls)} webhook(s) when {what}.",
                trigger=trigger,
                actions=[CallWebhook(block_document_id=block, payload=payload) for block in blocks],
            ),
        )
    return names

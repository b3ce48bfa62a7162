"""The promotion gate: register a trained challenger, and move the champion only when it earns it.

The champion only moves forward in time: a run for an earlier date than the champion's (a rerun,
a backfill of the past) is measured and its decision recorded, but it never takes the champion.
"""

from collections.abc import Callable
from datetime import date

from prefect import get_run_logger
from prefect.runtime import flow_run

from featuresum.flows.champion_events import announce
from featuresum.flows.steps import Run, Window, ref
from featuresum.tasks import reports, storage
from featuresum.tasks.errors import EnvironmentFailure
from featuresum.tasks.prefect_tasks import evaluate_model
from featuresum.tasks.registry import Registry, Version


def initial_weights(init: str, day: date, artifacts_dir: str) -> dict[str, str] | None:
    """The checkpoint to start from with init="champion": the champion as it stood for `day`.

    That is the latest champion trained before `day`, as the alias history stood when the date's
    first version was registered (now, for a date run for the first time). Not simply the champion
    now: after this date's challenger is promoted, or another version by hand, a rerun of the date
    must start from the same weights as the first run did, so that it finds its model cached.
    None from scratch, or when there is no such champion yet.
    """
    if init == "scratch":
        return None
    registry = Registry(storage.resolve(artifacts_dir))
    first = min((v.created for v in registry.versions() if v.run_date == day.isoformat()), default=None)
    for change in reversed(registry.history()):
        if first is not None and change.changed > first:
            continue
        champion = registry.get(change.version)
        if (champion.run_date or "") < day.isoformat() and storage.exists(champion.checkpoint):
            return {"path": champion.checkpoint, "fingerprint": champion.fingerprint}
    get_run_logger().info("No champion from before %s to start from: training from scratch", day)
    return None


def _usable(champion: Version) -> dict[str, str]:
    """The champion's checkpoint, when it still holds its registered weights; else the run stops with what to do."""
    if not storage.exists(champion.checkpoint):
        problem = f"has no checkpoint at {champion.checkpoint}"
    elif storage.fingerprint(champion.checkpoint) != champion.fingerprint:
        problem = f"checkpoint {champion.checkpoint} no longer holds its registered weights"
    else:
        return {"path": champion.checkpoint, "fingerprint": champion.fingerprint}
    raise EnvironmentFailure(
        f"the champion (version {champion.version}) {problem}: restore the file, or make another version"
        " the champion with `featuresum models promote VERSION`"
    )


def _decide(
    challenger: Version,
    accuracy: float,
    champion: Version | None,
    window: Window,
    gain: float,
    measure: Callable,
    rolled_back: set[int] = frozenset(),
) -> tuple[bool, str, float | None]:
    """(promote?, why, the champion's held-out accuracy) for a challenger against the champion now.

    `measure` gives a checkpoint's accuracy on the challenger's held-out rows. A version someone
    rolled the champion back from (`rolled_back`) is never promoted again by a run, only by hand.
    """
    if champion is None:
        return True, "first model: there was no champion", None
    if champion.version == challenger.version:
        return False, "the challenger is the champion already", accuracy
    champion_accuracy = measure(_usable(champion))
    promoted = accuracy >= champion_accuracy + gain
    reason = (
        f"held-out accuracy {accuracy:.4f} {'>=' if promoted else '<'} champion's {champion_accuracy:.4f}"
        f" + min improvement {gain:g}"
    )
    if challenger.version in rolled_back:
        promoted = False
        reason += (
            f"; kept out: the champion was rolled back from version {challenger.version}; only"
            f" `featuresum models promote {challenger.version}` makes it the champion again"
        )
    elif (champion.run_date or "") > window.day.isoformat():
        promoted = False
        reason += (
            f"; kept out: the champion (version {champion.version}) was trained for {champion.run_date},"
            f" after this run's date {window.day}, and a run never moves the champion back in time"
        )
    return promoted, reason, champion_accuracy


def gate(
    model: dict, holdout: dict, window: Window, artifacts_dir: str, min_improvement: float, device: str, run: Run
) -> dict:
    """Register the trained model as a version; make it the champion when there is none or it is better.

    The challenger's held-out accuracy is measured by training; the champion's on the same held-out
    rows by a cached task. A concurrent run that moves the champion meanwhile makes the gate decide
    again against the new champion (compare-and-set), so no promotion is lost or made blindly.
    """
    registry = Registry(storage.resolve(artifacts_dir))
    run_id = str(flow_run.id)
    challenger = registry.register(
        model["path"],
        model["fingerprint"],
        config=model["config"],
        metrics=model["metrics"],
        run_date=window.day.isoformat(),
        window=window.as_dict(),
        flow_run_id=run_id,
    )
    accuracy = model["metrics"]["val_accuracy"]

    def measure(reference: dict[str, str]) -> float:
        return run.call(evaluate_model, model=reference, holdout=ref(holdout), device=device)["accuracy"]

    while True:
        champion = registry.alias()
        promoted, reason, champion_accuracy = _decide(
            challenger, accuracy, champion, window, min_improvement, measure, registry.rolled_back()
        )
        expected = champion.version if champion else None
        if not promoted:
            break
        if change := registry.set_alias(challenger.version, reason, flow_run_id=run_id, expected=expected):
            announce(
                registry, artifacts_dir, change, accuracies=(champion_accuracy, accuracy), flow_run_name=flow_run.name
            )
            break
    now = registry.alias()
    decision = {
        "model_version": challenger.version,
        "champion_version": now.version,
        "previous_champion": champion.version if champion else None,
        "promoted": promoted,
        "challenger_accuracy": accuracy,
        "champion_accuracy": champion_accuracy,
        "reason": reason,
    }
    get_run_logger().info("Promotion gate: %s", decision)
    reports.publish_promotion(decision)
    return {**decision, "champion": {"path": now.checkpoint, "fingerprint": now.fingerprint}}

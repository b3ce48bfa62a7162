"""Drift as Prefect hears of it: a log line for every monitored batch, and the event an alert sends."""

from typing import Any

from prefect import get_run_logger

from featuresum.tasks import monitoring, storage
from featuresum.tasks.figures import format_figure


def log_drift(row: dict[str, Any]) -> None:
    """One log line with the batch's level: info when ok, a warning otherwise."""
    logger = get_run_logger()
    described = (
        f"batch of {row['run_date']}: feature-sum PSI {format_figure(row['feature_sum_psi'], 'n/a')}, "
        f"predicted-class PSI {format_figure(row['predicted_class_psi'], 'n/a')}, level {row['level']}"
    )
    if row["level"] == "ok":
        logger.info("No drift in the %s", described)
    elif row["level"] == "unknown":
        why = "no rows were scored" if not row["rows"] else "the model's checkpoint holds no reference"
        logger.warning("No drift figures for the %s: %s", described, why)
    else:
        logger.warning(
            "Drift in the %s (warn from %g, alert above %g)", described, row["drift_warn"], row["drift_alert"]
        )


def emit_drift(row: dict[str, Any], artifacts_dir: storage.Location, scored_by: str) -> bool:
    """Tell Prefect's event system (automations, deployment triggers) that a batch drifted; whether it was sent."""
    from prefect.events import emit_event

    version = row["model_version"]
    name = f"model version {version}" if version is not None else f"model {row['model_fingerprint'][:12]}"
    emitted = emit_event(
        event=monitoring.DRIFT_EVENT,
        resource={
            "prefect.resource.id": f"featuresum.model.{version if version is not None else row['model_fingerprint']}",
            "prefect.resource.name": name,
            "featuresum.artifacts-dir": str(storage.resolve(artifacts_dir)),
            "featuresum.scored-by": scored_by,
        },
        payload={
            "date": row["run_date"],
            "level": row["level"],
            "feature_sum_psi": row["feature_sum_psi"],
            "predicted_class_psi": row["predicted_class_psi"],
            "accuracy": row["accuracy"],
            "rows": row["rows"],
            "model_version": version,
            "batch": row["batch"],
        },
    )
    if emitted is None:
        get_run_logger().warning("Could not send %s for %s: no Prefect events client", monitoring.DRIFT_EVENT, name)
        return False
    get_run_logger().warning("Sent %s for %s", monitoring.DRIFT_EVENT, name)
    return True

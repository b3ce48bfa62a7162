"""How commands print what a flow run did: aligned `key: value` lines, or one JSON object."""

import json
from typing import Any

from featuresum.tasks.figures import format_figure

# What `--json` reports of a scored batch's drift.
DRIFT_KEYS = ("feature_sum_psi", "predicted_class_psi", "level")


def report(summary: dict[str, Any], as_json: bool) -> None:
    """A flow run's summary: paths, the gate's decision, drift, metrics and task states."""
    if as_json:
        print(json.dumps(summary))
        return
    for key in ("train_data", "holdout_data", "checkpoint", "model_version", "score_input", "predictions", "ui"):
        if key in summary:
            print(f"{key:>12}: {summary[key]}")
    if gate := summary.get("registry"):
        print(f"{'champion':>12}: version {gate['champion_version']} ({gate['reason']})")
    if drift := summary.get("drift"):
        print(f"{'drift':>12}: {drift_line(drift)}")
    for key, value in summary["metrics"].items():
        print(f"{key:>12}: {value:.4f}" if isinstance(value, float) else f"{key:>12}: {value}")
    for name, state in summary["task_states"].items():
        print(f"{state:>12}: {name}")


def drift_line(drift: dict[str, Any]) -> str:
    """A batch's drift level and PSIs, as progress lines and reports show them."""
    features, classes = (format_figure(drift[key]) for key in ("feature_sum_psi", "predicted_class_psi"))
    return f"{drift['level']} (feature-sum PSI {features}, predicted-class PSI {classes})"

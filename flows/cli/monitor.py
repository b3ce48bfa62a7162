"""`featuresum monitor`: the monitoring history of scored batches, as a table and a drift chart, or JSON."""

import json
from typing import Annotated, Any

import typer

from featuresum.flows.cli._app import app
from featuresum.flows.options import PipelineOptions
from featuresum.flows.presets import DRIFT_ALERT, DRIFT_WARN
from featuresum.tasks.figures import format_figure

ArtifactsDir = Annotated[str, typer.Option(help=PipelineOptions.help("artifacts_dir"))]
COLUMNS = ("run_date", "model_version", "rows", "feature_sum_psi", "predicted_class_psi")
COLUMNS += ("feature_sum_mean", "mean_confidence", "accuracy", "level")


@app.command()
def monitor(
    artifacts_dir: ArtifactsDir = PipelineOptions.artifacts_dir,
    last: Annotated[int, typer.Option(min=1, help="Show the latest N scored batches.")] = 30,
    json_output: Annotated[bool, typer.Option("--json", help="Print the rows as one JSON list.")] = False,
) -> None:
    """Show the monitoring history: drift (PSI) and accuracy of every scored batch by date, and a drift chart."""
    from featuresum.tasks import monitoring

    rows = monitoring.read_history(artifacts_dir)[-last:]
    if json_output:
        print(json.dumps(rows))
        return
    if not rows:
        print(f"no scored batches yet in {monitoring.history_path(artifacts_dir)}")
        return
    cells = [[format_figure(row[name]) for name in COLUMNS] for row in rows]
    widths = [max(len(name), *(len(line[i]) for line in cells)) for i, name in enumerate(COLUMNS)]
    for line in [list(COLUMNS), *cells]:
        print("  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True)))
    print()
    print(monitoring.text_chart(rows, *judged_thresholds(rows)))


def judged_thresholds(rows: list[dict[str, Any]]) -> tuple[float, float]:
    """The warn and alert thresholds the latest of these batches was judged with (the defaults when none says)."""
    judged = [row for row in rows if row.get("drift_warn") is not None and row.get("drift_alert") is not None]
    return (judged[-1]["drift_warn"], judged[-1]["drift_alert"]) if judged else (DRIFT_WARN, DRIFT_ALERT)

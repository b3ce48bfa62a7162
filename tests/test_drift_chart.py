"""The drift chart and the UI's drift levels, drawn from real monitoring histories written to Parquet."""

import pytest
from test_cli_errors import featuresum
from test_monitoring import history_row

from featuresum.tasks import monitoring

SMALL_TO_LARGE = [0.001, 0.005, 0.01, 0.05, 0.2]


def write_history(folder, psis, *, warn=0.1, alert=0.25, start=1, model=1):
    """A history of one batch a day from 2026-01-`start`, judged with these thresholds; read back from Parquet."""
    for day, value in enumerate(psis, start=start):
        row = history_row(f"2026-01-{day:02d}", f"b{day}", psi=value, model=f"m{model}")
        row.update(
            predicted_class_psi=value / 2,
            level=monitoring.level([value], warn, alert),
            drift_warn=warn,
            drift_alert=alert,
            model_version=model,
        )
        monitoring.record(folder, row)
    return monitoring.read_history(folder)


DRAWN = {monitoring.BAR, monitoring.TRACK, monitoring.WARN_MARK, monitoring.ALERT_MARK}


def tracks(chart: str) -> list[str]:
    """The bars of a chart's batches (with their marks), one per line that draws one."""
    cells = {monitoring.BAR, monitoring.TRACK}
    return [word for line in chart.splitlines() for word in line.split() if set(word) <= DRAWN and set(word) & cells]


def cell_after(bar: str, index: int) -> str:
    """The first cell of a bar after its character at `index`, past any marks ('' at its end)."""
    return next((char for char in bar[index + 1 :] if char in (monitoring.BAR, monitoring.TRACK)), "")


def test_small_psis_get_distinct_bar_lengths_in_their_order(tmp_path):
    rows = write_history(tmp_path, SMALL_TO_LARGE)
    lengths = [bar.count(monitoring.BAR) for bar in tracks(monitoring.text_chart(rows, 0.1, 0.25))]
    assert len(lengths) == 5
    assert lengths == sorted(set(lengths)), lengths
    assert lengths[0] >= 1
    # The markdown chart of the UI draws the same bars.
    markdown = [line.split("`")[1] for line in monitoring.chart(rows, 0.1, 0.25).splitlines() if "`" in line]
    assert [bar.count(monitoring.BAR) for bar in markdown] == lengths


def test_the_scale_holds_the_largest_psi_and_stays_ordered_there(tmp_path):
    rows = write_history(tmp_path, [*SMALL_TO_LARGE, 3.0, 18.0])
    top = monitoring.chart_top(rows, 0.25)
    assert top == 100.0
    lengths = [monitoring.bar_cells(monitoring.drift_psi(row), top, 0.1, 0.25) for row in rows]
    assert lengths == sorted(set(lengths)) and lengths[-1] <= monitoring.CHART_CELLS


@pytest.mark.parametrize(("warn", "alert"), [(0.1, 0.25), (0.02, 0.05), (0.005, 0.5), (0.001, 0.9)])
def test_marks_sit_where_the_thresholds_are(tmp_path, warn, alert):
    psis = [warn * 0.7, warn, alert, alert * 1.3]
    rows = write_history(tmp_path, psis, warn=warn, alert=alert)
    top = monitoring.chart_top(rows, alert)
    for row, bar in zip(rows, tracks(monitoring.text_chart(rows, warn, alert)), strict=True):
        value = monitoring.drift_psi(row)
        warn_at, alert_at = bar.index(monitoring.WARN_MARK), bar.index(monitoring.ALERT_MARK)
        assert warn_at == monitoring.mark_cell(warn, top)  # the first mark has only cells before it
        assert alert_at == monitoring.mark_cell(alert, top) + 1
        # A bar passes a mark exactly when its batch is at that level or above.
        assert (cell_after(bar, warn_at) == monitoring.BAR) == (value >= warn), (value, bar)
        assert (cell_after(bar, alert_at) == monitoring.BAR) == (value > alert), (value, bar)


def test_thresholds_in_one_cell_draw_both_marks_side_by_side():
    bar = monitoring.track(0.3, 1.0, 0.2, 0.2)
    assert monitoring.WARN_MARK + monitoring.ALERT_MARK in bar
    assert bar.count(monitoring.BAR) == monitoring.bar_cells(0.3, 1.0, 0.2, 0.2) > monitoring.mark_cell(0.2, 1.0)


def test_marks_move_when_the_thresholds_change(tmp_path):
    rows = write_history(tmp_path, [0.05])
    (default,) = tracks(monitoring.text_chart(rows, 0.1, 0.25))
    (strict,) = tracks(monitoring.text_chart(rows, 0.01, 0.03))
    assert strict.index(monitoring.WARN_MARK) < default.index(monitoring.WARN_MARK)
    assert strict.index(monitoring.ALERT_MARK) < default.index(monitoring.ALERT_MARK)
    # The same bar passes both of the stricter marks and neither of the default ones.
    assert strict.count(monitoring.BAR) == default.count(monitoring.BAR)
    assert cell_after(strict, strict.index(monitoring.ALERT_MARK)) == monitoring.BAR
    assert cell_after(default, default.index(monitoring.WARN_MARK)) == monitoring.TRACK


def test_the_legend_names_the_marks_their_values_and_the_scale(tmp_path):
    rows = write_history(tmp_path, SMALL_TO_LARGE, warn=0.07, alert=0.3)
    for chart in (monitoring.text_chart(rows, 0.07, 0.3), monitoring.chart(rows, 0.07, 0.3)):
        assert f"{monitoring.WARN_MARK} warn from a PSI of 0.07" in chart
        assert f"{monitoring.ALERT_MARK} alert above 0.3" in chart
        assert "log scale from 0.001 to 1" in chart and "a decade every 12 cells" in chart
    axis = monitoring.text_chart(rows, 0.07, 0.3).splitlines()[-1].split()
    assert axis == ["0.001", "0.01", "0.1", "1"]


def test_the_terminal_chart_fits_80_columns(tmp_path):
    rows = write_history(tmp_path, [*SMALL_TO_LARGE, 18.4207])
    rows.append({**rows[-1], "model_version": None, "feature_sum_psi": None, "predicted_class_psi": None})
    lines = monitoring.text_chart(rows, 0.0, 0.25).splitlines()
    assert max(len(line) for line in lines) <= 80, lines
    date, psi, bar, level, model = lines[-2].split()
    assert (psi, bar.count(monitoring.BAR), level, model) == ("n/a", 0, "alert", "m1")


def test_monitor_prints_the_chart_with_the_latest_thresholds(capsys, tmp_path):
    write_history(tmp_path, SMALL_TO_LARGE, warn=0.02, alert=0.04)
    code, out, _ = featuresum(capsys, "monitor", "--artifacts-dir", str(tmp_path))
    assert code == 0
    table, chart = out.split("\n\n", 1)
    assert len(table.splitlines()) == 6
    assert "┆ warn from a PSI of 0.02, ┃ alert above 0.04" in chart
    assert [bar.count(monitoring.BAR) for bar in tracks(chart)] == [
        monitoring.bar_cells(value, 1.0, 0.02, 0.04) for value in SMALL_TO_LARGE
    ]
    assert [line.split()[-2] for line in chart.splitlines() if monitoring.TRACK in line] == [
        "ok", "ok", "ok", "alert", "alert",
    ]  # fmt: skip
    code, out, _ = featuresum(capsys, "monitor", "--artifacts-dir", str(tmp_path), "--json")
    assert code == 0 and out.startswith("[{") and monitoring.TRACK not in out


def test_drift_levels_hold_exactly_the_last_dates_in_order(tmp_path):
    psis = [0.01] * 6 + [0.15, 0.3, 0.02] * 5  # 21 dates
    rows = write_history(tmp_path, psis)
    lines = monitoring.levels_markdown(rows, 14).splitlines()
    assert lines[:2] == ["| date | level | PSI | model |", "|---|---|---|---|"]
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
    assert [cell[0] for cell in cells] == [f"2026-01-{day:02d}" for day in range(8, 22)]
    expected = {0.01: "🟢 ok", 0.02: "🟢 ok", 0.15: "🟡 **warn**", 0.3: "🔴 **alert**"}
    assert [cell[1:] for cell in cells] == [[expected[value], f"{value:.4f}", "1"] for value in psis[7:]]


def test_a_date_scored_twice_shows_its_worst_batch(tmp_path):
    write_history(tmp_path, [0.01, 0.02])
    rows = write_history(tmp_path, [0.3], start=2, model=2)  # another batch of 2026-01-02, another model
    rows = write_history(tmp_path, [0.01], start=2, model=3)  # and a third one, later and ok
    assert len(rows) == 4
    dates = monitoring.recent_levels(rows, 14)
    assert [(row["run_date"], row["level"], row["model_version"]) for row in dates] == [
        ("2026-01-01", "ok", 1),
        ("2026-01-02", "alert", 2),
    ]

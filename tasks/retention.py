"""Retention: delete the data partitions, predictions and checkpoints that no recent or future run can need.

"Recent" is the last `keep_days` run dates counted back from the newest run date the registry or the
monitoring history knows (not from the clock, so a backfill of the past is measured by its own dates).
What stays, whatever its age:

- every data partition from the oldest date a recent run reads (its training window) onwards, so the
  newest date's rerun finds its whole window and stays cached;
- the checkpoints of the champion, of every version the champion pointed at in those days, of the
  version a rollback returns to, and of the versions trained for recent dates;
- predictions a recent date's run wrote, and any whose date is unknown;
- the registry, the monitoring history, and every file whose name is not one the pipeline writes.

A version whose checkpoint goes keeps its registry row, marked pruned. A run that needs a deleted
partition generates it again (the synthetic source is deterministic); one that needs a deleted
checkpoint trains it again.
"""

import re
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any

from featuresum.tasks import monitoring, storage
from featuresum.tasks.errors import InputError
from featuresum.tasks.registry import AliasChange, Registry, Version

# The names the pipeline writes (storage.locations), with the manifest (.<name>.json) and lock (.<name>.lock)
# beside each; `owner` is the output a file belongs to.
_SIDE = r"(?:\.(?P<dot>json|lock))?"
PARTITION = re.compile(
    rf"(?P<dataset>[a-z]+-[0-9a-f]{{16}})/date=(?P<date>\d{{4}}-\d{{2}}-\d{{2}})/\.?(?P<owner>part-0\.parquet){_SIDE}"
)
CHECKPOINT = re.compile(rf"\.?(?P<owner>model-[0-9a-f]{{16}}\.pt){_SIDE}")
PREDICTIONS = re.compile(
    rf"\.?(?P<owner>predictions-[0-9a-f]{{16}}\.parquet){_SIDE}"
    rf"|(?P<parts>predictions-[0-9a-f]{{16}}\.parquet)\.parts/\.?part-\d{{5}}-[0-9a-f]{{16}}\.parquet(?:\.json|\.lock)?"
)


@dataclass
class Plan:
    """What retention deletes (location and size of each file) and what it keeps, and why."""

    deleted: list[tuple[storage.Location, int]] = field(default_factory=list)
    pruned: list[int] = field(default_factory=list)
    kept: dict[str, Any] = field(default_factory=dict)

    def report(self, dry_run: bool) -> dict[str, Any]:
        """The report `featuresum gc --json` prints."""
        return {
            "deleted": [str(location) for location, _ in self.deleted],
            "freed_bytes": sum(size for _, size in self.deleted),
            "pruned_versions": self.pruned,
            "dry_run": dry_run,
            "kept": self.kept,
        }


def _day(value: str | None) -> date | None:
    return date.fromisoformat(value) if value else None


def _dates(window: dict[str, Any]) -> list[date]:
    start, end = date.fromisoformat(window["from"]), date.fromisoformat(window["to"])
    return [start + timedelta(days=n) for n in range((end - start).days + 1)]


def _files(base: storage.Location) -> list[tuple[str, storage.Location, int]]:
    """(name relative to `base`, location, size) of every file under `base`."""
    prefix = f"{str(base).rstrip('/')}/"
    return [(str(location)[len(prefix) :], location, size) for location, size in storage.list_files(base)]


def _moved_on(move: AliasChange, versions: list[Version]) -> date | None:
    """The run date an alias move belongs to: the newest run date registered when it happened."""
    when = datetime.fromisoformat(move.changed)
    dated = [_day(v.run_date) for v in versions if v.run_date and datetime.fromisoformat(v.created) <= when]
    return max(dated, default=None)


def rollback_targets(registry: Registry, versions: list[Version], cutoff: date) -> list[int]:
    """The versions the champion pointed at from `cutoff` on (the one it held then included), and the
    version one rollback returns to, so `featuresum models rollback` finds its checkpoint."""
    history = registry.history()
    targets = {move.version for move in history if (_moved_on(move, versions) or cutoff) >= cutoff}
    earlier = [move for move in history if (_moved_on(move, versions) or cutoff) < cutoff]
    if earlier:
        targets.add(earlier[-1].version)
    if len(lineage := registry.lineage()) >= 2:
        targets.add(lineage[-2])
    return sorted(targets)


def plan(data_dir: storage.Location, artifacts_dir: storage.Location, keep_days: int) -> Plan:
    """Decide what goes; nothing is deleted."""
    if keep_days < 1:
        raise InputError(f"--keep-days {keep_days}: keep at least 1 day")
    data_dir, artifacts_dir = storage.resolve(data_dir), storage.resolve(artifacts_dir)
    registry = Registry(artifacts_dir)
    versions, history = registry.versions(), monitoring.read_history(artifacts_dir)
    known = [_day(v.run_date) for v in versions] + [_day(row["run_date"]) for row in history]
    newest = max(filter(None, known), default=None)
    if newest is None:
        return Plan(kept={"newest_date": None, "reason": "no run date in the registry or the history yet"})
    cutoff = newest - timedelta(days=keep_days - 1)
    recent = [v for v in versions if v.run_date is None or _day(v.run_date) >= cutoff]
    newest_runs = [v for v in versions if v.run_date == newest.isoformat() and v.window]
    window = sorted({day for version in newest_runs for day in _dates(version.window)})
    data_from = min([cutoff, *(_dates(v.window)[0] for v in recent if v.window)])
    champion = registry.alias()
    targets = rollback_targets(registry, versions, cutoff)
    kept_versions = {v.version for v in recent} | set(targets) | ({champion.version} if champion else set())
    result = Plan(
        kept={
            "newest_date": newest.isoformat(),
            "keep_from": cutoff.isoformat(),
            "data_from": data_from.isoformat(),
            "champion": champion.version if champion else None,
            "rollback_targets": targets,
            "recent_versions": sorted(v.version for v in recent),
            "window": [day.isoformat() for day in window],
        }
    )
    result.deleted += [(loc, size) for name, loc, size in _files(data_dir) if _old_partition(name, data_from)]
    artifacts = _files(artifacts_dir)
    _plan_checkpoints(result, artifacts_dir, artifacts, versions, kept_versions)
    _plan_predictions(result, artifacts, history, cutoff)
    return result


def _old_partition(name: str, data_from: date) -> bool:
    found = PARTITION.fullmatch(name)
    return found is not None and date.fromisoformat(found["date"]) < data_from


def _plan_checkpoints(
    result: Plan, artifacts_dir: storage.Location, artifacts: list, versions: list[Version], kept: set[int]
) -> None:
    """A checkpoint goes when it is registered and every version at it is old; unregistered ones stay."""
    at: dict[str, list[Version]] = {}
    for version in versions:
        at.setdefault(version.checkpoint, []).append(version)
    for name, location, size in artifacts:
        if found := CHECKPOINT.fullmatch(name):
            owners = at.get(str(storage.join(artifacts_dir, found["owner"])), [])
            if owners and not {v.version for v in owners} & kept:
                result.deleted.append((location, size))
                if found["dot"] is None:
                    result.pruned += [v.version for v in owners if not v.pruned]
    result.pruned.sort()


def _plan_predictions(result: Plan, artifacts: list, history: list[dict[str, Any]], cutoff: date) -> None:
    """Predictions go (with their shard folder) when every batch the history records in them is older.

    They are matched by name (the history records where they were written, and the folder may have
    moved since); the name holds the key of what they are.
    """
    dates: dict[str, list[date | None]] = {}
    for row in history:
        dates.setdefault(storage.name_of(str(row["predictions"])), []).append(_day(row["run_date"]))
    for name, location, size in artifacts:
        if found := PREDICTIONS.fullmatch(name):
            recorded = dates.get(found["owner"] or found["parts"])
            if recorded and all(day is not None and day < cutoff for day in recorded):
                result.deleted.append((location, size))


def apply(plan: Plan, data_dir: storage.Location, artifacts_dir: storage.Location) -> None:
    """Delete what the plan says, then mark the versions whose checkpoints went as pruned."""
    bases = {str(storage.resolve(data_dir)), str(storage.resolve(artifacts_dir))}
    folders = set()
    for location, _ in plan.deleted:
        storage.remove(location)
        folder = storage.parent(location)
        while str(folder) not in bases and str(folder) not in folders:  # date=... and dataset folders, shard folders
            folders.add(str(folder))
            folder = storage.parent(folder)
    for folder in sorted(folders, key=len, reverse=True):
        storage.remove_empty_folder(folder)
    Registry(storage.resolve(artifacts_dir)).mark_pruned(plan.pruned)


def retain(
    data_dir: storage.Location, artifacts_dir: storage.Location, keep_days: int, dry_run: bool = False
) -> dict[str, Any]:
    """Delete (unless `dry_run`) what no run of the last `keep_days` days can need; returns the report."""
    decided = plan(data_dir, artifacts_dir, keep_days)
    if not dry_run:
        apply(decided, data_dir, artifacts_dir)
    return decided.report(dry_run)

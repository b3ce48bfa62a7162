"""The model registry: every trained model as a numbered version, and aliases (`champion`) that point at one.

It is one SQLite file in the artifacts folder, `registry.sqlite`, shared by every run and command that uses
that folder, possibly from several processes at once (registry_file.py keeps its changes whole).
Alias moves are never forgotten: each one is a row in the alias history, which is what a rollback reads.
"""

import json
import sqlite3
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from featuresum.tasks import storage
from featuresum.tasks.errors import InputError
from featuresum.tasks.registry_file import REGISTRY_FILE, RegistryFile


class _Any:
    """The type of ANY: `set_alias(expected=ANY)` moves the alias whatever it points at now."""

    def __repr__(self) -> str:
        return "ANY"


ANY = _Any()


@dataclass(frozen=True)
class Version:
    """One registered model."""

    version: int
    checkpoint: str
    fingerprint: str
    run_date: str | None
    window: dict | None
    config: dict
    metrics: dict
    flow_run_id: str | None
    created: str
    aliases: tuple[str, ...]
    # When `featuresum gc` deleted the checkpoint (None while it is kept); the row stays.
    pruned: str | None = None

    def as_dict(self) -> dict:
        """Every field, ready for JSON (aliases as a list)."""
        return {**asdict(self), "aliases": list(self.aliases)}


@dataclass(frozen=True)
class AliasChange:
    """One move of an alias, kept forever."""

    alias: str
    version: int
    previous: int | None
    reason: str
    flow_run_id: str | None
    changed: str
    rollback: bool = False  # a move back along the lineage (`models rollback`), not a promotion

    def as_dict(self) -> dict:
        """Every field, ready for JSON."""
        return asdict(self)


def _now() -> str:
    """Microseconds, so that a version registered and an alias moved within one second keep their order."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _change(row: sqlite3.Row) -> AliasChange:
    return AliasChange(
        alias=row["alias"],
        version=row["version"],
        previous=row["previous"],
        reason=row["reason"],
        flow_run_id=row["flow_run_id"],
        changed=row["changed"],
        rollback=bool(row["rollback"]) if "rollback" in row.keys() else False,
    )


def _aliases_by_version(conn: sqlite3.Connection) -> dict[int, tuple[str, ...]]:
    aliases: dict[int, tuple[str, ...]] = {}
    for row in conn.execute("SELECT name, version FROM aliases ORDER BY name"):
        aliases[row["version"]] = (*aliases.get(row["version"], ()), row["name"])
    return aliases


def _stored(folder: storage.Location, checkpoint: str) -> str:
    """How a checkpoint location is kept: relative to the artifacts folder when it lies in it, so the
    registry stays right when the folder is moved, copied or read from another machine."""
    if storage.is_remote(folder):
        prefix = f"{folder}/"
        return checkpoint[len(prefix) :] if checkpoint.startswith(prefix) else checkpoint
    path = Path(checkpoint)
    return str(path.relative_to(folder)) if path.is_absolute() and path.is_relative_to(folder) else checkpoint


def _located(folder: storage.Location, stored: str) -> str:
    """The checkpoint location a registry row names: a relative name is under the registry's own folder."""
    if storage.is_remote(stored) or Path(stored).is_absolute():
        return stored
    return str(storage.join(folder, stored))


def _version(row: sqlite3.Row, aliases: dict[int, tuple[str, ...]], folder: storage.Location) -> Version:
    window = row["date_window"]
    return Version(
        version=row["version"],
        checkpoint=_located(folder, row["checkpoint"]),
        fingerprint=row["fingerprint"],
        run_date=row["run_date"],
        window=None if window is None else json.loads(window),
        config=json.loads(row["config"]),
        metrics=json.loads(row["metrics"]),
        flow_run_id=row["flow_run_id"],
        created=row["created"],
        aliases=aliases.get(row["version"], ()),
        pruned=row["pruned"] if "pruned" in row.keys() else None,  # a file from before the column: none pruned
    )


def _alias_target(conn: sqlite3.Connection, name: str) -> int | None:
    row = conn.execute("SELECT version FROM aliases WHERE name = ?", (name,)).fetchone()
    return None if row is None else row["version"]


def _move_alias(
    conn: sqlite3.Connection,
    name: str,
    version: int,
    previous: int | None,
    reason: str,
    flow_run_id: str | None,
    *,
    rollback: bool = False,
) -> AliasChange:
    change = AliasChange(name, version, previous, reason, flow_run_id, _now(), rollback)
    conn.execute(
        "INSERT INTO aliases (name, version) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET version = excluded.version",
        (name, version),
    )
    conn.execute(
        "INSERT INTO alias_history (alias, version, previous, reason, flow_run_id, changed, rollback)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (change.alias, change.version, change.previous, change.reason, change.flow_run_id, change.changed, rollback),
    )
    return change


def _lineage(conn: sqlite3.Connection, name: str) -> list[int]:
    """The versions an alias stood at, oldest first, with every rollback taken out.

    A rollback undoes the move that brought the latest version of the lineage; any other move adds a
    version, even one back to the version before (a promotion by hand, say). A move recorded before
    rollbacks were marked counts as one when it goes from the latest version to the one before it.
    """
    lineage: list[int] = []
    for move in conn.execute("SELECT * FROM alias_history WHERE alias = ? ORDER BY id", (name,)):
        marked = move["rollback"] if "rollback" in move.keys() else None
        guessed = len(lineage) >= 2 and (move["version"], move["previous"]) == (lineage[-2], lineage[-1])
        if (marked is None and guessed) or (marked and len(lineage) >= 2):
            lineage.pop()
        else:
            lineage.append(move["version"])
    return lineage


def changed_weights(model: str, version: int) -> str:
    """The message for a registered version's checkpoint that holds other bytes than its own."""
    return (
        f"{model}: the checkpoint of model version {version} no longer holds its registered weights: restore"
        " the file, or score with another version"
    )


def pruned_checkpoint(model: str, version: Version) -> str:
    """The message for using (scoring with, exporting) a version whose checkpoint retention deleted."""
    return (
        f"{model}: model version {version.version} was pruned by `featuresum gc` on {version.pruned[:10]} (its"
        " checkpoint is deleted): use `champion` or another version that is kept (`featuresum models list`)"
    )


def _refuse_pruned(version: Version, what: str) -> None:
    """InputError when retention deleted the version's checkpoint: an alias must point at weights that exist."""
    if version.pruned:
        raise InputError(
            f"cannot {what} model version {version.version}: `featuresum gc` pruned it on {version.pruned[:10]}"
            " (its checkpoint is deleted); promote a version that is kept instead (`featuresum models list`,"
            " then `featuresum models promote N`)"
        )


def refuse_managed_output(
    output: storage.Location | None,
    artifacts_dir: storage.Location,
    data_dir: storage.Location | None = None,
    checkpoints: bool = True,
) -> None:
    """InputError when `output` would overwrite what featuresum keeps: a registry or a monitoring history
    (of any folder, by name), a registered version's checkpoint, any checkpoint (`*.pt`, unless
    `checkpoints` is False), anything in the data folder, or a shard folder. Checked before anything is written."""
    from featuresum.tasks.monitoring import HISTORY_FILE

    if output is None:
        return
    target = str(storage.resolve(output))
    name = storage.name_of(target)
    registered = {v.checkpoint: v.version for v in Registry(artifacts_dir).versions()}
    data = f"{str(storage.resolve(data_dir)).rstrip('/')}/" if data_dir is not None else None
    if name.startswith(REGISTRY_FILE):
        what = "a model registry"
    elif name == HISTORY_FILE:
        what = "a monitoring history"
    elif target in registered:
        what = f"model version {registered[target]}"
    elif checkpoints and name.endswith(".pt"):
        what = "checkpoints (*.pt)"
    elif data is not None and target.startswith(data):
        what = "the data folder"
    elif any(part.endswith(".parts") for part in target.split("/")[:-1]):
        what = "a shard folder"
    else:
        return
    raise InputError(f"{output}: featuresum keeps {what} there; choose another --output")


def _span(numbers: list[int]) -> str:
    if not numbers:
        return "no versions yet: train a model first"
    if len(numbers) == 1:
        return f"version {numbers[0]}"
    return f"versions {numbers[0]} to {numbers[-1]}"


class Registry:
    """The registry of one artifacts folder; opens its file per call, so one instance is safe to share."""

    def __init__(self, artifacts_dir: storage.Location):
        self._path = storage.join(storage.at(artifacts_dir), REGISTRY_FILE)
        self._file = RegistryFile(self._path)
        self._folder = storage.resolve(artifacts_dir)

    def _select_version(self, conn: sqlite3.Connection, where: str, value: object) -> Version | None:
        row = conn.execute(f"SELECT * FROM versions WHERE {where} = ?", (value,)).fetchone()
        return None if row is None else _version(row, _aliases_by_version(conn), self._folder)

    def register(
        self,
        checkpoint: str,
        fingerprint: str,
        *,
        config: dict,
        metrics: dict,
        run_date: str | None = None,
        window: dict | None = None,
        flow_run_id: str | None = None,
    ) -> Version:
        """Add a model as the next version; a fingerprint already registered returns its version unchanged.

        `checkpoint` is a location, or a name relative to the artifacts folder; either way a checkpoint in
        that folder is recorded by its name there, so the folder can move.
        """

        def add(conn: sqlite3.Connection) -> Version:
            existing = self._select_version(conn, "fingerprint", fingerprint)
            if existing is not None and not storage.exists(existing.checkpoint) and storage.exists(checkpoint):
                # Its very weights, written again elsewhere (a moved folder retrains under another name).
                stored = _stored(self._folder, str(checkpoint))
                conn.execute("UPDATE versions SET checkpoint = ? WHERE version = ?", (stored, existing.version))
                return self._select_version(conn, "fingerprint", fingerprint)
            if existing is not None and existing.pruned and storage.exists(existing.checkpoint):
                # Its date was run again after retention: the very weights are back.
                conn.execute("UPDATE versions SET pruned = NULL WHERE version = ?", (existing.version,))
                return self._select_version(conn, "fingerprint", fingerprint)
            if existing is not None:
                return existing
            conn.execute(
                "INSERT INTO versions (checkpoint, fingerprint, run_date, date_window, config, metrics, flow_run_id,"
                " created) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    _stored(self._folder, str(checkpoint)),
                    fingerprint,
                    run_date,
                    None if window is None else json.dumps(window, sort_keys=True),
                    json.dumps(config, sort_keys=True),
                    json.dumps(metrics, sort_keys=True),
                    flow_run_id,
                    _now(),
                ),
            )
            return self._select_version(conn, "fingerprint", fingerprint)

        return self._file.write(add)

    def mark_pruned(self, versions: Iterable[int]) -> None:
        """Record that retention deleted these versions' checkpoints; their rows and history stay."""
        numbers = [(_now(), number) for number in versions]
        if numbers:
            self._file.write(lambda conn: conn.executemany("UPDATE versions SET pruned = ? WHERE version = ?", numbers))

    def versions(self) -> list[Version]:
        """Every registered version, oldest first; [] when there is no registry file."""
        with self._file.read() as conn:
            if conn is None:
                return []
            aliases = _aliases_by_version(conn)
            rows = conn.execute("SELECT * FROM versions ORDER BY version")
            return [_version(row, aliases, self._folder) for row in rows]

    def get(self, version: int) -> Version:
        """One version by number; InputError when it is not registered."""
        with self._file.read() as conn:
            found = None if conn is None else self._select_version(conn, "version", version)
        if found is None:
            raise InputError(f"no model version {version} in {self._path}")
        return found

    def find(self, fingerprint: str) -> Version | None:
        """The version registered with this checkpoint fingerprint, if any."""
        with self._file.read() as conn:
            return None if conn is None else self._select_version(conn, "fingerprint", fingerprint)

    def changed_at(self, checkpoint: storage.Location, fingerprint: str) -> Version | None:
        """The version registered at this location when the bytes there (`fingerprint`) are none of its own."""
        kept = self.at_checkpoint(checkpoint)
        return kept[-1] if kept and fingerprint not in {version.fingerprint for version in kept} else None

    def at_checkpoint(self, checkpoint: storage.Location) -> list[Version]:
        """The versions registered with this checkpoint location (one, unless its file was lost and retrained)."""
        return [v for v in self.versions() if v.checkpoint == str(checkpoint)]

    def alias(self, name: str = "champion") -> Version | None:
        """The version an alias points at, or None when the alias was never set."""
        with self._file.read() as conn:
            if conn is None:
                return None
            target = _alias_target(conn, name)
            return None if target is None else self._select_version(conn, "version", target)

    def set_alias(
        self,
        version: int,
        reason: str,
        *,
        flow_run_id: str | None = None,
        name: str = "champion",
        expected: int | None | object = ANY,
    ) -> AliasChange | None:
        """Point an alias at a version and record why; None (and no change) when it already points there.

        With `expected` (a version number, or None for "not set yet") this is a compare-and-set: the alias
        moves only if it points at `expected` now, and None is returned otherwise.
        """
        if not storage.exists(self._path):  # fail before the write below would create an empty registry
            raise InputError(f"no model version {version} in {self._path}")

        def move(conn: sqlite3.Connection) -> AliasChange | None:
            found = self._select_version(conn, "version", version)
            if found is None:
                raise InputError(f"no model version {version} in {self._path}")
            _refuse_pruned(found, f"point '{name}' at")
            current = _alias_target(conn, name)
            if (expected is not ANY and current != expected) or current == version:
                return None
            return _move_alias(conn, name, version, current, reason, flow_run_id)

        return self._file.write(move)

    def history(self, name: str = "champion") -> list[AliasChange]:
        """Every move of an alias, oldest first."""
        with self._file.read() as conn:
            if conn is None:
                return []
            rows = conn.execute("SELECT * FROM alias_history WHERE alias = ? ORDER BY id", (name,))
            return [_change(row) for row in rows]

    def lineage(self, name: str = "champion") -> list[int]:
        """The versions an alias stood at, oldest first, rollbacks taken out: a rollback goes to the one before last."""
        with self._file.read() as conn:
            return [] if conn is None else _lineage(conn, name)

    def rolled_back(self, name: str = "champion") -> set[int]:
        """The versions the alias was rolled back from and not promoted to again since."""
        found: set[int] = set()
        for change in self.history(name):
            if change.rollback:
                found.add(change.previous)
            else:
                found.discard(change.version)
        return found

    def rollback(
        self, reason: str = "rolled back", *, flow_run_id: str | None = None, name: str = "champion"
    ) -> AliasChange:
        """Point an alias back one step along its lineage, and record that move.

        The lineage is the alias history with every rollback taken out, so each rollback goes one
        version further back (a second one does not undo the first). A version whose checkpoint
        retention deleted is refused: the alias would point at weights that are gone.
        """
        nothing_earlier = InputError(f"{self._path}: '{name}' has no earlier {name} to roll back to")
        if not storage.exists(self._path):
            raise nothing_earlier

        def back(conn: sqlite3.Connection) -> AliasChange:
            lineage = _lineage(conn, name)
            if len(lineage) < 2:
                raise nothing_earlier
            _refuse_pruned(self._select_version(conn, "version", lineage[-2]), f"roll '{name}' back to")
            return _move_alias(conn, name, lineage[-2], lineage[-1], reason, flow_run_id, rollback=True)

        return self._file.write(back)

    def resolve(self, reference: str) -> Version:
        """A version by alias (`champion`) or by number ("3"); InputError saying what exists otherwise."""
        reference = reference.strip()
        with self._file.read() as conn:
            if conn is None:
                numbers, names = [], []
            else:
                numbers = [row[0] for row in conn.execute("SELECT version FROM versions ORDER BY version")]
                names = [row[0] for row in conn.execute("SELECT name FROM aliases ORDER BY name")]
            if reference.isdecimal() and int(reference) in numbers:
                return self._select_version(conn, "version", int(reference))
            if reference in names:
                return self._select_version(conn, "version", _alias_target(conn, reference))
        if reference.isdecimal():
            raise InputError(f"no model version {int(reference)} in {self._path}: it holds {_span(numbers)}")
        if not numbers:
            raise InputError(f"no alias '{reference}' yet: train a model first")
        aliases = f"aliases {', '.join(names)}" if names else "no aliases yet"
        raise InputError(f"no alias '{reference}' in {self._path}: it holds {_span(numbers)} and {aliases}")

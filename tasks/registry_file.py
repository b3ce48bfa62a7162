"""The registry's file: one SQLite database, local or an object, changed in transactions and read in snapshots.

Each change is one `BEGIN IMMEDIATE` transaction, so writers queue on SQLite's lock (up to a minute)
instead of reading a value another writer is about to change. On object storage the file is an
object: a change is made to a downloaded copy and written back with a conditional PUT, and a writer
that lost the race to another redoes its change on the new copy.
"""

import sqlite3
import tempfile
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import TypeVar

from featuresum.tasks import storage
from featuresum.tasks.errors import InputError

T = TypeVar("T")

REGISTRY_FILE = "registry.sqlite"
# Stamped in the file's header so a SQLite file of another program is refused rather than written to.
APPLICATION_ID = 0x46535247  # "FSRG"
SCHEMA_VERSION = 1
LOCK_TIMEOUT_SECONDS = 60
SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    version INTEGER PRIMARY KEY,
    checkpoint TEXT NOT NULL,
    fingerprint TEXT NOT NULL UNIQUE,
    run_date TEXT,
    date_window TEXT,
    config TEXT NOT NULL,
    metrics TEXT NOT NULL,
    flow_run_id TEXT,
    created TEXT NOT NULL,
    pruned TEXT
);
CREATE TABLE IF NOT EXISTS aliases (
    name TEXT PRIMARY KEY,
    version INTEGER NOT NULL REFERENCES versions (version)
);
CREATE TABLE IF NOT EXISTS alias_history (
    id INTEGER PRIMARY KEY,
    alias TEXT NOT NULL,
    version INTEGER NOT NULL REFERENCES versions (version),
    previous INTEGER REFERENCES versions (version),
    reason TEXT NOT NULL,
    flow_run_id TEXT,
    changed TEXT NOT NULL,
    rollback INTEGER
);
"""
# Columns added since schema 1, nullable: a file written before them gets them on its next write (an ALTER),
# and reads of a file without them see NULL, so older featuresum and older files keep working together.
ADDED_COLUMNS = {"versions": {"pruned": "TEXT"}, "alias_history": {"rollback": "INTEGER"}}
# SQLite's answers for a file that is not a database, or one whose pages are damaged.
UNREADABLE_ERRORS = {sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_CORRUPT}


def _add_columns(conn: sqlite3.Connection) -> None:
    """Give a file written before them the columns added since (ADDED_COLUMNS)."""
    for table, columns in ADDED_COLUMNS.items():
        present = {row["name"] for row in conn.execute(f"PRAGMA table_info({table})")}
        for name, kind in columns.items():
            if name not in present:
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")


class RegistryFile:
    """The database at `path` (a local path or an `s3://` URI), opened per call."""

    def __init__(self, path: storage.Location):
        self.path = path

    @contextmanager
    def _connection(self, database: Path) -> Iterator[sqlite3.Connection]:
        try:
            with closing(sqlite3.connect(database, timeout=LOCK_TIMEOUT_SECONDS, isolation_level=None)) as conn:
                conn.row_factory = sqlite3.Row
                yield conn
        except sqlite3.DatabaseError as exc:
            if exc.sqlite_errorcode in UNREADABLE_ERRORS:
                raise InputError(f"{self.path}: not a featuresum registry ({exc})") from exc
            raise

    def _has_schema(self, conn: sqlite3.Connection) -> bool:
        """Whether the file holds our tables; False for a blank database; InputError for another program's."""
        application_id = conn.execute("PRAGMA application_id").fetchone()[0]
        if application_id == APPLICATION_ID:
            schema = conn.execute("PRAGMA user_version").fetchone()[0]
            if schema > SCHEMA_VERSION:
                raise InputError(
                    f"{self.path}: not a featuresum registry (schema {schema} is newer than this featuresum's "
                    f"{SCHEMA_VERSION}: upgrade featuresum)"
                )
            return True
        tables = [row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        if application_id != 0 or tables:
            found = f"tables {', '.join(tables)}" if tables else "no tables"
            raise InputError(f"{self.path}: not a featuresum registry (application id {application_id:#x}, {found})")
        return False

    def write(self, change: Callable[[sqlite3.Connection], T]) -> T:
        """Make a change in one write transaction and return what `change` returns.

        On object storage `change` runs on a downloaded copy, and again on a fresh copy whenever
        another writer changed the registry first (storage.update's conditional write).
        """
        if not storage.is_remote(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._transaction(self.path) as conn:
                return change(conn)
        results: list[T] = []

        def on_copy(content: bytes | None) -> bytes:
            with tempfile.TemporaryDirectory() as folder:
                database = Path(folder) / REGISTRY_FILE
                database.write_bytes(content or b"")
                with self._transaction(database) as conn:
                    results.append(change(conn))
                return database.read_bytes()

        storage.update(self.path, on_copy)
        return results[-1]

    @contextmanager
    def _transaction(self, database: Path) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction: the write lock is taken before the first read, so no read goes stale."""
        with self._connection(database) as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                if not self._has_schema(conn):
                    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                # executescript would commit our transaction first; the statements run one by one instead.
                for statement in SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                _add_columns(conn)
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection | None]:
        """One read transaction (a consistent view), or None when there is nothing yet; never creates the file."""
        if not storage.is_remote(self.path):
            if not self.path.exists():
                yield None
                return
            with self._snapshot(self.path) as conn:
                yield conn
            return
        try:
            content = storage.read_bytes(self.path)
        except FileNotFoundError:
            yield None
            return
        with tempfile.TemporaryDirectory() as folder:
            database = Path(folder) / REGISTRY_FILE
            database.write_bytes(content)
            with self._snapshot(database) as conn:
                yield conn

    @contextmanager
    def _snapshot(self, database: Path) -> Iterator[sqlite3.Connection | None]:
        with self._connection(database) as conn:
            conn.execute("BEGIN")
            try:
                yield conn if self._has_schema(conn) else None
            finally:
                conn.execute("ROLLBACK")

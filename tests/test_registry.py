"""The model registry: numbered versions, aliases with a history, compare-and-set, rollback, concurrent writers."""

import json
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from itertools import pairwise

import pytest

from featuresum.tasks.errors import InputError
from featuresum.tasks.registry import REGISTRY_FILE, AliasChange, Registry

WINDOW = {"from": "2026-11-01", "to": "2026-11-28"}


def register(registry, n, **kwargs):
    return registry.register(
        f"model-{n}.pt", f"fp-{n}", config={"seed": n}, metrics={"val_accuracy": 0.9 + n / 100}, **kwargs
    )


def recent(timestamp):
    """An ISO 8601 UTC time with microseconds, taken within the last minute."""
    parsed = datetime.fromisoformat(timestamp)
    assert timestamp == parsed.isoformat(timespec="microseconds") and parsed.utcoffset() == timedelta(0)
    return timedelta(0) <= datetime.now(UTC) - parsed < timedelta(minutes=1)


def test_register_records_everything_and_a_known_fingerprint_returns_its_version_unchanged(tmp_path):
    registry = Registry(tmp_path / "artifacts")
    first = register(registry, 1, run_date="2026-11-28", window=WINDOW, flow_run_id="run-a")
    assert (tmp_path / "artifacts" / REGISTRY_FILE).is_file()
    assert first.version == 1 and first.fingerprint == "fp-1"
    assert first.checkpoint == str(tmp_path / "artifacts" / "model-1.pt")  # relative to the registry's folder
    assert (first.run_date, first.window, first.flow_run_id) == ("2026-11-28", WINDOW, "run-a")
    assert first.config == {"seed": 1} and first.metrics == {"val_accuracy": 0.91} and first.aliases == ()
    assert recent(first.created)

    again = registry.register("elsewhere.pt", "fp-1", config={"seed": 9}, metrics={}, flow_run_id="run-b")
    assert again == first
    assert registry.versions() == [first]
    assert json.loads(json.dumps(first.as_dict())) == {
        "version": 1,
        "checkpoint": first.checkpoint,
        "fingerprint": "fp-1",
        "run_date": "2026-11-28",
        "window": WINDOW,
        "config": {"seed": 1},
        "metrics": {"val_accuracy": 0.91},
        "flow_run_id": "run-a",
        "created": first.created,
        "aliases": [],
        "pruned": None,
    }


def test_versions_are_numbered_in_order_and_found_by_number_fingerprint_and_reference(tmp_path):
    registry = Registry(tmp_path)
    registered = [register(registry, n) for n in (1, 2, 3)]
    assert [v.version for v in registered] == [1, 2, 3]
    assert [v.fingerprint for v in registry.versions()] == ["fp-1", "fp-2", "fp-3"]
    assert registry.get(2) == registered[1]
    assert registry.find("fp-3") == registered[2] and registry.find("fp-9") is None
    assert registry.resolve("2") == registered[1]

    registry.set_alias(3, "best so far")
    champion = registry.resolve("champion")
    assert champion.version == 3 and champion.aliases == ("champion",)
    assert registry.alias() == champion and registry.get(3) == champion
    assert registry.alias("staging") is None


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        ("9", "no model version 9 in {path}: it holds versions 1 to 2"),
        ("staging", "no alias 'staging' in {path}: it holds versions 1 to 2 and no aliases yet"),
        ("-1", "no alias '-1' in {path}: it holds versions 1 to 2 and no aliases yet"),
    ],
)
def test_a_reference_to_nothing_says_in_one_line_what_exists(tmp_path, reference, message):
    registry = Registry(tmp_path)
    register(registry, 1)
    register(registry, 2)
    with pytest.raises(InputError) as error:
        registry.resolve(reference)
    assert str(error.value) == message.format(path=tmp_path / REGISTRY_FILE)
    with pytest.raises(InputError, match=r"^no model version 7 in .*registry\.sqlite$"):
        registry.get(7)


def test_an_empty_registry_says_to_train_a_model_first_and_reading_it_creates_nothing(tmp_path):
    registry = Registry(tmp_path / "artifacts")
    with pytest.raises(InputError, match=r"^no alias 'champion' yet: train a model first$"):
        registry.resolve("champion")
    with pytest.raises(InputError, match=r"no model version 1 in .*: it holds no versions yet: train a model first$"):
        registry.resolve("1")
    with pytest.raises(InputError, match="no model version 1"):
        registry.get(1)
    assert registry.versions() == [] and registry.history() == []
    assert registry.find("fp-1") is None and registry.alias() is None
    assert not (tmp_path / "artifacts").exists()


def test_set_alias_moves_the_alias_and_records_reason_previous_run_and_time(tmp_path):
    registry = Registry(tmp_path)
    register(registry, 1)
    register(registry, 2)
    first = registry.set_alias(1, "first model", flow_run_id="run-a")
    second = registry.set_alias(2, "more accurate", flow_run_id="run-b")
    assert (first.alias, first.version, first.previous, first.reason, first.flow_run_id) == (
        "champion",
        1,
        None,
        "first model",
        "run-a",
    )
    assert (second.version, second.previous, second.reason, second.flow_run_id) == (2, 1, "more accurate", "run-b")
    assert recent(first.changed) and recent(second.changed)
    assert registry.history() == [first, second]
    assert registry.alias().version == 2 and registry.get(1).aliases == ()
    assert second.as_dict() == {
        "alias": "champion",
        "version": 2,
        "previous": 1,
        "reason": "more accurate",
        "flow_run_id": "run-b",
        "changed": second.changed,
        "rollback": False,
    }

    staging = registry.set_alias(1, "try it", name="staging")
    assert staging.alias == "staging" and registry.history("staging") == [staging]
    assert registry.history() == [first, second]
    assert registry.get(1).aliases == ("staging",)
    assert registry.resolve("staging").version == 1


def test_setting_an_alias_to_a_missing_version_fails_and_changes_nothing(tmp_path):
    registry = Registry(tmp_path)
    register(registry, 1)
    registry.set_alias(1, "first")
    with pytest.raises(InputError, match=r"^no model version 5 in "):
        registry.set_alias(5, "typo")
    assert registry.alias().version == 1 and len(registry.history()) == 1


def test_setting_an_alias_to_the_version_it_points_at_records_nothing(tmp_path):
    registry = Registry(tmp_path)
    register(registry, 1)
    change = registry.set_alias(1, "first")
    assert registry.set_alias(1, "again") is None
    assert registry.set_alias(1, "again", expected=1) is None
    assert registry.history() == [change]


def test_compare_and_set_moves_the_alias_only_from_the_expected_version(tmp_path):
    registry = Registry(tmp_path)
    for n in (1, 2, 3):
        register(registry, n)
    assert registry.set_alias(1, "stale: expects 2", expected=2) is None
    assert registry.alias() is None and registry.history() == []

    first = registry.set_alias(1, "first", expected=None)
    assert first.version == 1
    assert registry.set_alias(2, "stale: expects none", expected=None) is None
    assert registry.set_alias(2, "stale: expects 3", expected=3) is None
    assert registry.alias().version == 1 and registry.history() == [first]

    second = registry.set_alias(2, "better", expected=1)
    assert (second.version, second.previous) == (2, 1)
    assert registry.history() == [first, second]


def test_rollback_moves_the_alias_back_and_records_the_move(tmp_path):
    registry = Registry(tmp_path)
    register(registry, 1)
    register(registry, 2)
    first = registry.set_alias(1, "first")
    second = registry.set_alias(2, "second")
    back = registry.rollback("version 2 scores badly", flow_run_id="run-c")
    assert isinstance(back, AliasChange)
    assert (back.alias, back.version, back.previous, back.reason, back.flow_run_id) == (
        "champion",
        1,
        2,
        "version 2 scores badly",
        "run-c",
    )
    assert registry.alias().version == 1
    assert registry.history() == [first, second, back]
    assert registry.get(2).aliases == ()


def test_rollback_without_an_earlier_version_fails_in_one_line(tmp_path):
    registry = Registry(tmp_path / "artifacts")
    with pytest.raises(InputError, match=r"'champion' has no earlier champion to roll back to$"):
        registry.rollback()
    with pytest.raises(InputError, match=r"^no model version 1 in "):
        registry.set_alias(1, "nothing registered")
    assert not (tmp_path / "artifacts").exists()

    register(registry, 1)
    registry.set_alias(1, "first")
    with pytest.raises(InputError, match=r"'champion' has no earlier champion to roll back to$"):
        registry.rollback()
    assert registry.alias().version == 1 and len(registry.history()) == 1


def test_a_file_that_is_not_a_registry_is_an_input_error(tmp_path):
    path = tmp_path / REGISTRY_FILE
    path.write_text("not a database, just some text that happens to be here\n" * 4)
    registry = Registry(tmp_path)
    for call in (registry.versions, registry.history, lambda: register(registry, 1), lambda: registry.resolve("1")):
        with pytest.raises(InputError) as error:
            call()
        assert str(error.value) == f"{path}: not a featuresum registry (file is not a database)"


def test_a_damaged_registry_or_another_programs_database_is_an_input_error(tmp_path):
    registry = Registry(tmp_path / "damaged")
    for n in (1, 2, 3):
        register(registry, n)
    path = tmp_path / "damaged" / REGISTRY_FILE
    content = path.read_bytes()
    path.write_bytes(content[:100] + b"\xff" * (len(content) - 100))
    with pytest.raises(InputError, match=r"registry\.sqlite: not a featuresum registry \(.*malformed\)$"):
        registry.versions()

    foreign = tmp_path / "foreign" / REGISTRY_FILE
    foreign.parent.mkdir()
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE notes (text TEXT)")
    conn.close()
    with pytest.raises(InputError, match=r"registry\.sqlite: not a featuresum registry \(application id 0x0, tables"):
        register(Registry(foreign.parent), 1)
    with sqlite3.connect(foreign) as conn:
        assert [row[0] for row in conn.execute("SELECT name FROM sqlite_master")] == ["notes"]
    conn.close()


# Each worker says it is ready, then waits for the go file, so all of them register and promote at once.
WORKER = """
import json, pathlib, sys, time
from featuresum.tasks.registry import Registry

folder, n = pathlib.Path(sys.argv[1]), int(sys.argv[2])
(folder / f"ready-{n}").touch()
deadline = time.monotonic() + 30
while not (folder / "go").exists() and time.monotonic() < deadline:
    time.sleep(0.001)
registry = Registry(folder)
mine = registry.register(f"model-{n}.pt", f"fp-{n}", config={"worker": n}, metrics={}, flow_run_id=f"run-{n}")
champion = registry.alias()
expected = None if champion is None else champion.version
change = registry.set_alias(mine.version, f"worker {n}", flow_run_id=f"run-{n}", expected=expected)
print(json.dumps({"version": mine.version, "expected": expected, "promoted": change is not None}))
"""


def test_concurrent_processes_get_distinct_versions_and_a_consistent_champion_history(tmp_path):
    workers = 6
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(tmp_path), str(n)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(workers)
    ]
    deadline = time.monotonic() + 30
    while len(list(tmp_path.glob("ready-*"))) < workers and time.monotonic() < deadline:
        time.sleep(0.001)
    (tmp_path / "go").touch()
    results = []
    for process in processes:
        out, err = process.communicate(timeout=60)
        assert process.returncode == 0, err
        results.append(json.loads(out))

    registry = Registry(tmp_path)
    versions = registry.versions()
    assert sorted(r["version"] for r in results) == [v.version for v in versions] == list(range(1, workers + 1))
    assert sorted(v.fingerprint for v in versions) == sorted(f"fp-{n}" for n in range(workers))

    history = registry.history()
    promoted = [r["version"] for r in results if r["promoted"]]
    assert promoted and sorted(change.version for change in history) == sorted(promoted)
    assert history[0].previous is None
    for earlier, later in pairwise(history):
        assert later.previous == earlier.version
    # A promotion that happened moved the alias from exactly the version its worker had read.
    assert [change.previous for change in history] == [
        next(r["expected"] for r in results if r["version"] == change.version) for change in history
    ]
    assert registry.alias().version == history[-1].version


def test_concurrent_registrations_of_one_fingerprint_make_one_version(tmp_path):
    code = (
        "import sys; from featuresum.tasks.registry import Registry; "
        "print(Registry(sys.argv[1]).register('model.pt', 'same', config={}, metrics={}).version)"
    )
    processes = [
        subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    assert [process.communicate(timeout=60)[0].strip() for process in processes] == ["1"] * 4
    assert [v.version for v in Registry(tmp_path).versions()] == [1]


def test_a_registry_moved_with_its_folder_names_the_checkpoints_in_the_new_place(tmp_path):
    old, new = tmp_path / "old", tmp_path / "moved" / "artifacts"
    registry = Registry(old)
    inside = registry.register(str(old / "model-1.pt"), "fp-1", config={}, metrics={})
    outside = registry.register(str(tmp_path / "kept" / "model-2.pt"), "fp-2", config={}, metrics={})
    assert (inside.checkpoint, outside.checkpoint) == (str(old / "model-1.pt"), str(tmp_path / "kept" / "model-2.pt"))
    new.parent.mkdir()
    old.rename(new)
    moved = Registry(new)
    assert [v.checkpoint for v in moved.versions()] == [str(new / "model-1.pt"), str(tmp_path / "kept" / "model-2.pt")]


def test_the_same_weights_written_again_elsewhere_restore_a_version_whose_file_is_gone(tmp_path):
    registry = Registry(tmp_path)
    (tmp_path / "model-a.pt").write_bytes(b"weights")
    version = registry.register(str(tmp_path / "model-a.pt"), "fp", config={}, metrics={})
    (tmp_path / "model-b.pt").write_bytes(b"weights")
    assert registry.register(str(tmp_path / "model-b.pt"), "fp", config={}, metrics={}) == version  # file still there
    (tmp_path / "model-a.pt").unlink()
    restored = registry.register(str(tmp_path / "model-b.pt"), "fp", config={}, metrics={})
    assert restored.version == version.version and restored.checkpoint == str(tmp_path / "model-b.pt")
    assert registry.get(version.version).checkpoint == str(tmp_path / "model-b.pt")


def test_each_rollback_goes_one_version_further_back(tmp_path):
    registry = Registry(tmp_path)
    for number in (1, 2, 3):
        register(registry, number)
        registry.set_alias(number, f"version {number}")
    assert [registry.rollback(f"back {n}").version for n in (1, 2)] == [2, 1]
    with pytest.raises(InputError, match=r"no earlier champion to roll back to$"):
        registry.rollback()
    # A promotion after rollbacks starts a new step of the lineage: rolling it back returns to where it came from.
    registry.set_alias(3, "version 3 again")
    assert registry.rollback().version == 1
    assert [change.version for change in registry.history()] == [1, 2, 3, 2, 1, 3, 1]


def test_a_promotion_back_to_an_earlier_version_is_a_step_of_its_own_not_a_rollback(tmp_path):
    registry = Registry(tmp_path)
    for number in (1, 2):
        register(registry, number)
    for number in (1, 2, 1):
        registry.set_alias(number, f"promoted {number} by hand")
    assert registry.lineage() == [1, 2, 1]
    assert registry.rollback().version == 2
    assert registry.lineage() == [1, 2]


def test_an_alias_never_moves_onto_a_pruned_version(tmp_path):
    registry = Registry(tmp_path)
    for number in (1, 2, 3):
        register(registry, number, run_date=f"2026-06-0{number}")
        registry.set_alias(number, f"version {number}")
    registry.mark_pruned([2])
    with pytest.raises(InputError, match=r"cannot roll 'champion' back to model version 2: `featuresum gc` pruned"):
        registry.rollback()
    with pytest.raises(InputError, match=r"point 'champion' at model version 2: `featuresum gc` pruned it on "):
        registry.set_alias(2, "by hand")
    assert registry.alias().version == 3 and len(registry.history()) == 3


def test_a_registry_from_before_rollbacks_were_marked_keeps_its_lineage(tmp_path):
    registry = Registry(tmp_path)
    for number in (1, 2, 3):
        register(registry, number)
        registry.set_alias(number, f"version {number}")
    registry.rollback()
    with sqlite3.connect(tmp_path / REGISTRY_FILE) as conn:
        conn.execute("ALTER TABLE alias_history DROP COLUMN rollback")
    assert registry.lineage() == [1, 2]  # the move 3 -> 2 read as the rollback it was
    assert registry.rollback().version == 1
    assert Registry(tmp_path).lineage() == [1]

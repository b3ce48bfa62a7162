"""`featuresum models`: list, show, promote and roll back registered versions, without a Prefect server."""

import json

import pytest
from test_cli_errors import featuresum, one_error_line

from featuresum.tasks.registry import Registry

FIELDS = {"version", "checkpoint", "run_date", "val_accuracy", "aliases", "created"}


@pytest.fixture
def registry(tmp_path, checkpoint):
    registry = Registry(tmp_path / "artifacts")
    for number, accuracy in ((1, 0.71), (2, 0.74)):
        registry.register(
            str(checkpoint), f"fingerprint-{number}", config={"epochs": number}, metrics={"val_accuracy": accuracy}
        )
    registry.set_alias(1, "first model: there was no champion")
    return registry


@pytest.fixture
def models(capsys, registry, tmp_path):
    """`featuresum models ...` on the registry of the fixture above."""
    return lambda *args: featuresum(capsys, "models", *args, "--artifacts-dir", str(tmp_path / "artifacts"))


def test_list_prints_every_version_with_its_accuracy_and_aliases(models, registry):
    code, out, _ = models("list", "--json")
    assert code == 0
    versions = json.loads(out)
    assert [v["version"] for v in versions] == [1, 2]
    assert [v["aliases"] for v in versions] == [["champion"], []]
    assert [v["metrics"]["val_accuracy"] for v in versions] == [0.71, 0.74]

    code, out, _ = models("list")
    assert code == 0
    assert "0.7100" in out and "champion" in out


def test_list_json_has_the_documented_fields(models, registry):
    _, out, _ = models("list", "--json")
    for version in json.loads(out):
        assert FIELDS <= set(version)
        assert version["val_accuracy"] == version["metrics"]["val_accuracy"]


def test_promote_then_rollback_keeps_the_history(models, registry):
    code, out, _ = models("promote", "2", "--reason", "better on last week's rows")
    assert code == 0 and "1 -> 2" in out
    assert registry.alias().version == 2
    code, out, _ = models("rollback")
    assert code == 0 and "2 -> 1" in out
    assert registry.alias().version == 1
    code, out, _ = models("show", "champion")
    shown = json.loads(out)
    assert shown["version"] == 1
    assert [(c["version"], c["reason"]) for c in shown["champion_history"]] == [
        (1, "first model: there was no champion"),
        (2, "better on last week's rows"),
        (1, "rolled back by hand"),
    ]


def test_rollback_walks_back_the_history_and_prints_json(models, registry):
    for number in (2, 3):
        registry.register(str(registry.get(1).checkpoint), f"fingerprint-{number}-more", config={}, metrics={})
    models("promote", "2")
    models("promote", "3")
    code, out, _ = models("rollback", "--json")
    assert code == 0 and (json.loads(out)["previous"], json.loads(out)["version"]) == (3, 2)
    assert json.loads(out)["moved"] is True and json.loads(out)["rollback"] is True
    code, out, _ = models("promote", "2", "--json")
    assert code == 0 and json.loads(out) == {"moved": False, "version": 2, "event": None, "event_sent_to": None}
    code, out, _ = models("rollback")
    assert code == 0 and "2 -> 1" in out
    assert registry.alias().version == 1


def test_show_takes_json_and_prints_one_line(models, registry):
    code, out, _ = models("show", "champion", "--json")
    assert code == 0 and len(out.strip().splitlines()) == 1
    assert json.loads(out)["version"] == 1


@pytest.mark.parametrize(("args", "words"), [(["show", "7"], "7"), (["show", "best"], "best"), (["promote", "9"], "9")])
def test_unknown_versions_are_one_line_and_exit_code_2(models, registry, args, words):
    code, _, lines = models(*args)
    one_error_line(code, lines, 2, words)


def test_an_empty_registry_says_how_to_fill_it(capsys, tmp_path):
    code, out, _ = featuresum(capsys, "models", "list", "--artifacts-dir", str(tmp_path / "nothing"))
    assert code == 0 and "featuresum run" in out
    assert not (tmp_path / "nothing").exists()

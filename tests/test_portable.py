"""Models in the original script's format: `featuresum models import` and `export` round trips with its SimpleNN."""

import ast
import json
import os
import shutil
from datetime import date
from pathlib import Path

import pandas as pd
import pytest
import torch
from test_cli_errors import featuresum, one_error_line

from featuresum.tasks import data, storage
from featuresum.tasks.checkpoint import load_checkpoint, save_checkpoint
from featuresum.tasks.notebook import load_model
from featuresum.tasks.registry import Registry

ORIGINAL_SCRIPT = Path(os.environ.get("FEATURESUM_ORIGINAL_SCRIPT", "/work/shared/seed/original_script.py"))
# SimpleNN as the original script defines it, for machines without the script; a test checks the two agree.
SIMPLE_NN_SOURCE = """
import torch
import torch.nn as nn


class SimpleNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(784, 128)  # 784 -> 128
        self.fc2 = nn.Linear(128, 10)  # 128 -> 10 classes

    def forward(self, x):
        x = torch.relu(self.fc1(x))
        return self.fc2(x)  # logits, no activation
"""
HOLDOUT_ROWS = 3000


def simple_nn_nodes(source: str) -> list[ast.stmt]:
    """The script's torch imports and its SimpleNN class, without the rest (the script trains when run)."""
    nodes = []
    for node in ast.parse(source).body:
        if isinstance(node, ast.Import) and all(alias.name.split(".")[0] == "torch" for alias in node.names):
            nodes.append(node)
        elif isinstance(node, ast.ClassDef) and node.name == "SimpleNN":
            nodes.append(node)
    return nodes


@pytest.fixture(scope="module")
def simple_nn() -> type:
    """The class SimpleNN of the original script (of the copy above where the script is absent)."""
    found = ORIGINAL_SCRIPT.is_file()
    source, name = (ORIGINAL_SCRIPT.read_text(), str(ORIGINAL_SCRIPT)) if found else (SIMPLE_NN_SOURCE, "<SimpleNN>")
    namespace: dict = {}
    exec(compile(ast.Module(body=simple_nn_nodes(source), type_ignores=[]), name, "exec"), namespace)
    return namespace["SimpleNN"]


@pytest.fixture(scope="module")
def script_model(simple_nn):
    """A SimpleNN trained for a few steps the script's way (Adam, cross-entropy), so it beats chance."""
    torch.manual_seed(0)
    model = simple_nn()
    shard = data.generate_shard(11, "train", 0, 2048)
    x, y = shard.features.T.contiguous(), shard.label
    optimizer = torch.optim.Adam(model.parameters(), lr=0.001)
    for step in range(30):
        batch = slice(64 * step % 2048, 64 * step % 2048 + 64)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
        optimizer.step()
    return model.eval()


@pytest.fixture
def model_pth(tmp_path, script_model):
    """The script's model file: torch.save(model.state_dict(), "model.pth")."""
    path = tmp_path / "model.pth"
    torch.save(script_model.state_dict(), path)
    return path


def holdout_rows(rows: int, day: date | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    shards = list(data.generate_dataset(0, "holdout", rows, day))
    return torch.cat([s.features.T for s in shards]).contiguous(), torch.cat([s.label for s in shards])


def import_model(capsys, path: Path, artifacts: Path, *extra: str) -> tuple[int, dict]:
    args = ["models", "import", str(path), "--artifacts-dir", str(artifacts), "--holdout-samples", str(HOLDOUT_ROWS)]
    code, out, err = featuresum(capsys, *args, "--json", *extra)
    assert code == 0, err
    return code, json.loads(out)


def test_the_fallback_copy_is_the_original_scripts_simple_nn():
    if not ORIGINAL_SCRIPT.is_file():
        if os.environ.get("FEATURESUM_REQUIRE_ALL") == "1":
            pytest.fail(f"the original script is not at {ORIGINAL_SCRIPT} (set FEATURESUM_ORIGINAL_SCRIPT)")
        pytest.skip(f"the original script is not at {ORIGINAL_SCRIPT} (set FEATURESUM_ORIGINAL_SCRIPT)")
    script = simple_nn_nodes(ORIGINAL_SCRIPT.read_text())
    copy = simple_nn_nodes(SIMPLE_NN_SOURCE)
    assert [ast.dump(node) for node in script if isinstance(node, ast.ClassDef)] == [
        ast.dump(node) for node in copy if isinstance(node, ast.ClassDef)
    ]


@pytest.mark.parametrize("day", [None, date(2026, 3, 1)])
def test_import_registers_the_script_model_with_its_holdout_accuracy(capsys, tmp_path, model_pth, script_model, day):
    artifacts = tmp_path / "artifacts"
    extra = ["--date", day.isoformat()] if day else []
    _, imported = import_model(capsys, model_pth, artifacts, *extra)

    x, y = holdout_rows(HOLDOUT_ROWS, day)
    with torch.no_grad():
        expected = (script_model(x).argmax(dim=1) == y).double().mean().item()
    assert imported["version"] == 1 and imported["already_registered"] is False
    assert imported["val_accuracy"] == pytest.approx(expected, abs=1e-12)
    assert imported["val_accuracy"] > 0.2  # a tenth is chance; a few steps of training beat it
    assert imported["metrics"] == {"val_accuracy": imported["val_accuracy"], "holdout_rows": HOLDOUT_ROWS}
    assert imported["config"]["imported_from"] == str(model_pth.resolve())
    assert imported["config"]["source_fingerprint"] == storage.fingerprint(model_pth)
    assert imported["config"].get("date") == (day.isoformat() if day else None)
    checkpoint = Path(imported["checkpoint"])
    assert checkpoint.parent == artifacts.resolve() and checkpoint.name.startswith("model-imported-")
    assert imported["fingerprint"] == storage.fingerprint(checkpoint)
    assert load_checkpoint(checkpoint)["train_config"] == {"imported_from": str(model_pth.resolve())}
    assert Registry(artifacts).alias() is None  # an import never becomes the champion by itself


def test_import_says_how_to_promote_the_new_version(capsys, tmp_path, model_pth):
    artifacts = tmp_path / "artifacts"
    code, out, _ = featuresum(capsys, "models", "import", str(model_pth), "--artifacts-dir", str(artifacts))
    assert code == 0
    assert "imported as version 1" in out and "featuresum models promote 1" in out
    assert Registry(artifacts).get(1).metrics["holdout_rows"] == 20_000


def test_imported_model_predicts_what_simple_nn_predicts(capsys, tmp_path, model_pth, script_model):
    artifacts = tmp_path / "artifacts"
    import_model(capsys, model_pth, artifacts)
    shard = data.generate_shard(5, "score", 0, 1000)
    frame = pd.DataFrame(shard.features.numpy().T, columns=list(storage.FEATURE_COLUMNS))

    model = load_model(1, artifacts_dir=artifacts)
    predictions = model.predict(frame)
    with torch.no_grad():
        probabilities = torch.softmax(script_model(shard.features.T.contiguous()), dim=1)
    assert model.version == 1 and model.metrics["holdout_rows"] == HOLDOUT_ROWS
    assert predictions["predicted_class"].tolist() == probabilities.argmax(dim=1).tolist()
    torch.testing.assert_close(torch.tensor(predictions["confidence"].to_numpy()), probabilities.max(dim=1).values)


def test_importing_the_same_file_again_returns_the_same_version(capsys, tmp_path, model_pth):
    artifacts = tmp_path / "artifacts"
    _, first = import_model(capsys, model_pth, artifacts)
    _, again = import_model(capsys, model_pth, artifacts)
    copy = shutil.copy(model_pth, tmp_path / "elsewhere.pth")
    _, copied = import_model(capsys, copy, artifacts)
    assert again["already_registered"] and copied["already_registered"]
    assert first["version"] == again["version"] == copied["version"] == 1
    assert first["fingerprint"] == again["fingerprint"] == copied["fingerprint"]
    assert [v.version for v in Registry(artifacts).versions()] == [1]

    # The wrapped checkpoint is the same bytes every time, so a deleted one is written again as it was.
    Path(first["checkpoint"]).unlink()
    _, restored = import_model(capsys, model_pth, artifacts)
    assert restored["version"] == 1
    assert storage.fingerprint(Path(first["checkpoint"])) == first["fingerprint"]


def test_another_model_is_another_version(capsys, tmp_path, model_pth, simple_nn):
    artifacts = tmp_path / "artifacts"
    import_model(capsys, model_pth, artifacts)
    torch.manual_seed(1)
    other = tmp_path / "other.pth"
    torch.save(simple_nn().state_dict(), other)
    _, imported = import_model(capsys, other, artifacts)
    assert imported["version"] == 2 and not imported["already_registered"]


@pytest.mark.parametrize("reference", ["1", "champion"])
def test_export_gives_the_script_a_state_dict_it_loads(capsys, tmp_path, model_pth, script_model, simple_nn, reference):
    artifacts = tmp_path / "artifacts"
    import_model(capsys, model_pth, artifacts)
    Registry(artifacts).set_alias(1, "test")
    output = tmp_path / "out" / "model.pth"
    code, out, _ = featuresum(
        capsys, "models", "export", reference, "--output", str(output), "--artifacts-dir", str(artifacts)
    )
    assert code == 0 and "version 1" in out

    exported = torch.load(output)  # as the script loads it (weights_only by default)
    assert list(exported) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert all(t.is_contiguous() and t.device.type == "cpu" for t in exported.values())
    model = simple_nn()
    model.load_state_dict(exported)
    x = torch.randn(64, 784)
    with torch.no_grad():
        assert torch.equal(model(x), script_model(x))


def test_a_trained_version_exports_too(capsys, tmp_path, checkpoint, simple_nn):
    artifacts = tmp_path / "artifacts"
    Registry(artifacts).register(str(checkpoint), storage.fingerprint(checkpoint), config={}, metrics={})
    output = tmp_path / "trained.pth"
    code, _, _ = featuresum(capsys, "models", "export", "1", "--output", str(output), "--artifacts-dir", str(artifacts))
    assert code == 0
    model = simple_nn()
    model.load_state_dict(torch.load(output))
    trained = load_model(checkpoint)
    x = torch.randn(64, 784)
    with torch.no_grad():
        assert torch.equal(model(x), trained.module(x))


def bad_file(path: Path, kind: str, simple_nn: type, checkpoint: Path) -> Path:
    torch.manual_seed(0)
    weights = simple_nn().state_dict()
    if kind == "garbage":
        path.write_bytes(os.urandom(4096))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        torch.save(weights, path)
        path.write_bytes(path.read_bytes()[:1000])
    elif kind == "wrong shape":
        torch.save({**weights, "fc1.weight": torch.zeros(64, 784)}, path)
    elif kind == "missing key":
        torch.save({k: v for k, v in weights.items() if k != "fc2.bias"}, path)
    elif kind == "extra key":
        torch.save({**weights, "fc3.weight": torch.zeros(1)}, path)
    elif kind == "integers":
        torch.save({**weights, "fc2.bias": torch.zeros(10, dtype=torch.int64)}, path)
    elif kind == "nan":
        torch.save({**weights, "fc2.bias": torch.full((10,), float("nan"))}, path)
    elif kind == "not a dict":
        torch.save([weights["fc1.weight"]], path)
    elif kind == "code":
        torch.save({"fc1.weight": pd.Timestamp(0)}, path)  # unpickling this runs pandas code
    elif kind == "featuresum checkpoint":
        shutil.copy(checkpoint, path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "missing":
        pass
    return path


@pytest.mark.parametrize(
    ("kind", "fragment"),
    [
        ("garbage", "not a PyTorch file"),
        ("empty", "not a PyTorch file"),
        ("truncated", "not a readable PyTorch file"),
        ("wrong shape", "fc1.weight has shape (64, 784), expected (128, 784)"),
        ("missing key", "missing fc2.bias"),
        ("extra key", "unexpected fc3.weight"),
        ("integers", "fc2.bias has dtype torch.int64"),
        ("nan", "fc2.bias holds NaN"),
        ("not a dict", "not a state_dict of tensors (found list)"),
        ("code", "refused"),
        ("featuresum checkpoint", "is a featuresum checkpoint"),
        ("directory", "is a directory"),
        ("missing", "no such file"),
    ],
)
def test_a_bad_file_is_refused_in_one_line(capsys, tmp_path, simple_nn, checkpoint, kind, fragment):
    path = bad_file(tmp_path / "model.pth", kind, simple_nn, checkpoint)
    artifacts = tmp_path / "artifacts"
    code, _, lines = featuresum(capsys, "models", "import", str(path), "--artifacts-dir", str(artifacts))
    one_error_line(code, lines, 2, str(path), fragment)
    assert Registry(artifacts).versions() == []


def test_drift_needs_a_date(capsys, tmp_path, model_pth):
    code, _, lines = featuresum(capsys, "models", "import", str(model_pth), "--drift", "0.1")
    one_error_line(code, lines, 2, "--date")


@pytest.mark.parametrize(
    ("reference", "output", "fragment"),
    [("7", "out.pth", "no model version 7"), ("1", ".", "is a directory"), ("best", "out.pth", "no alias 'best'")],
)
def test_export_errors_are_one_line(capsys, tmp_path, model_pth, reference, output, fragment):
    artifacts = tmp_path / "artifacts"
    import_model(capsys, model_pth, artifacts)
    code, _, lines = featuresum(
        capsys, "models", "export", reference, "--output", str(tmp_path / output), "--artifacts-dir", str(artifacts)
    )
    one_error_line(code, lines, 2, fragment)


def test_export_never_writes_over_what_featuresum_keeps_nor_exports_changed_weights(capsys, tmp_path, checkpoint):
    artifacts = tmp_path / "artifacts"
    kept = artifacts / "model-1.pt"
    kept.parent.mkdir()
    shutil.copy(checkpoint, kept)
    registry = Registry(artifacts)
    registry.register(str(kept), storage.fingerprint(kept), config={}, metrics={})
    folders = ["--artifacts-dir", str(artifacts)]
    for output in (artifacts / "registry.sqlite", artifacts / "monitoring.parquet", kept):
        before = output.read_bytes() if output.exists() else None
        code, _, lines = featuresum(capsys, "models", "export", "1", "--output", str(output), *folders)
        one_error_line(code, lines, 2, "featuresum keeps")
        assert (output.read_bytes() if output.exists() else None) == before

    # Another project's checkpoint, by any name, is not overwritten either.
    neighbour = shutil.copy(checkpoint, tmp_path / "neighbour.pth")
    code, _, lines = featuresum(capsys, "models", "export", "1", "--output", str(neighbour), *folders)
    one_error_line(code, lines, 2, "is a featuresum checkpoint")
    assert Path(neighbour).read_bytes() == checkpoint.read_bytes()

    changed = load_checkpoint(kept)
    changed["model"] = {name: weights + 0.01 for name, weights in changed["model"].items()}
    save_checkpoint(kept, changed)
    code, _, lines = featuresum(capsys, "models", "export", "1", "--output", str(tmp_path / "out.pth"), *folders)
    one_error_line(code, lines, 1, "no longer holds the weights it was recorded with")
    assert not (tmp_path / "out.pth").exists()
    kept.write_bytes(b"not a checkpoint any more")  # scoring it is the machine's failure too, not a bad option
    for model in ("1", str(kept)):
        code, _, lines = featuresum(capsys, "score", "--model", model, "--samples", "5", *folders)
        one_error_line(code, lines, 1, "of model version 1 no longer holds its registered weights")

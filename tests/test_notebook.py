"""The notebook API: `from featuresum import load_model, registry`, scoring DataFrames as the pipeline does."""

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from featuresum.tasks import data, scoring, storage
from featuresum.tasks.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from featuresum.tasks.errors import EnvironmentFailure, InputError
from featuresum.tasks.notebook import REGISTRY_COLUMNS, load_model, registry
from featuresum.tasks.registry import Registry

CPU = torch.device("cpu")


def feature_frame(shard: data.Shard, **columns) -> pd.DataFrame:
    """A DataFrame of a generated shard's rows: one column per feature, plus `columns`."""
    features = pd.DataFrame(shard.features.numpy().T, columns=list(storage.FEATURE_COLUMNS))
    return pd.concat([pd.DataFrame(columns), features], axis=1)


@pytest.fixture(scope="module")
def shard():
    return data.generate_shard(7, "score", 0, 500)


@pytest.fixture
def artifacts(tmp_path, checkpoint):
    """A registry with two versions of the session's weights; version 2 (saved again) is the champion."""
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    copy = artifacts / "copy.pt"
    save_checkpoint(copy, {**load_checkpoint(checkpoint), "saved_again": True})
    registry = Registry(artifacts)
    registry.register(str(checkpoint), storage.fingerprint(checkpoint), config={}, metrics={"val_accuracy": 0.5})
    second = {"config": {"epochs": 2}, "metrics": {"val_accuracy": 0.75}, "run_date": "2026-11-28"}
    registry.register(str(copy), storage.fingerprint(copy), **second)
    registry.set_alias(2, "better")
    return artifacts


def test_the_package_exports_the_notebook_api_without_slowing_the_cli():
    code = (
        "import sys, featuresum.flows.cli; "
        "assert not {'torch', 'pandas'} & set(sys.modules), 'the CLI imported torch or pandas'; "
        "from featuresum import load_model, registry; from featuresum.tasks import notebook; "
        "assert (load_model, registry) == (notebook.load_model, notebook.registry)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_predict_by_path_is_the_pipelines_scoring_in_input_order(checkpoint, tmp_path, shard):
    sample_id = np.random.default_rng(0).permutation(len(shard.sample_id)) + 1000
    frame = feature_frame(shard, sample_id=sample_id, label=shard.label.numpy(), note="ignored")
    model = load_model(checkpoint, artifacts_dir=tmp_path)
    predictions = model.predict(frame)

    classifier = model_from_checkpoint(load_checkpoint(checkpoint), CPU)
    predicted, confidence = scoring.predict(classifier, shard.features.numpy(), CPU)
    assert list(predictions.columns) == storage.PREDICTIONS_SCHEMA.names
    assert predictions.dtypes.astype(str).tolist() == ["int64", "float64", "int64", "float32"]
    np.testing.assert_array_equal(predictions["sample_id"], sample_id)
    np.testing.assert_array_equal(predictions["predicted_class"], predicted)
    np.testing.assert_array_equal(predictions["confidence"], confidence)
    np.testing.assert_array_equal(predictions["feature_sum"], shard.feature_sum.numpy())
    assert (model.version, model.checkpoint, model.metrics) == (None, str(checkpoint), {})


def test_rows_without_sample_id_are_numbered_from_zero_and_column_order_does_not_matter(checkpoint, shard):
    frame = feature_frame(shard)
    shuffled = frame[list(reversed(frame.columns))]
    predictions = load_model(str(checkpoint)).predict(shuffled)
    assert predictions["sample_id"].tolist() == list(range(len(frame)))
    pd.testing.assert_frame_equal(predictions, load_model(checkpoint).predict(frame))


def test_an_empty_frame_gives_empty_predictions(checkpoint, shard):
    predictions = load_model(checkpoint).predict(feature_frame(shard).iloc[:0])
    assert len(predictions) == 0
    assert predictions.dtypes.astype(str).tolist() == ["int64", "float64", "int64", "float32"]


def test_load_by_version_and_by_champion(artifacts, checkpoint, shard):
    first = load_model(1, artifacts_dir=artifacts)
    assert (first.version, first.checkpoint, first.metrics) == (1, str(checkpoint), {"val_accuracy": 0.5})
    second = load_model("2", artifacts_dir=artifacts)
    champion = load_model("champion", artifacts_dir=artifacts)
    assert champion.version == second.version == 2
    assert champion.metrics == {"val_accuracy": 0.75}
    assert champion.checkpoint == str(artifacts / "copy.pt")
    # A path finds its version by the checkpoint's fingerprint.
    assert load_model(checkpoint, artifacts_dir=artifacts).version == 1
    frame = feature_frame(shard)
    pd.testing.assert_frame_equal(champion.predict(frame), first.predict(frame))


def test_a_version_whose_checkpoint_changed_is_refused(artifacts, checkpoint):
    save_checkpoint(artifacts / "copy.pt", {**load_checkpoint(checkpoint), "saved_again": "other bytes"})
    with pytest.raises(EnvironmentFailure, match="no longer holds the weights it was recorded with"):
        load_model("champion", artifacts_dir=artifacts)


@pytest.mark.parametrize(
    ("reference", "message"),
    [(3, "no model version 3"), ("9", "no model version 9"), ("best", "no alias 'best'"), ("nope.pt", "no such file")],
)
def test_an_unknown_reference_is_an_input_error(artifacts, reference, message):
    with pytest.raises(InputError, match=message):
        load_model(reference, artifacts_dir=artifacts)


def test_champion_before_any_model_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="train a model first"):
        load_model("champion", artifacts_dir=tmp_path)


def spoil(frame: pd.DataFrame, how: str) -> pd.DataFrame:
    frame = frame.copy()
    if how == "missing":
        return frame.drop(columns=["f123", "f500"])
    if how == "nan":
        frame.loc[3, "f010"] = np.nan
    elif how == "infinite":
        frame.loc[3, "f010"] = np.inf
    elif how == "text":
        frame["f010"] = "x"
    elif how == "sample_id":
        frame["sample_id"] = 0.5
    return frame


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("missing", "missing f123 and 1 more"),
        ("nan", "NaN"),
        ("infinite", "infinite"),
        ("text", "column f010 has type"),
        ("sample_id", "column sample_id has type float64"),
    ],
)
def test_a_bad_frame_is_a_one_line_input_error(checkpoint, shard, how, message):
    model = load_model(checkpoint)
    with pytest.raises(InputError, match=message) as raised:
        model.predict(spoil(feature_frame(shard), how))
    assert "\n" not in str(raised.value)


def test_registry_frame_has_one_row_per_version(artifacts, checkpoint):
    table = registry(artifacts)
    assert list(table.columns) == REGISTRY_COLUMNS
    assert table["version"].tolist() == [1, 2]
    assert table["val_accuracy"].tolist() == [0.5, 0.75]
    assert table["aliases"].tolist() == ["", "champion"]
    assert table["checkpoint"].tolist() == [str(checkpoint), str(artifacts / "copy.pt")]
    assert table["run_date"].isna().tolist() == [True, False] and table["run_date"][1] == "2026-11-28"
    assert table["flow_run_id"].isna().all() and table["created"].notna().all()


def test_registry_frame_is_empty_without_versions(tmp_path):
    table = registry(tmp_path / "nothing-here")
    assert list(table.columns) == REGISTRY_COLUMNS
    assert table.empty
    assert not (tmp_path / "nothing-here").exists()

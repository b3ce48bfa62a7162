"""The options object: each pipeline option declared once, with the presets as the source of every default."""

import inspect
from dataclasses import fields

import pytest
import typer

from featuresum.flows.cli import app
from featuresum.flows.options import PipelineOptions
from featuresum.flows.pipeline import pipeline_flow, score_flow, train_flow
from featuresum.flows.presets import PRESETS
from featuresum.tasks.errors import InputError

OPTIONS = {option.name: option for option in fields(PipelineOptions)}


@pytest.mark.parametrize("flow", [pipeline_flow, train_flow, score_flow])
def test_every_flow_parameter_that_is_an_option_has_the_options_type_and_default(flow):
    defaults = PipelineOptions()
    for name, parameter in inspect.signature(flow.fn).parameters.items():
        if name in OPTIONS:
            assert parameter.default == getattr(defaults, name), name
            assert parameter.annotation == OPTIONS[name].type, name


def test_the_pipeline_flow_takes_every_option_and_its_date():
    assert set(inspect.signature(pipeline_flow.fn).parameters) == {*OPTIONS, "run_date"}


def test_the_default_options_are_the_default_preset():
    assert {name: getattr(PipelineOptions(), name) for name in PRESETS["default"].values()} == PRESETS[
        "default"
    ].values()


def test_a_preset_gives_the_values_an_explicit_option_overrides(tmp_path):
    options = PipelineOptions.from_preset("full", epochs=3, lr=None, artifacts_dir=str(tmp_path / "a"))
    full = PRESETS["full"]
    assert (options.train_samples, options.batch_size, options.lr) == (full.train_samples, full.batch_size, full.lr)
    assert options.epochs == 3
    assert options.artifacts_dir == str(tmp_path / "a") and options.data_dir.startswith("/")


def test_drift_levels_in_the_wrong_order_are_refused():
    with pytest.raises(InputError, match="--drift-warn 0.5 is above --drift-alert 0.2"):
        PipelineOptions.from_preset("default", drift_warn=0.5, drift_alert=0.2)


@pytest.mark.parametrize("command", ["run", "train", "backfill", "serve", "score"])
def test_each_command_option_is_generated_from_its_declaration(command):
    click_command = typer.main.get_command(app).commands[command]
    shared = [param for param in click_command.params if param.name in OPTIONS]
    assert len(shared) >= 9
    for param in shared:
        declared = OPTIONS[param.name].metadata
        assert param.help.startswith(declared["help"]), param.name
        preset = declared["preset"] and command != "score"
        assert param.default == (None if preset else OPTIONS[param.name].default), param.name

"""The options of a pipeline run, declared once: each one's type, default (from the presets) and help.

The flows take them as typed Prefect parameters (what the UI, prefect.yaml and deployments show and
validate); the commands of the CLI are generated from the same fields. Kept free of heavy imports,
so `featuresum --help` stays fast.
"""

import functools
import inspect
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

from featuresum.flows.presets import DEFAULT, DRIFT_ALERT, DRIFT_WARN, PRESETS, SHARD_ROWS
from featuresum.tasks.settings import TrainConfig

Device = Literal["auto", "cpu", "cuda"]
Schedule = Literal["onecycle", "constant"]
Init = Literal["scratch", "champion"]


def _option(default: Any, help: str, *, preset: bool = False, **limits: float) -> Any:
    """A field and its command-line help; `preset` marks a value that a preset chooses."""
    return field(default=default, metadata={"help": help, "preset": preset, "limits": limits})


@dataclass(frozen=True)
class PipelineOptions:
    """Every option of a pipeline run; the default preset gives each default."""

    train_samples: int = _option(DEFAULT.train_samples, "Training rows.", preset=True, min=1)
    holdout_samples: int = _option(DEFAULT.holdout_samples, "Held-out rows, from a different seed.", preset=True, min=1)
    score_samples: int = _option(DEFAULT.score_samples, "Rows in the batch to score.", preset=True, min=0)
    epochs: int = _option(DEFAULT.epochs, "Training epochs.", preset=True, min=1)
    batch_size: int = _option(DEFAULT.batch_size, "Training batch size.", preset=True, min=1)
    lr: float = _option(DEFAULT.lr, "Peak learning rate of AdamW.", preset=True, min=1e-9)
    weight_decay: float = _option(DEFAULT.weight_decay, "AdamW weight decay.", preset=True, min=0.0)
    schedule: Schedule = _option(DEFAULT.schedule, "Learning-rate schedule: onecycle, or constant.", preset=True)
    seed: int = _option(0, "Seed of every random draw; the same seed gives the same bytes.", min=0)
    shuffle_rows: int = _option(
        TrainConfig.shuffle_rows,
        "Training shuffles its row groups, then the rows within each run of row groups that holds at least this"
        " many rows (a generated row group holds 32,768): the order is the same whether the rows are held in"
        " memory or streamed from disk.",
        min=1,
    )
    train_memory_mb: int | None = _option(
        None,
        "Megabytes training may hold for its rows: when they do not all fit, they are streamed from disk a shuffle"
        " buffer at a time (the same model, more slowly). Unset: 80% of the memory available when training starts.",
        min=1,
    )
    window_days: int = _option(
        1, "Train on the partitions of this many days up to --date (--train-samples in all).", min=1
    )
    drift: float = _option(
        0.0, "Shift of every feature's mean per day since 2026-01-01 in the synthetic data (0: no drift)."
    )
    init: Init = _option("scratch", "Start training from scratch, or from the champion's weights.")
    data_dir: str = _option("data", "Folder for generated Parquet data, or s3://bucket/prefix.")
    artifacts_dir: str = _option(
        "artifacts", "Folder for checkpoints, predictions, the registry and the history, or s3://bucket/prefix."
    )
    device: Device = _option("auto", "Where to train and score; cuda falls back to cpu if absent.")
    shard_rows: int = _option(SHARD_ROWS, "Rows per scoring shard; each shard is one task run.", min=1)
    min_improvement: float = _option(
        0.0,
        "Held-out accuracy a new model must gain over the champion to replace it (the promotion gate).",
        min=0.0,
    )
    drift_warn: float = _option(
        DRIFT_WARN, "PSI of a scored batch against its model's training rows from which drift is a warning", min=0.0
    )
    drift_alert: float = _option(
        DRIFT_ALERT,
        "PSI above which drift is an alert: the run emits the Prefect event featuresum.drift.detected.",
        min=0.0,
    )
    refresh: bool = _option(False, "Recompute every step instead of reusing cached outputs.")
    keep_days: int | None = _option(
        None,
        "Delete what no run of the last N run dates (counted back from the newest) can need: older data partitions,"
        " predictions and checkpoints; the champion, its recent predecessors and the newest date's window stay"
        " (see `featuresum gc`). Unset: keep everything.",
        min=1,
    )

    @classmethod
    def help(cls, name: str) -> str:
        """The help text of the option `name`."""
        return next(option for option in fields(cls) if option.name == name).metadata["help"]

    @classmethod
    def of(cls, parameters: dict[str, Any]) -> "PipelineOptions":
        """The options among a flow's parameters; those a flow does not take keep their defaults."""
        return cls(**{option.name: parameters[option.name] for option in fields(cls) if option.name in parameters})

    @classmethod
    def from_preset(cls, preset: str, **given: Any) -> "PipelineOptions":
        """A preset's values, overridden by every option given (None: not given), with resolved folders.

        Folders are resolved (an absolute path, or the URI), so a run records where it wrote and two
        projects whose relative folders read alike never take each other's runs for their own.
        """
        from featuresum.tasks import monitoring, storage

        options = replace(cls(), **PRESETS[preset].values())
        options = replace(options, **{name: value for name, value in given.items() if value is not None})
        monitoring.check_thresholds(options.drift_warn, options.drift_alert)
        return replace(
            options,
            data_dir=str(storage.resolve(options.data_dir)),
            artifacts_dir=str(storage.resolve(options.artifacts_dir)),
        )

    def parameters(self, flow: Any = None) -> dict[str, Any]:
        """The options as flow parameters: all of them, or those that `flow` takes."""
        values = asdict(self)
        if flow is None:
            return values
        return {name: value for name, value in values.items() if name in flow.parameters.properties}

    def train_config(self) -> TrainConfig:
        """The optimiser settings of the run."""
        return TrainConfig(
            self.epochs, self.batch_size, self.lr, self.weight_decay, self.schedule, self.seed, self.shuffle_rows
        )


# The options of training itself, which every command and flow that trains takes.
TRAINING = (
    *("train_samples", "holdout_samples", "epochs", "batch_size", "lr", "weight_decay", "schedule", "seed"),
    *("shuffle_rows", "train_memory_mb"),
)


def with_options(
    function: Callable, shared: list[inspect.Parameter], build: Callable[[dict[str, Any]], PipelineOptions]
) -> Callable:
    """`function(options, **own)` as a function of `shared` and its own parameters, with `options` built from those.

    Prefect (the flows' parameters) and Typer (the commands' options) read the signature made here.
    """
    signature = inspect.signature(function)
    own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for n, p in signature.parameters.items() if n != "options"]
    names = [parameter.name for parameter in shared]

    @functools.wraps(function)
    def taking_options(**given: Any) -> Any:
        chosen = {name: given.pop(name) for name in names}
        return function(options=build(chosen), **given)

    taking_options.__signature__ = signature.replace(parameters=[*shared, *own])
    return taking_options


def flow_options(*names: str) -> Callable[[Callable], Callable]:
    """Give a flow the options `names` as typed parameters with their defaults; its body gets them as `options`."""
    declared = {option.name: option for option in fields(PipelineOptions)}
    shared = [
        inspect.Parameter(
            name, inspect.Parameter.KEYWORD_ONLY, default=declared[name].default, annotation=declared[name].type
        )
        for name in names
    ]
    return lambda flow_function: with_options(flow_function, shared, lambda chosen: PipelineOptions(**chosen))

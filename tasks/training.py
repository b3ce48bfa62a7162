"""Training loop, held-out evaluation and the checkpoint that makes training resumable."""

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from featuresum.tasks.batches import Rows, as_rows
from featuresum.tasks.checkpoint import CHECKPOINT_FORMAT
from featuresum.tasks.cpu import ThreadPolicy
from featuresum.tasks.data import CLASS_BOUNDARIES, NUM_CLASSES, derive_seed
from featuresum.tasks.model import FeatureSumMLP, ModelConfig
from featuresum.tasks.settings import TrainConfig


@dataclass
class TrainingState:
    """Everything a resumed run needs: model, optimiser, schedule and finished epochs."""

    model: FeatureSumMLP
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    epoch: int
    history: list[dict[str, float]]


def new_training_state(config: TrainConfig, steps_per_epoch: int, device: torch.device) -> TrainingState:
    """A freshly initialised model and optimiser; initial weights depend on config.seed only."""
    torch.manual_seed(derive_seed(config.seed, "init"))
    model = FeatureSumMLP(ModelConfig()).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = None
    if config.schedule == "onecycle":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=config.lr, total_steps=max(1, config.epochs * steps_per_epoch)
        )
    return TrainingState(model, optimizer, scheduler, epoch=0, history=[])


def train_epoch(
    state: TrainingState,
    data: Rows | tuple[torch.Tensor, torch.Tensor],
    config: TrainConfig,
    threads: ThreadPolicy | None = None,
) -> float:
    """One pass over the rows, in the order batches.epoch_plan draws for (seed, epoch); returns the mean loss.

    `data` is rows in memory or streamed (see tasks/batches.py), or (features, labels) tensors. With
    `threads`, the CPU thread count follows the load of other processes as it goes.
    """
    rows = as_rows(data)
    model, optimizer, scheduler = state.model, state.optimizer, state.scheduler
    model.train()
    total = torch.zeros((), device=next(model.parameters()).device)
    for x, y in rows.batches(config, state.epoch):
        if threads is not None:
            threads.maybe_adjust()
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        # Accumulating on the device avoids a host sync per step.
        total += loss.detach() * len(y)
    state.epoch += 1
    return total.item() / len(rows)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_rows: int = 65_536) -> torch.Tensor:
    """Confusion matrix (true class by predicted class) of the model on (x, y)."""
    model.eval()
    confusion = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.int64)
    for start in range(0, len(x), batch_rows):
        predicted = model(x[start : start + batch_rows]).argmax(dim=1).cpu()
        truth = y[start : start + batch_rows].cpu()
        confusion += torch.bincount(truth * NUM_CLASSES + predicted, minlength=NUM_CLASSES**2).view(
            NUM_CLASSES, NUM_CLASSES
        )
    return confusion


def accuracy(confusion: torch.Tensor) -> float:
    """Share of rows on the confusion matrix's diagonal (0.0 for no rows)."""
    total = int(confusion.sum())
    return float(confusion.diag().sum()) / total if total else 0.0


def fit(
    state: TrainingState,
    data: Rows | tuple[torch.Tensor, torch.Tensor],
    holdout: tuple[torch.Tensor, torch.Tensor],
    config: TrainConfig,
    on_epoch: Callable[[TrainingState], None] = lambda state: None,
    threads: ThreadPolicy | None = None,
) -> TrainingState:
    """Train from state.epoch up to config.epochs, evaluating on the held-out set after each epoch."""
    while state.epoch < config.epochs:
        loss = train_epoch(state, data, config, threads)
        held_out = accuracy(evaluate(state.model, *holdout))
        state.history.append({"epoch": state.epoch, "train_loss": loss, "val_accuracy": held_out})
        on_epoch(state)
    return state


def to_checkpoint(state: TrainingState, config: TrainConfig, extra: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint of plain types and tensors, loadable with torch.load(weights_only=True)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "model": {k: v.cpu() for k, v in state.model.state_dict().items()},
        "model_config": asdict(ModelConfig()),
        "class_boundaries": list(CLASS_BOUNDARIES),
        "train_config": asdict(config),
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict() if state.scheduler else None,
        "rng_state": torch.get_rng_state(),
        "epoch": state.epoch,
        "history": list(state.history),
        **extra,
    }


def restore(checkpoint: dict[str, Any], state: TrainingState) -> TrainingState:
    """Load a checkpoint's model, optimiser, schedule and progress into a fresh state."""
    state.model.load_state_dict(checkpoint["model"])
    state.optimizer.load_state_dict(checkpoint["optimizer"])
    if state.scheduler is not None and checkpoint["scheduler"] is not None:
        state.scheduler.load_state_dict(checkpoint["scheduler"])
    torch.set_rng_state(checkpoint["rng_state"])
    state.epoch = checkpoint["epoch"]
    state.history = list(checkpoint["history"])
    return state

"""Training settings and the choice of device: what a flow needs to key its tasks, importable without torch."""

from dataclasses import dataclass
from importlib.metadata import version


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings: AdamW, optionally with a one-cycle learning-rate schedule."""

    epochs: int = 4
    batch_size: int = 256
    lr: float = 0.003
    weight_decay: float = 0.1
    schedule: str = "onecycle"
    seed: int = 0


def cuda_available() -> bool:
    """Whether torch can use a GPU; a CPU-only build of torch (`+cpu`) answers without importing it."""
    if version("torch").endswith("+cpu"):
        return False
    import torch

    return torch.cuda.is_available()


def resolve_device(requested: str) -> tuple[str, str | None]:
    """The device to use for 'auto', 'cpu' or 'cuda', and a warning when cuda was asked for but is absent."""
    if requested == "cpu":
        return "cpu", None
    if cuda_available():
        return "cuda", None
    if requested == "cuda":
        return "cpu", "CUDA was requested but no GPU is available; falling back to the CPU"
    return "cpu", None

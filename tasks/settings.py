"""Training settings and the choice of device: what a flow needs to key its tasks, importable without torch."""

import os
import sys
from dataclasses import dataclass
from importlib.metadata import version

# What a Linux machine shows when it has a GPU torch could use: NVIDIA's driver, or AMD's (ROCm).
GPU_DRIVERS = ("/proc/driver/nvidia/version", "/dev/kfd")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings: AdamW, optionally with a one-cycle learning-rate schedule."""

    epochs: int = 4
    batch_size: int = 256
    lr: float = 0.003
    weight_decay: float = 0.1
    schedule: str = "onecycle"
    seed: int = 0
    shuffle_rows: int = 131_072


def cuda_available() -> bool:
    """Whether torch can use a GPU; without a GPU driver, or with a CPU-only build of torch, torch is not imported."""
    if version("torch").endswith("+cpu"):
        return False
    if sys.platform == "linux" and not any(map(os.path.exists, GPU_DRIVERS)):
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

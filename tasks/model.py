"""The original script's classifier: Linear(784, 128), ReLU, Linear(128, 10)."""

from dataclasses import dataclass

import torch
from torch import nn

from featuresum.tasks.data import NUM_CLASSES, NUM_FEATURES


@dataclass(frozen=True)
class ModelConfig:
    """Layer sizes; stored in every checkpoint so the model can be rebuilt from it alone."""

    input_dim: int = NUM_FEATURES
    hidden_dim: int = 128
    num_classes: int = NUM_CLASSES


class FeatureSumMLP(nn.Module):
    """Two-layer perceptron; layer names match the original script's state_dict."""

    def __init__(self, config: ModelConfig = ModelConfig()):
        super().__init__()
        self.fc1 = nn.Linear(config.input_dim, config.hidden_dim)
        self.fc2 = nn.Linear(config.hidden_dim, config.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape (batch, num_classes)."""
        return self.fc2(torch.relu(self.fc1(x)))

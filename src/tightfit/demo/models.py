"""Small reference models used by the demo, the tests and the benchmarks."""

from __future__ import annotations

import torch
from torch import nn


def lenet_300_100(in_features: int = 64, classes: int = 10) -> nn.Sequential:
    """LeNet-300-100: a 3-layer MLP (64-300-100-10 on 8x8 digits)."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, 300),
        nn.ReLU(),
        nn.Linear(300, 100),
        nn.ReLU(),
        nn.Linear(100, classes),
    )


class LeNet5(nn.Module):
    """A LeNet-5-style CNN for 1x8x8 inputs: two 3x3 convolutions with max-pooling, three FC layers."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * 2 * 2, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:  # flat 64-pixel digits
            x = x.view(-1, 1, 8, 8)
        return self.classifier(self.features(x))

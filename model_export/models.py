"""Models that ship with fedge: the demo model and the small models the exporter is tested on.

``DigitsMLP`` is the demo model (sklearn digits: 64 pixels in, 10 classes out). The others
cover what the exporter must handle: convolutions and pooling (``DigitsCNN``), a regression
head for MSE (``MLPRegressor``), and a backbone to freeze for head-only fine-tuning
(``BackboneHead``: freeze ``backbone``).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["BackboneHead", "DigitsCNN", "DigitsMLP", "MLPRegressor", "WideMLP"]


class DigitsMLP(nn.Module):
    """64 -> 32 (ReLU) -> 10 logits: 2,410 parameters."""

    def __init__(self, in_features: int = 64, hidden: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class WideMLP(DigitsMLP):
    """784 -> 128 (ReLU) -> 10: the model DESIGN.md measured the portable step on."""

    def __init__(self) -> None:
        super().__init__(in_features=784, hidden=128, num_classes=10)


class DigitsCNN(nn.Module):
    """A small CNN on 1x8x8 images: conv, ReLU, max-pool, conv, ReLU, average-pool, linear."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 4, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
            nn.Conv2d(4, 8, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.AvgPool2d(2),  # 4x4 -> 2x2
        )
        self.classifier = nn.Linear(8 * 2 * 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class MLPRegressor(nn.Module):
    """8 -> 16 (tanh) -> 2 real outputs, trained with MSE."""

    def __init__(self, in_features: int = 8, hidden: int = 16, out_features: int = 2) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden), nn.Tanh(), nn.Linear(hidden, out_features)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BackboneHead(nn.Module):
    """A feature extractor and a classifier head; fine-tune with ``freeze=("backbone",)``."""

    def __init__(self, in_features: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Linear(in_features, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU()
        )
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

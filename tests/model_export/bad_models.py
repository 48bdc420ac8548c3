"""Models the exporter must refuse, each for one reason (imported by spec in the tests)."""

from __future__ import annotations

import torch
from torch import nn


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # branches on a value: no static graph can hold both paths
            return self.fc(x)
        return -self.fc(x)


class UnsupportedOp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.special.bessel_j0(self.fc(x))


class TupleOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fc(x), x


class OneLogit(nn.Module):
    """One output per example: not logits over classes."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).squeeze(1)


class WithBatchNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 3)
        self.bn = nn.BatchNorm1d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x))


def make_linear() -> nn.Module:
    """A zero-argument factory (accepted)."""
    return nn.Linear(8, 3)


def needs_arguments(width: int) -> nn.Module:
    return nn.Linear(8, width)


def not_a_module() -> int:
    return 3


NOT_CALLABLE = 42

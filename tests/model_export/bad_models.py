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


class CumulativeBatchNorm(nn.Module):
    """BatchNorm with momentum=None: a running average over every batch ever seen."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 3)
        self.bn = nn.BatchNorm1d(3, momentum=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x))


class CountsCalls(nn.Module):
    """Mutates a buffer that is not a batch norm statistic."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 3)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.fc(x)


class Bessel(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.special.bessel_j0(x)


class UnsupportedLayer(nn.Module):
    """An op without an ONNX translation inside a layer: the error names the layer."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 3)
        self.act = Bessel()
        self.head = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.fc(x)))


class SelfNormalizing(nn.Module):
    """AlphaDropout (with SELU): no seeded rewrite, refused with what to use instead."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 3)
        self.drop = nn.AlphaDropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(torch.selu(self.fc(x)))


def make_linear() -> nn.Module:
    """A zero-argument factory (accepted)."""
    return nn.Linear(8, 3)


def needs_arguments(width: int) -> nn.Module:
    return nn.Linear(8, width)


def not_a_module() -> int:
    return 3


NOT_CALLABLE = 42

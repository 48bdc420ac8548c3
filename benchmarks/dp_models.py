"""The model bench_dp trains with DP-FedAvg on FedProx Synthetic-IID (60 features, 10 classes):
multinomial logistic regression, the FedProx paper's model for its synthetic data, exported by
the project's exporter (spec ``benchmarks/dp_models.py:SoftmaxRegression``)."""

from __future__ import annotations

import torch
from torch import nn


class SoftmaxRegression(nn.Module):
    """60 -> 10 logits, one linear layer: 610 parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(60, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)

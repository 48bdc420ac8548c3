"""The model bench_poisoning trains on the FedProx synthetic data (60 features, 10 classes):
the demo's MLP with a 60-wide input, exported by the same exporter (spec
``benchmarks/poisoning_models.py:SyntheticMLP``)."""

from __future__ import annotations

from model_export.models import DigitsMLP


class SyntheticMLP(DigitsMLP):
    """60 -> 32 (ReLU) -> 10 logits: 2,282 parameters."""

    def __init__(self) -> None:
        super().__init__(in_features=60, hidden=32, num_classes=10)

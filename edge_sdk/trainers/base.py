"""The trainer interface every training runtime implements (one abstract test suite covers all)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from edge_sdk.bundle import Manifest


class BundleNotSupported(Exception):
    """This backend cannot run this bundle (the manifest says why); another backend may."""


class Trainer(ABC):
    """Local training on one bundle with one runtime.

    Parameters move as ONE flat float32 vector in the manifest's layout
    (``manifest.parameters``: name, shape, offset in ``named_parameters()`` order).
    """

    backend: str
    manifest: Manifest

    @abstractmethod
    def get_parameters(self) -> np.ndarray:
        """A copy of the trainable parameters as a flat float32 vector."""

    @abstractmethod
    def set_parameters(self, vec: np.ndarray) -> None:
        """Replace the trainable parameters; optimizer state is left as it is."""

    @abstractmethod
    def reset_optimizer(self) -> None:
        """Zero the optimizer state (momentum, Adam moments, step count)."""

    @abstractmethod
    def train_step(self, x: np.ndarray, y: np.ndarray, lr: float | None = None) -> float:
        """One optimizer step on this batch; returns the batch loss before the step."""

    @abstractmethod
    def evaluate(self, x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
        """``{"loss": float, "num_examples": int}`` plus ``"accuracy"`` for classification."""

    @abstractmethod
    def predict(self, x: np.ndarray) -> np.ndarray:
        """Model outputs for a batch."""

    def set_proximal(self, anchor: np.ndarray | None, mu: float) -> None:
        """FedProx: add ``mu/2 * ||w - anchor||^2`` to the loss of later steps (mu=0 disables)."""
        raise BundleNotSupported(f"backend {self.backend} has no proximal term")

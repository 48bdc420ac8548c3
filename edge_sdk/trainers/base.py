"""The trainer interface every training runtime implements (one abstract test suite covers all).

Exceptions::

    BundleNotSupported   this backend cannot run this bundle (or this option, e.g. FedProx)
    ValueError           a batch that does not fit the manifest (shape, dtype, labels, NaN/Inf)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from edge_sdk.bundle import Manifest

__all__ = ["BundleNotSupported", "Trainer"]


class BundleNotSupported(Exception):
    """This backend cannot run this bundle (the manifest says why); another backend may."""


class Trainer(ABC):
    """Local training on one bundle with one runtime.

    Parameters move as ONE flat float32 vector in the manifest's layout
    (``manifest.parameters``: name, shape, offset in ``named_parameters()`` order, then
    ``manifest.buffers``, the running statistics of batch norm layers).
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
        """One optimizer step on this batch; returns the batch loss before the step.

        ``lr`` overrides the bundle's learning rate for this step. With a proximal term set,
        the returned loss is the data loss alone (the step includes the term's gradient)."""

    @abstractmethod
    def evaluate(self, x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
        """``{"loss": float, "num_examples": int}`` plus ``"accuracy"`` for classification."""

    @abstractmethod
    def predict(self, x: np.ndarray) -> np.ndarray:
        """Model outputs for a batch."""

    def seed(self, value: int) -> None:
        """Restart the sequence of per-step dropout seeds (bundles whose step takes one): the
        same seed and batches give the same steps. Runtimes that draw their own masks ignore
        it."""
        return None

    def set_proximal(self, anchor: np.ndarray | None, mu: float) -> None:
        """FedProx: add ``mu/2 * ||w - anchor||^2`` to the loss of later steps (mu=0 disables)."""
        raise BundleNotSupported(f"backend {self.backend} has no proximal term")

    # -- helpers shared by the backends -------------------------------------------------------

    def _check_vector(self, vec: np.ndarray, what: str = "parameter vector") -> np.ndarray:
        arr = np.asarray(vec)
        if arr.shape != (self.manifest.num_parameters,):
            raise ValueError(
                f"{what} has shape {arr.shape}; the bundle needs ({self.manifest.num_parameters},)"
            )
        arr = arr.astype(np.float32, copy=True)
        if not np.isfinite(arr).all():
            raise ValueError(f"{what} holds NaN or Inf")
        return arr

    @staticmethod
    def _check_lr(lr: float) -> float:
        value = float(lr)
        if not np.isfinite(value) or value < 0:
            raise ValueError(f"learning rate must be finite and >= 0, got {lr}")
        return value

    def _check_batch(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = self._check_x(x)
        return x, self._check_y(y, x.shape[0])

    def _check_x(self, x: np.ndarray) -> np.ndarray:
        spec = self.manifest.raw["input"]
        arr = np.asarray(x)
        want = tuple(spec["shape"][1:])
        if arr.ndim != len(want) + 1 or tuple(arr.shape[1:]) != want or arr.shape[0] < 1:
            raise ValueError(f"x has shape {arr.shape}; the bundle needs (batch>=1, *{want})")
        if arr.dtype.kind not in "fiub":
            raise ValueError(f"x has dtype {arr.dtype}; the bundle needs {spec['dtype']}")
        if arr.dtype != spec["dtype"] or not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr, dtype=np.dtype(spec["dtype"]))
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise ValueError("x holds NaN or Inf")
        return arr

    def _check_y(self, y: np.ndarray, batch: int) -> np.ndarray:
        spec = self.manifest.raw["target"]
        arr = np.asarray(y)
        want = (batch, *spec["shape"][1:])
        if arr.shape != want:
            raise ValueError(f"y has shape {arr.shape}; the bundle needs {want}")
        if spec["dtype"] == "int64":
            if arr.dtype.kind not in "iu":
                raise ValueError(f"y has dtype {arr.dtype}; class labels must be integers")
            classes = int(self.manifest.raw["num_classes"])
            arr = np.ascontiguousarray(arr, dtype=np.int64)
            # one reduction instead of min and max: a negative label reads as a huge unsigned
            if arr.size and arr.view(np.uint64).max() >= classes:
                raise ValueError(f"y holds labels outside [0, {classes})")
            return arr
        if arr.dtype.kind not in "fiub":
            raise ValueError(f"y has dtype {arr.dtype}; the bundle needs float32 targets")
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if not np.isfinite(arr).all():
            raise ValueError("y holds NaN or Inf")
        return arr

    def _metrics(self, loss: float, output: np.ndarray, y: np.ndarray) -> dict[str, Any]:
        """The evaluate() result from the batch loss and the model's outputs."""
        result: dict[str, Any] = {"loss": float(loss), "num_examples": int(output.shape[0])}
        if self.manifest.loss == "cross_entropy":
            result["accuracy"] = float(np.mean(np.argmax(output, axis=1) == y))
        elif self.manifest.loss == "bce":
            result["accuracy"] = float(np.mean((output > 0) == (y > 0.5)))
        return result

"""What the two portable-step backends share: parameters, optimizer state and the FedProx
anchor held as numpy arrays, input checks and the optimizer's hyper-parameters.

The step graphs (see :mod:`edge_sdk.bundle`) are pure functions of parameters, running
statistics, optimizer state, batch, learning rate and (for models with dropout) a seed; the
runtime only evaluates them. ``_params`` is the whole model vector (parameters, then running
statistics); the optimizer state covers the trainable part. The seed of each step comes from
a generator that :meth:`Trainer.seed` restarts. Subclasses say how to run one step
(ONNX Runtime's split step or LiteRT's flat one). ``_params`` and ``_state`` are updated in
place by ``set_parameters`` and ``reset_optimizer``, so a backend may bind their memory.
"""

from __future__ import annotations

from abc import abstractmethod
from pathlib import Path

import numpy as np

from edge_sdk.bundle import Manifest
from edge_sdk.trainers.base import Trainer

__all__ = ["StepGraphTrainer", "read_f32"]


def read_f32(path: Path, count: int) -> np.ndarray:
    vec = np.fromfile(path, dtype="<f4")
    if vec.shape != (count,):
        raise ValueError(f"{path.name} holds {vec.size} floats, the manifest says {count}")
    return vec.astype(np.float32)


class StepGraphTrainer(Trainer):
    def __init__(self, bundle_dir: Path, manifest: Manifest) -> None:
        self.bundle_dir = Path(bundle_dir)
        self.manifest = manifest
        raw = manifest.raw
        self._params = read_f32(
            self.bundle_dir / raw["initial_parameters"], manifest.num_parameters
        )
        self._state_shapes = {s["name"]: tuple(s["shape"]) for s in raw["optimizer_state"]}
        self._state = {k: np.zeros(s, np.float32) for k, s in self._state_shapes.items()}
        self._lr_array = np.asarray(float(raw["optimizer"]["lr"]), np.float32)
        self._anchor: np.ndarray | None = None
        self._mu = np.zeros((), np.float32)
        self._seed = np.zeros((), np.int64)  # updated in place before each step
        self._seeds = np.random.default_rng()

    def seed(self, value: int) -> None:
        self._seeds = np.random.default_rng(value)

    def _next_seed(self) -> None:
        if self.manifest.step_seed:
            self._seed[...] = self._seeds.integers(0, 2**31)

    def get_parameters(self) -> np.ndarray:
        return self._params.copy()

    def set_parameters(self, vec: np.ndarray) -> None:
        np.copyto(self._params, self._check_vector(vec))

    def reset_optimizer(self) -> None:
        for value in self._state.values():
            value.fill(0)

    def set_proximal(self, anchor: np.ndarray | None, mu: float) -> None:
        if not np.isfinite(mu) or mu < 0:
            raise ValueError(f"proximal mu must be finite and >= 0, got {mu}")
        if mu and anchor is None:
            raise ValueError("a proximal term with mu > 0 needs an anchor vector")
        self._anchor = None if not mu else self._check_vector(anchor, "anchor")  # type: ignore[arg-type]
        self._mu = np.asarray(mu, np.float32)

    def _lr_of(self, lr: float | None) -> np.ndarray:
        if lr is None:
            return self._lr_array  # read-only to the graphs; one array less per step
        return np.asarray(self._check_lr(lr), np.float32)

    def train_step(self, x: np.ndarray, y: np.ndarray, lr: float | None = None) -> float:
        x, y = self._check_batch(x, y)
        self._next_seed()
        return self._train_on(x, y, self._lr_of(lr))

    @abstractmethod
    def _train_on(self, x: np.ndarray, y: np.ndarray, lr: np.ndarray) -> float:
        """One step on a checked batch: update ``_params`` and ``_state``, return the loss."""

"""What the two portable-step backends share: parameters, optimizer state and the FedProx
anchor held as numpy arrays and fed to the bundle's step graph each step.

The step graph (see :mod:`edge_sdk.bundle`) is a pure function
``(params, *state, x, y, lr, anchor, mu) -> (loss, params_out, *state_out)``; the runtime only
evaluates it. Subclasses say how to run a graph (ONNX Runtime or LiteRT).
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
        self._state: dict[str, np.ndarray] = {}
        self.reset_optimizer()
        self._lr = float(raw["optimizer"]["lr"])
        self._anchor: np.ndarray | None = None
        self._mu = np.zeros((), np.float32)

    def get_parameters(self) -> np.ndarray:
        return self._params.copy()

    def set_parameters(self, vec: np.ndarray) -> None:
        self._params = self._check_vector(vec)

    def reset_optimizer(self) -> None:
        self._state = {k: np.zeros(s, np.float32) for k, s in self._state_shapes.items()}

    def set_proximal(self, anchor: np.ndarray | None, mu: float) -> None:
        if not np.isfinite(mu) or mu < 0:
            raise ValueError(f"proximal mu must be finite and >= 0, got {mu}")
        if mu and anchor is None:
            raise ValueError("a proximal term with mu > 0 needs an anchor vector")
        self._anchor = None if not mu else self._check_vector(anchor, "anchor")  # type: ignore[arg-type]
        self._mu = np.asarray(mu, np.float32)

    def _lr_of(self, lr: float | None) -> np.ndarray:
        value = self._lr if lr is None else float(lr)
        if not np.isfinite(value) or value < 0:
            raise ValueError(f"learning rate must be finite and >= 0, got {lr}")
        return np.asarray(value, np.float32)

    def _step_feeds(self, x: np.ndarray, y: np.ndarray, lr: np.ndarray) -> dict[str, np.ndarray]:
        # Without a proximal term the anchor is the parameters themselves: mu * 0 is exactly 0.
        anchor = self._params if self._anchor is None else self._anchor
        feeds = {"params": self._params, "x": x, "y": y, "lr": lr, "anchor": anchor, "mu": self._mu}
        feeds.update({f"state.{k}": v for k, v in self._state.items()})
        return feeds

    def _apply_step(self, outs: dict[str, np.ndarray]) -> float:
        self._params = np.asarray(outs["params_out"], np.float32).reshape(-1)
        for k in self._state:
            self._state[k] = np.asarray(outs[f"state_out.{k}"], np.float32).reshape(
                self._state_shapes[k]
            )
        return float(outs["loss"])

    def train_step(self, x: np.ndarray, y: np.ndarray, lr: float | None = None) -> float:
        x = self._check_x(x)
        y = self._check_y(y, x.shape[0])
        return self._apply_step(self._run_step(self._step_feeds(x, y, self._lr_of(lr))))

    @abstractmethod
    def _run_step(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the step graph on named inputs; named outputs."""

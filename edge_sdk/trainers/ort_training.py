"""``ort-training``: the bundle's ORT training artifacts on onnxruntime-training 1.19.2.

The last release of ORT's training packages (x86_64 wheels only; importing it pulls torch).
The artifacts compute loss and gradients in ORT's own training graph and update with ORT's
optimizer kernels; the bundle's manifest says which optimizers they express exactly. There is
no FedProx input in these graphs, so ``set_proximal`` with ``mu > 0`` is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edge_sdk.bundle import Manifest
from edge_sdk.trainers.base import BundleNotSupported, Trainer
from edge_sdk.trainers.step_graph import read_f32

__all__ = ["OrtTrainingTrainer"]


class OrtTrainingTrainer(Trainer):
    backend = "ort-training"

    def __init__(self, bundle_dir: Path, manifest: Manifest, *, threads: int = 1) -> None:
        import onnxruntime
        from onnxruntime.training import api

        self.manifest = manifest
        self._api = api
        self._ortvalue = onnxruntime.OrtValue
        files = manifest.raw["graphs"]["ort_training"]
        self._paths = {k: str(Path(bundle_dir) / v) for k, v in files.items()}
        self._options = onnxruntime.SessionOptions()
        self._options.intra_op_num_threads = threads
        self._options.inter_op_num_threads = 1
        self._options.log_severity_level = 3
        self._lr = float(manifest.raw["optimizer"]["lr"])
        self._load()
        # The checkpoint holds the initial parameters already; loading params.f32 over them
        # makes the layout check (ORT's contiguous order == manifest order) part of startup.
        self.set_parameters(
            read_f32(Path(bundle_dir) / manifest.raw["initial_parameters"], manifest.num_parameters)
        )

    def get_parameters(self) -> np.ndarray:
        vec = self._module.get_contiguous_parameters(trainable_only=True).numpy()
        return np.asarray(vec, np.float32).reshape(-1).copy()

    def set_parameters(self, vec: np.ndarray) -> None:
        arr = self._check_vector(vec)
        # 1.19.2's wrapper passes the buffer straight to the C++ binding, which wants the raw
        # OrtValue inside the Python one.
        self._module.copy_buffer_to_parameters(
            self._ortvalue.ortvalue_from_numpy(arr)._ortvalue, trainable_only=True
        )

    def _load(self) -> None:
        state = self._api.CheckpointState.load_checkpoint(self._paths["checkpoint"])
        self._module = self._api.Module(
            self._paths["training"], state, self._paths["eval"], session_options=self._options
        )
        self._optimizer = self._api.Optimizer(self._paths["optimizer"], self._module)

    def reset_optimizer(self) -> None:
        # The moments and step count live in the checkpoint state, which a new Optimizer object
        # reuses; only a fresh state from the checkpoint file starts them at zero.
        params = self.get_parameters()
        self._load()
        self.set_parameters(params)

    def set_proximal(self, anchor: np.ndarray | None, mu: float) -> None:
        if mu:
            raise BundleNotSupported(
                "ort-training artifacts have no proximal term (FedProx): use ort-step"
            )

    def train_step(self, x: np.ndarray, y: np.ndarray, lr: float | None = None) -> float:
        x, y = self._check_batch(x, y)
        value = self._lr if lr is None else self._check_lr(lr)
        self._module.train()
        loss, _ = self._module(x, y)
        self._optimizer.set_learning_rate(value)
        self._optimizer.step()
        self._module.lazy_reset_grad()
        return float(loss)

    def _forward(self, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
        self._module.eval()
        loss, output = self._module(x, y)
        return float(loss), np.asarray(output)

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
        x, y = self._check_batch(x, y)
        loss, output = self._forward(x, y)
        return self._metrics(loss, output, y)

    def predict(self, x: np.ndarray) -> np.ndarray:
        x = self._check_x(x)
        target = self.manifest.raw["target"]
        # The eval graph wants a target; its loss is discarded here.
        dummy = np.zeros((x.shape[0], *target["shape"][1:]), dtype=target["dtype"])
        return self._forward(x, dummy)[1]

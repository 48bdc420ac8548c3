"""``ort-step``: the portable step graph on a plain ``onnxruntime.InferenceSession``.

Works with any onnxruntime >= 1.17 (aarch64, Android, iOS builds included) and with
onnxruntime-training, which ships the same module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edge_sdk.bundle import Manifest
from edge_sdk.trainers.step_graph import StepGraphTrainer

__all__ = ["OrtStepTrainer"]


class OrtStepTrainer(StepGraphTrainer):
    backend = "ort-step"

    def __init__(self, bundle_dir: Path, manifest: Manifest, *, threads: int = 1) -> None:
        """``threads``: ORT intra-op threads; 1 is fastest for the small models devices train
        (see docs/benchmarks.md) and leaves the other cores to the app."""
        import onnxruntime as ort

        super().__init__(bundle_dir, manifest)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        graphs = manifest.raw["graphs"]

        def session(name: str) -> Any:
            return ort.InferenceSession(
                str(self.bundle_dir / graphs[name]), options, providers=["CPUExecutionProvider"]
            )

        self._step, self._eval, self._infer = (
            session("step_onnx"),
            session("eval_onnx"),
            session("infer_onnx"),
        )
        self._step_outputs = [o.name for o in self._step.get_outputs()]

    def _run_step(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self._step_outputs, self._step.run(None, feeds), strict=True))

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
        x = self._check_x(x)
        y = self._check_y(y, x.shape[0])
        loss, output = self._eval.run(None, {"params": self._params, "x": x, "y": y})
        return self._metrics(float(loss), output, y)

    def predict(self, x: np.ndarray) -> np.ndarray:
        out: np.ndarray = self._infer.run(None, {"params": self._params, "x": self._check_x(x)})[0]
        return out

"""``litert-step``: the portable step converted to TFLite, on ai-edge-litert's Interpreter.

The TFLite graphs have a fixed batch (``manifest["tflite"]["batch"]``): a shorter batch is
padded with zeros and masked by the step's per-example ``weight`` input, so the step equals the
unpadded one; a longer training batch is refused (one optimizer step cannot be split).
Evaluation runs the step graph with ``lr = 0`` for the loss (its outputs are discarded, so
nothing changes) and ``infer.tflite`` for the outputs, chunk by chunk: one graph fewer to
convert and ship than a separate eval graph, and the loss is the training loss by construction.
Class labels are int32 in TFLite.

Graphs run through the interpreter's plain tensor API (tensors allocated once, then
``set_tensor``/``invoke``/``get_tensor``), not ``SignatureRunner``: the runner resizes and
reallocates every input on every call, which costs time and, on aarch64, segfaults in
``ResizeInputTensor`` on the step's rank-0 inputs (measured under qemu, every ai-edge-litert
release 1.4 to 2.3; see docs/benchmarks.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edge_sdk.bundle import Manifest
from edge_sdk.trainers.step_graph import StepGraphTrainer

__all__ = ["LiteRTStepTrainer"]


class _Graph:
    """One TFLite graph: named inputs in, named outputs (copies) out."""

    def __init__(self, path: str, threads: int) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self._interpreter = Interpreter(model_path=path, num_threads=threads)
        # The runner only supplies the signature's name -> tensor index maps; never called.
        runner = self._interpreter.get_signature_runner()
        self._inputs = {k: d["index"] for k, d in runner.get_input_details().items()}
        self._outputs = {k: d["index"] for k, d in runner.get_output_details().items()}
        del runner  # the interpreter refuses to run while another object references it
        self._interpreter.allocate_tensors()

    def __call__(self, **feeds: np.ndarray) -> dict[str, np.ndarray]:
        for name, value in feeds.items():
            self._interpreter.set_tensor(self._inputs[name], value)
        self._interpreter.invoke()
        return {k: self._interpreter.get_tensor(i) for k, i in self._outputs.items()}


def _eval_loss(loss: str, out: np.ndarray, y: np.ndarray) -> float:
    """The mean loss of outputs ``out`` (float64, log-sum-exp and softplus kept stable)."""
    z = out.astype(np.float64)
    if loss == "cross_entropy":
        top = z.max(axis=1, keepdims=True)
        log_norm = top[:, 0] + np.log(np.exp(z - top).sum(axis=1))
        return float(np.mean(log_norm - z[np.arange(len(y)), y]))
    if loss == "mse":
        return float(np.mean((z - y) ** 2))
    return float(np.mean(np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))))


def _pad(arr: np.ndarray, batch: int) -> np.ndarray:
    out = np.zeros((batch, *arr.shape[1:]), dtype=arr.dtype)
    out[: arr.shape[0]] = arr
    return out


class LiteRTStepTrainer(StepGraphTrainer):
    backend = "litert-step"

    def __init__(self, bundle_dir: Path, manifest: Manifest, *, threads: int = 1) -> None:
        super().__init__(bundle_dir, manifest)
        tfl = manifest.raw["tflite"]
        self.batch = int(tfl["batch"])
        self._step = _Graph(str(self.bundle_dir / manifest.graph("step_tflite")), threads)
        self._infer = _Graph(str(self.bundle_dir / manifest.graph("infer_tflite")), threads)
        # The converter names signature tensors by position: args_<i> in, output_<i> out.
        sig = tfl["signatures"]
        self._step_in = {n: f"args_{i}" for i, n in enumerate(sig["step"]["inputs"])}
        self._step_out = {f"output_{i}": n for i, n in enumerate(sig["step"]["outputs"])}
        self._label_dtype = np.int32 if manifest.loss == "cross_entropy" else np.float32

    def _run_padded(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = feeds["x"].shape[0]
        weight = np.zeros(self.batch, np.float32)
        weight[:n] = 1.0
        feeds = {
            **feeds,
            "x": _pad(feeds["x"], self.batch),
            "y": _pad(feeds["y"].astype(self._label_dtype), self.batch),
            "weight": weight,
        }
        out = self._step(**{self._step_in[k]: v for k, v in feeds.items()})
        return {self._step_out[k]: v for k, v in out.items()}

    def _step_feeds(self, x: np.ndarray, y: np.ndarray, lr: np.ndarray) -> dict[str, np.ndarray]:
        # Without a proximal term the anchor is the parameters themselves: mu * 0 is exactly 0.
        anchor = self._params if self._anchor is None else self._anchor
        feeds = {"params": self._params, "x": x, "y": y, "lr": lr, "anchor": anchor, "mu": self._mu}
        feeds.update({f"state.{k}": v for k, v in self._state.items()})
        if self.manifest.step_seed:
            feeds["seed"] = self._seed
        return feeds

    def _train_on(self, x: np.ndarray, y: np.ndarray, lr: np.ndarray) -> float:
        if x.shape[0] > self.batch:
            raise ValueError(
                f"this bundle's TFLite step trains on batches of at most {self.batch} examples, "
                f"got {x.shape[0]}"
            )
        outs = self._run_padded(self._step_feeds(x, y, lr))
        np.copyto(self._params, outs["params_out"].reshape(-1))
        for k, value in self._state.items():
            np.copyto(value, outs[f"state_out.{k}"].reshape(value.shape))
        return float(outs["loss"])

    def _chunks(self, n: int) -> range:
        return range(0, n, self.batch)

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
        x, y = self._check_batch(x, y)
        if self.manifest.step_seed:
            # the step graph's loss would be under dropout: the eval-mode loss from the outputs
            outputs = self._predict(x)
            return self._metrics(_eval_loss(self.manifest.loss, outputs, y), outputs, y)
        zero = np.zeros((), np.float32)
        total = 0.0
        for i in self._chunks(x.shape[0]):
            xs, ys = x[i : i + self.batch], y[i : i + self.batch]
            out = self._run_padded(self._step_feeds(xs, ys, zero))
            total += float(out["loss"]) * xs.shape[0]
        return self._metrics(total / x.shape[0], self._predict(x), y)

    def _predict(self, x: np.ndarray) -> np.ndarray:
        parts = []
        for i in self._chunks(x.shape[0]):
            xs = x[i : i + self.batch]
            out = self._infer(args_0=self._params, args_1=_pad(xs, self.batch))
            parts.append(out["output_0"][: xs.shape[0]])
        return np.concatenate(parts)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self._predict(self._check_x(x))

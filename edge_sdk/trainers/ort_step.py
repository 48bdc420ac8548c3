"""``ort-step``: the portable step graphs on a plain ``onnxruntime.InferenceSession``.

Works with any onnxruntime >= 1.17 (aarch64, Android, iOS builds included) and with
onnxruntime-training, which ships the same module.

The split step graphs take and return every parameter and optimizer-state tensor on its own
(see :mod:`edge_sdk.bundle`). The trainer keeps two copies of the flat parameter and state
vectors and binds per-tensor views of them with ORT's IO binding: a step reads one copy and
writes the other in place, then the two swap. So no step concatenates, splits, allocates or
copies the parameters, and ``get_parameters`` is one copy of a flat vector. ``step.onnx``
(no proximal inputs) runs unless a FedProx term is set, then ``step_prox.onnx``. Batch norm
running statistics are views of the same flat vectors (their tail), so they swap with the
parameters; a dropout bundle's ``seed`` input is bound once to an array the trainer rewrites
before each step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edge_sdk.bundle import Manifest, step_signature
from edge_sdk.trainers.step_graph import StepGraphTrainer

__all__ = ["OrtStepTrainer"]


class OrtStepTrainer(StepGraphTrainer):
    backend = "ort-step"

    def __init__(self, bundle_dir: Path, manifest: Manifest, *, threads: int = 1) -> None:
        """``threads``: ORT intra-op threads; 1 is fastest for the small models devices train
        (see docs/benchmarks.md) and leaves the other cores to the app."""
        import onnxruntime as ort

        super().__init__(bundle_dir, manifest)
        self._ort = ort
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3

        def session(name: str) -> Any:
            path = str(self.bundle_dir / manifest.graph(name))
            return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

        self._eval, self._infer = session("eval_onnx"), session("infer_onnx")
        self._spare_params = self._params.copy()
        self._spare_state = {k: v.copy() for k, v in self._state.items()}
        copies = [(self._params, self._state), (self._spare_params, self._spare_state)]
        self._loss = np.zeros((), np.float32)
        per_parameter = [(k, len(s) > 0) for k, s in self._state_shapes.items()]
        names = [p.name for p in manifest.parameters]
        buffers = [b.name for b in manifest.buffers]
        # Per graph, one binding per direction d: it reads copy d and writes copy 1 - d.
        self._bindings: dict[bool, tuple[Any, list[tuple[Any, list[np.ndarray]]]]] = {}
        for proximal, graph in ((False, "step_onnx"), (True, "step_prox_onnx")):
            sess = session(graph)
            sig = step_signature(
                names, per_parameter, proximal=proximal, buffers=buffers, seed=manifest.step_seed
            )
            have = ([i.name for i in sess.get_inputs()], [o.name for o in sess.get_outputs()])
            if have != (sig["inputs"], sig["outputs"]):
                raise ValueError(
                    f"{manifest.graph(graph)} does not have the manifest's step signature"
                )
            self._bindings[proximal] = (sess, [self._bind(sess, sig, copies, d) for d in (0, 1)])
        self._current = 0  # the copy that _params and _state are
        self._copy_back: dict[tuple[bool, int], list[tuple[int, np.ndarray]]] = {}
        self._bound_lr: dict[int, np.ndarray] = {}

    def _split(self, vec: np.ndarray, *, buffers: bool = False) -> list[np.ndarray]:
        """Per-parameter views of a flat vector in the manifest's layout (with ``buffers``,
        the model vector's running statistics too)."""
        specs = [*self.manifest.parameters, *(self.manifest.buffers if buffers else ())]
        return [vec[p.offset : p.offset + p.size].reshape(p.shape) for p in specs]

    def _views(self, params: np.ndarray, state: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Per-tensor views in the step signature's order (parameters, buffers, then state)."""
        views = self._split(params, buffers=True)
        for value in state.values():
            views += self._split(value) if value.ndim else [value]
        return views

    def set_proximal(self, anchor: np.ndarray | None, mu: float) -> None:
        super().set_proximal(anchor, mu)
        if self._anchor is None:
            return
        # Bound once here, not per step: _anchor and _mu are private arrays that only the next
        # set_proximal replaces (and rebinds), so their memory stays valid.
        value = self._ort.OrtValue.ortvalue_from_numpy
        names = [f"anchor.{p.name}" for p in self.manifest.parameters]
        for binding, _ in self._bindings[True][1]:
            for name, view in zip(names, self._split(self._anchor), strict=True):
                binding.bind_ortvalue_input(name, value(view))
            binding.bind_ortvalue_input("mu", value(self._mu))

    def _bind(
        self,
        sess: Any,
        sig: dict[str, list[str]],
        copies: list[tuple[np.ndarray, dict[str, np.ndarray]]],
        direction: int,
    ) -> tuple[Any, list[np.ndarray]]:
        src, dst = (
            self._views(*copies[direction]),
            [self._loss, *self._views(*copies[1 - direction])],
        )
        binding = sess.io_binding()
        value = self._ort.OrtValue.ortvalue_from_numpy
        for name, view in zip(sig["inputs"], src, strict=False):  # x, y, lr: per step
            binding.bind_ortvalue_input(name, value(view))
        if "seed" in sig["inputs"]:
            binding.bind_ortvalue_input("seed", value(self._seed))  # updated in place
        for name, view in zip(sig["outputs"], dst, strict=True):
            binding.bind_ortvalue_output(name, value(view))
        return binding, dst

    def _train_on(self, x: np.ndarray, y: np.ndarray, lr: np.ndarray) -> float:
        proximal = self._anchor is not None
        sess, bindings = self._bindings[proximal]
        binding, dst = bindings[self._current]
        value = self._ort.OrtValue.ortvalue_from_numpy  # wraps the array, no copy
        # the OrtValues reference their arrays, which stay alive in this frame through the run
        feeds = [("x", value(x)), ("y", value(y))]
        if lr is not self._bound_lr.get(id(binding)):
            # usually the bundle's lr, the same array every step: bound once, and held by
            # _bound_lr so that its memory stays valid
            feeds.append(("lr", value(lr)))
            self._bound_lr[id(binding)] = lr
        for name, ort_value in feeds:
            binding.bind_ortvalue_input(name, ort_value)
        sess.run_with_iobinding(binding)
        key = (proximal, self._current)
        if key not in self._copy_back:
            # ORT writes a bound output in place unless the graph's output is a tensor it
            # holds already (e.g. a parameter no loss depends on): those are copied back.
            outs = binding.get_outputs()
            self._copy_back[key] = [
                (i, view)
                for i, (out, view) in enumerate(zip(outs, dst, strict=True))
                if out.data_ptr() != view.ctypes.data
            ]
        if self._copy_back[key]:
            outs = binding.get_outputs()
            for i, view in self._copy_back[key]:
                np.copyto(view, outs[i].numpy().reshape(view.shape))
        self._params, self._spare_params = self._spare_params, self._params
        self._state, self._spare_state = self._spare_state, self._state
        self._current ^= 1
        return float(self._loss)

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
        x, y = self._check_batch(x, y)
        loss, output = self._eval.run(None, {"params": self._params, "x": x, "y": y})
        return self._metrics(float(loss), output, y)

    def predict(self, x: np.ndarray) -> np.ndarray:
        out: np.ndarray = self._infer.run(None, {"params": self._params, "x": self._check_x(x)})[0]
        return out

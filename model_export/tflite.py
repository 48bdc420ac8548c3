"""TFLite files of the portable step (``step.tflite``) and of inference (``infer.tflite``).

Converted with litert-torch (optional extra ``tflite``) from the same traced functions as the
ONNX graphs, builtin ops only. litert-torch 0.10 cannot lower a dynamic batch axis, so the
TFLite graphs have a fixed batch; the step takes a per-example 0/1 ``weight`` and the trainer
pads shorter batches (see :mod:`model_export.step`). TFLite has no int64 by default: labels are
int32 (a dropout model's ``seed`` stays int64; a converter that refuses it refuses the model).
Inputs and outputs are positional (``args_<i>``, ``output_<i>``) in the order of the manifest's
``tflite.signatures``.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from model_export.errors import ExportError
from model_export.step import StepFunctions
from model_export.tracing import classify, quiet, trace

__all__ = ["TFLITE_FILES", "write_tflite"]

TFLITE_FILES = {"step": "step.tflite", "infer": "infer.tflite"}


class _Positional(nn.Module):
    """A traced graph as a module with positional tensor arguments, which is what the
    converter exports."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        super().__init__()
        self.gm = gm

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.gm(*args)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _fixed_batch(t: torch.Tensor, batch: int) -> torch.Tensor:
    reps = -(-batch // t.shape[0])
    return t.repeat(reps, *([1] * (t.ndim - 1)))[:batch].contiguous()


def _convert(gm: torch.fx.GraphModule, args: Sequence[torch.Tensor], path: Path, what: str) -> None:
    try:
        import litert_torch
    except ImportError as e:
        raise ExportError("TFLite files need litert-torch (pip install 'fedge[tflite]')") from e
    try:
        with quiet(native=True), contextlib.redirect_stderr(io.StringIO()):
            edge_model = litert_torch.convert(_Positional(gm).eval(), tuple(args))
            edge_model.export(str(path))
    except Exception as e:
        raise classify(e, what) from e


def write_tflite(
    fns: StepFunctions,
    step_args: Sequence[torch.Tensor],
    out_dir: Path,
    *,
    batch: int,
) -> dict[str, str]:
    """Write ``step.tflite`` and ``infer.tflite`` for batches of ``batch`` examples."""
    n_state = len(fns.optimizer.state)
    params, state = step_args[0], list(step_args[1 : 1 + n_state])
    rest = list(step_args[1 + n_state :])
    (x, y, lr), seed, (anchor, mu) = rest[:3], rest[3 : 3 + fns.seeded], rest[3 + fns.seeded :]
    x, y = _fixed_batch(x, batch), _fixed_batch(y, batch)
    if not y.is_floating_point():
        y = y.to(torch.int32)
    weight = torch.ones(batch)
    graphs: dict[str, tuple[Callable[..., object], list[torch.Tensor]]] = {
        "step": (fns.step, [params, *state, x, y, lr, *seed, anchor, mu, weight]),
        "infer": (fns.infer, [params, x]),
    }
    for name, (fn, args) in graphs.items():
        what = f"TFLite {name} graph"
        fns.model.train(name == "step")
        _convert(trace(fn, args, what), args, out_dir / TFLITE_FILES[name], what)
        _check_runs(out_dir / TFLITE_FILES[name], args, what)
    return dict(TFLITE_FILES)


def _check_runs(path: Path, args: Sequence[torch.Tensor], what: str) -> None:
    """Run the converted graph once on ai-edge-litert, when installed: the converter can emit
    ops the interpreter refuses at run time (measured: an embedding's gradient became a
    STABLEHLO_SCATTER that ai-edge-litert 2.x cannot prepare)."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        return
    try:
        interpreter = Interpreter(model_path=str(path))
        runner = interpreter.get_signature_runner()
        runner(**{f"args_{i}": a.detach().numpy() for i, a in enumerate(args)})
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ExportError(f"{what}: converted, but ai-edge-litert cannot run it ({first})") from e

"""Trace the step functions into FX graphs and write them as ONNX.

The recipe DESIGN.md measured: ``make_fx`` with the core-aten decompositions (without them the
exported cross-entropy gradient loses the ``1/batch`` of ``nll_loss_backward``) plus ours for
convolution and pooling gradients (:mod:`model_export.decompositions`), symbolic shapes
so that no batch-dependent constant is frozen into the graph, then the dynamo ONNX exporter with
a dynamic batch axis, with the exporter's graph optimizer off: it drops ``x + 1e-8`` as an
addition of zero (measured with torch 2.13 / onnxscript 0.7: AdamW's eps vanished and a zero
gradient gave 0/0 = NaN), and ONNX Runtime optimizes the graph at load anyway. Tracer and
exporter failures become ``ExportError`` subclasses with one
line of explanation.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import onnx
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from model_export.decompositions import training_decompositions
from model_export.errors import DataDependentControlFlow, ExportError, UnsupportedOperator
from model_export.layers import tracing_context

__all__ = ["IR_VERSION", "OPSET", "classify", "export_onnx", "quiet", "trace"]

# Opset 18 and IR version 9 load on every onnxruntime >= 1.15, so on plain ORT 1.17 devices
# too; the exporter writes IR 10 (ORT >= 1.18) though the graphs use nothing from it.
OPSET = 18
IR_VERSION = 9

_DATA_DEPENDENT_MARKERS = (
    "data-dependent",
    "data dependent",
    "GuardOnDataDependentSymNode",
    "DataDependentOutputException",
    "DynamicOutputShapeException",
)


_OP = re.compile(r"\b((?:aten|prims)(?:\.|::)[A-Za-z0-9_]+)")


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]


def classify(e: BaseException, what: str) -> ExportError:
    chain: list[BaseException] = []
    cur: BaseException | None = e
    while cur is not None and len(chain) < 10:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    text = " ".join(f"{type(c).__name__}: {c}" for c in chain)
    if any(m in text for m in _DATA_DEPENDENT_MARKERS):
        return DataDependentControlFlow(
            f"{what}: the model branches on tensor values (data-dependent control flow), "
            "which a static graph cannot express; use torch.where or masks instead"
        )
    # The innermost exception that names an aten op says which one has no translation.
    detail = next((c for c in reversed(chain) if _OP.search(str(c))), e)
    ops = _OP.findall(str(detail))
    return UnsupportedOperator(
        f"{what}: {'operator ' + ops[0].replace('::', '.') + ' ' if ops else ''}cannot be "
        f"exported to standard ops ({type(detail).__name__}: {_first_line(detail)})"
    )


@contextlib.contextmanager
def quiet(native: bool = False) -> Iterator[None]:
    """The exporters print progress and warnings meant for interactive use; ``native`` also
    silences C++ logging (ORT's graph transformers, TFLite's flatbuffer exporter) that goes
    straight to file descriptors 1 and 2. Errors still surface as exceptions."""
    loggers = [logging.getLogger(n) for n in ("torch", "onnxscript", "torch.onnx", "torch.export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
            _native_silenced() if native else contextlib.nullcontext(),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


@contextlib.contextmanager
def _native_silenced() -> Iterator[None]:
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


def trace(
    fn: Callable[..., object], args: Sequence[torch.Tensor], what: str
) -> torch.fx.GraphModule:
    """Trace ``fn`` to core-aten ops with symbolic shapes."""
    try:
        with quiet(), tracing_context():
            # Through *args: fx counts a bound method's ``self`` as a traced argument.
            return make_fx(
                lambda *a: fn(*a),
                decomposition_table=training_decompositions(),
                tracing_mode="symbolic",
                # frozen parameters and buffers are real tensors, baked in as constants
                _allow_non_fake_inputs=True,
            )(*args)
    except ExportError:
        raise
    except Exception as e:
        raise classify(e, what) from e


def export_onnx(
    gm: torch.fx.GraphModule,
    args: Sequence[torch.Tensor],
    path: Path,
    *,
    input_names: Sequence[str],
    output_names: Sequence[str],
    batch_inputs: Sequence[str],
    what: str,
) -> None:
    """Write ``gm`` as one self-contained ONNX file; inputs in ``batch_inputs`` get a dynamic
    leading ``batch`` axis."""
    batch = torch.export.Dim("batch")
    dynamic = tuple({0: batch} if name in batch_inputs else None for name in input_names)
    try:
        with quiet():
            program = torch.onnx.export(
                gm,
                tuple(args),
                dynamo=True,
                dynamic_shapes=dynamic,
                input_names=list(input_names),
                output_names=list(output_names),
                opset_version=OPSET,
                external_data=False,
                optimize=False,
                verbose=False,
            )
            assert program is not None
            proto = program.model_proto
            proto.ir_version = min(proto.ir_version, IR_VERSION)
            onnx.save(proto, str(path))
    except ExportError:
        raise
    except Exception as e:
        raise classify(e, what) from e

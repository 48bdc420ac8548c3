"""Trace the step functions into FX graphs and write them as ONNX.

The recipe DESIGN.md measured: ``make_fx`` with the core-aten decompositions (without them the
exported cross-entropy gradient loses the ``1/batch`` of ``nll_loss_backward``), symbolic shapes
so that no batch-dependent constant is frozen into the graph, then the dynamo ONNX exporter with
a dynamic batch axis. Tracer and exporter failures become ``ExportError`` subclasses with one
line of explanation.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch._decomp import core_aten_decompositions
from torch.fx.experimental.proxy_tensor import make_fx

from model_export.errors import DataDependentControlFlow, ExportError, UnsupportedOperator

__all__ = ["OPSET", "export_onnx", "trace"]

# Opset 18 runs on every onnxruntime >= 1.14, so on plain ORT 1.17 devices as well.
OPSET = 18

_DATA_DEPENDENT_MARKERS = (
    "data-dependent",
    "data dependent",
    "GuardOnDataDependentSymNode",
    "DataDependentOutputException",
    "DynamicOutputShapeException",
)


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]


def _classify(e: BaseException, what: str) -> ExportError:
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
    op = None
    for c in chain:
        msg = str(c)
        for marker in ("aten.", "aten::"):
            if marker in msg:
                tail = msg.split(marker, 1)[1]
                op = marker + "".join(ch for ch in tail[:60] if ch.isalnum() or ch in "._")
                break
        if op:
            break
    return UnsupportedOperator(
        f"{what}: {('operator ' + op + ' ') if op else ''}cannot be exported "
        f"({type(e).__name__}: {_first_line(e)})"
    )


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporters print progress and warnings meant for interactive use."""
    loggers = [logging.getLogger(n) for n in ("torch", "onnxscript", "torch.onnx", "torch.export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def trace(
    fn: Callable[..., object], args: Sequence[torch.Tensor], what: str
) -> torch.fx.GraphModule:
    """Trace ``fn`` to core-aten ops with symbolic shapes."""
    try:
        with _quiet():
            return make_fx(
                fn,
                decomposition_table=core_aten_decompositions(),
                tracing_mode="symbolic",
            )(*args)
    except ExportError:
        raise
    except Exception as e:
        raise _classify(e, what) from e


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
        with _quiet():
            program = torch.onnx.export(
                gm,
                tuple(args),
                dynamo=True,
                dynamic_shapes=dynamic,
                input_names=list(input_names),
                output_names=list(output_names),
                opset_version=OPSET,
                external_data=False,
                verbose=False,
            )
            assert program is not None
            program.save(str(path), external_data=False)
    except ExportError:
        raise
    except Exception as e:
        raise _classify(e, what) from e

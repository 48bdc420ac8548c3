"""Why a model cannot be exported: one small exception per cause, all under ``ExportError``.

::

    ExportError                  anything the exporter refuses (message is one line)
    ├── ModelNotFound            MODEL spec: missing file, module or attribute
    ├── NotAModule               the spec resolves to something that is not an nn.Module
    ├── LossMismatch             the model's output (or target) does not fit the chosen loss
    ├── DataDependentControlFlow Python control flow on tensor values (if x.sum() > 0: ...)
    ├── UnsupportedOperator      an op that standard ONNX (or TFLite builtins) cannot express
    └── UnsupportedModel         other structural limits (mutated buffers, no parameters, ...)
"""

from __future__ import annotations

__all__ = [
    "DataDependentControlFlow",
    "ExportError",
    "LossMismatch",
    "ModelNotFound",
    "NotAModule",
    "UnsupportedModel",
    "UnsupportedOperator",
]


class ExportError(Exception):
    """The model cannot be exported; the message says why in one line."""


class ModelNotFound(ExportError):
    pass


class NotAModule(ExportError):
    pass


class LossMismatch(ExportError):
    pass


class DataDependentControlFlow(ExportError):
    pass


class UnsupportedOperator(ExportError):
    pass


class UnsupportedModel(ExportError):
    pass

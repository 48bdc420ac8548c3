"""fedge model export: a PyTorch module in, a training bundle out (authoring host only).

Owns: tracing the portable train step, ONNX/TFLite/ORT-artifact generation, the manifest
writer, and the demo models. Imports torch; may import ``edge_sdk.bundle`` for the manifest
format. Must not import ``coordinator``. Nothing on a device imports this package.
"""

from __future__ import annotations

from model_export.bundle_writer import export_bundle
from model_export.errors import (
    DataDependentControlFlow,
    ExportError,
    LossMismatch,
    ModelNotFound,
    NotAModule,
    UnsupportedModel,
    UnsupportedOperator,
)
from model_export.loading import load_model

__all__ = [
    "DataDependentControlFlow",
    "ExportError",
    "LossMismatch",
    "ModelNotFound",
    "NotAModule",
    "UnsupportedModel",
    "UnsupportedOperator",
    "export_bundle",
    "load_model",
]

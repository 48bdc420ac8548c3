"""fedge model export: a PyTorch module in, a training bundle out (authoring host only).

Owns: tracing the portable train step, ONNX/TFLite/ORT-artifact generation, the manifest
writer, and the demo models. Imports torch; may import ``edge_sdk.bundle`` for the manifest
format. Must not import ``coordinator``. Nothing on a device imports this package.
"""

from __future__ import annotations

import importlib
from typing import Any

# Lazy: ``model_export.config`` (the CLI's choices) must not pull in torch.
_EXPORTS = {
    "export_bundle": "model_export.bundle_writer",
    "load_model": "model_export.loading",
    **{
        name: "model_export.errors"
        for name in (
            "DataDependentControlFlow",
            "ExportError",
            "LossMismatch",
            "ModelNotFound",
            "NotAModule",
            "UnsupportedModel",
            "UnsupportedOperator",
        )
    },
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'model_export' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)

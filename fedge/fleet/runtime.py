"""The fleet's training runtime without torch.

The development environment's ``onnxruntime`` module is ``onnxruntime-training``: importing it
runs a package check that imports ``onnxruntime.training``, which imports torch (about 280 MB
and 5 s per process). The ``ort-step`` and ``litert-step`` backends never need that part, so a
fleet process imports ORT with ``onnxruntime.training`` held out: the check then finds no
training module and the inference API (``InferenceSession``, IO binding) loads alone. Later
explicit imports of ``onnxruntime.training`` still work (they pay for torch then).
"""

from __future__ import annotations

import importlib.util
import sys

__all__ = ["TORCH_FREE_BACKENDS", "import_ort_without_training"]

# Backends whose runtime never needs torch (``ort-training`` is ORT's training API itself).
TORCH_FREE_BACKENDS = ("ort-step", "litert-step")

_HELD_OUT = "onnxruntime.training"


def import_ort_without_training() -> bool:
    """Import ``onnxruntime`` without its training package; False if ORT is not installed or
    was already imported (then whatever it pulled in is already there)."""
    if "onnxruntime" in sys.modules or importlib.util.find_spec("onnxruntime") is None:
        return False
    # A None entry in sys.modules makes that import raise ImportError, which ORT's package
    # check takes as "no training module"; the entry is removed again right after.
    placed = _HELD_OUT not in sys.modules
    if placed:
        sys.modules[_HELD_OUT] = None  # type: ignore[assignment]
    try:
        import onnxruntime  # noqa: F401
    finally:
        if placed and sys.modules.get(_HELD_OUT, 0) is None:
            del sys.modules[_HELD_OUT]
    return True

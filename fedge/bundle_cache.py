"""Exported bundles on the authoring host, cached on disk: one export serves every caller.

``fedge demo``, the tests' fixtures, the benchmarks and ``scripts/arm`` all want the demo
model's bundle (and tests a few others); :func:`cached_bundle` exports once per exporter
version and arguments (:func:`model_export.cache.cached_export`) and returns the directory::

    path = digits_bundle(tflite=True)            # DigitsMLP, SGD lr 0.05, cross-entropy
    path = cached_bundle("model_export.models:DigitsCNN", input_shape=(1, 1, 8, 8))

Imports the exporter (torch) only when called: authoring-host code, never a device's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["DIGITS_BUNDLE_ARGS", "DIGITS_MODEL", "REPO_CACHE", "cached_bundle", "digits_bundle"]

# In a source checkout (tests, benchmarks, scripts): .cache/ is git-ignored.
REPO_CACHE = Path(__file__).resolve().parents[1] / ".cache" / "bundles"
DIGITS_MODEL = "model_export.models:DigitsMLP"
DIGITS_BUNDLE_ARGS: dict[str, Any] = {
    "input_shape": (1, 64),
    "loss": "cross_entropy",
    "optimizer": "sgd",
    "lr": 0.05,
}


def cached_bundle(model: str, *, cache_dir: Path = REPO_CACHE, **export_args: Any) -> Path:
    """``export_bundle(model, DIR, **export_args)`` once per key under ``cache_dir``."""
    from model_export.cache import cached_export

    return cached_export(model, cache_dir, **export_args)


def digits_bundle(*, cache_dir: Path = REPO_CACHE, **extra_args: Any) -> Path:
    """The demo model's bundle (:data:`DIGITS_BUNDLE_ARGS`, overridden by ``extra_args``)."""
    return cached_bundle(DIGITS_MODEL, cache_dir=cache_dir, **{**DIGITS_BUNDLE_ARGS, **extra_args})

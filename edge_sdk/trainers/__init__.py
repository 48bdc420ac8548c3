"""Training runtimes behind one interface: ``load_trainer(bundle_dir, backend=None)``.

Backends, in the order ``backend=None`` tries them (first installed one the bundle supports):

1. ``ort-step``: the portable step graph on plain onnxruntime. Fastest measured (see
   docs/benchmarks.md), any batch size, every optimizer and FedProx, and onnxruntime exists for
   x86, aarch64, Android and iOS.
2. ``litert-step``: the same step converted to TFLite on ai-edge-litert. Everything ort-step
   does, but the TFLite graphs have a fixed batch (shorter batches are padded and masked);
   for devices that have LiteRT but not onnxruntime.
3. ``ort-training``: onnxruntime-training 1.19.2 artifacts. x86_64 only, the last release,
   importing it pulls torch; no SGD momentum/weight decay, no FedProx. Last resort.

Runtimes are imported only when a trainer is made, so this package imports with numpy alone.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

from edge_sdk.bundle import Manifest, verify_bundle
from edge_sdk.trainers.base import BundleNotSupported, Trainer

__all__ = ["BACKENDS", "BundleNotSupported", "Trainer", "available_backends", "load_trainer"]

BACKENDS = ("ort-step", "litert-step", "ort-training")


def _has_distribution(name: str) -> bool:
    try:
        importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _installed(backend: str) -> bool:
    if backend == "ort-step":
        return importlib.util.find_spec("onnxruntime") is not None
    if backend == "litert-step":
        return importlib.util.find_spec("ai_edge_litert") is not None
    return _has_distribution("onnxruntime-training")


def available_backends() -> tuple[str, ...]:
    """The backends whose runtime is installed, in preference order."""
    return tuple(b for b in BACKENDS if _installed(b))


def _make(backend: str, bundle_dir: Path, manifest: Manifest) -> Trainer:
    if backend == "ort-step":
        from edge_sdk.trainers.ort_step import OrtStepTrainer

        return OrtStepTrainer(bundle_dir, manifest)
    if backend == "litert-step":
        from edge_sdk.trainers.litert_step import LiteRTStepTrainer

        return LiteRTStepTrainer(bundle_dir, manifest)
    from edge_sdk.trainers.ort_training import OrtTrainingTrainer

    return OrtTrainingTrainer(bundle_dir, manifest)


def load_trainer(bundle_dir: Path | str, backend: str | None = None) -> Trainer:
    """A trainer for the bundle in ``bundle_dir`` (its files checked against the manifest).

    ``backend=None`` picks the first installed backend in ``BACKENDS`` that the bundle supports.
    Raises ``BundleError`` for a bad bundle, ``BundleNotSupported`` if the named backend (or
    every installed one) cannot run it, ``ValueError`` for an unknown backend name.
    """
    bundle_dir = Path(bundle_dir)
    manifest = verify_bundle(bundle_dir)
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
        ok, reason = manifest.backend_support(backend)
        if not ok:
            raise BundleNotSupported(
                f"{backend} cannot run bundle {manifest.bundle_id[:12]}: {reason}"
            )
        if not _installed(backend):
            raise BundleNotSupported(f"{backend} is not installed on this device")
        return _make(backend, bundle_dir, manifest)
    reasons = []
    for name in BACKENDS:
        ok, reason = manifest.backend_support(name)
        if not ok:
            reasons.append(f"{name}: {reason}")
        elif not _installed(name):
            reasons.append(f"{name}: not installed")
        else:
            return _make(name, bundle_dir, manifest)
    raise BundleNotSupported(
        "no installed backend can run this bundle (" + "; ".join(reasons) + ")"
    )

"""Exports cached on disk, keyed by the exporter's own sources and the export arguments.

An export takes seconds (tens with TFLite); tests and benchmarks ask for the same bundles
again and again. A change to ``model_export/``, ``edge_sdk/bundle.py``, the model's own source
file or the exporting packages' versions changes the key, so a stale bundle is never served::

    path = cached_export("model_export.models:DigitsMLP", Path(".cache/bundles"),
                         input_shape=(1, 64), lr=0.05)
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["cached_export", "export_key", "source_digest"]

_ROOT = Path(__file__).resolve().parents[1]


def source_digest() -> str:
    """sha256 over the exporter's sources and the manifest format module."""
    h = hashlib.sha256()
    files = [*sorted((_ROOT / "model_export").rglob("*.py")), _ROOT / "edge_sdk" / "bundle.py"]
    for path in files:
        h.update(str(path.relative_to(_ROOT)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


# What writes the graphs: a new release may trace or convert differently.
_EXPORTER_DISTRIBUTIONS = ("torch", "onnx", "onnxscript", "onnxruntime-training", "litert-torch")


def _exporter_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in _EXPORTER_DISTRIBUTIONS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _model_digest(model: str) -> str | None:
    """sha256 of the model's source file (a model outside ``model_export/`` is no part of
    :func:`source_digest`); None if the spec names none (export_bundle then says why)."""
    from model_export.loading import model_file

    path = model_file(model)
    if path is None or not path.is_file():
        return None
    return hashlib.sha256(path.read_bytes()).hexdigest()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Several processes (parallel test runs, benchmarks) may want one bundle at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def export_key(model: str, **export_args: Any) -> str:
    """The cache key of ``export_bundle(model, ..., **export_args)``: everything that decides
    the bundle's content."""
    key_doc = json.dumps(
        {
            "model": model,
            "args": export_args,
            "sources": source_digest(),
            "model_source": _model_digest(model),
            "versions": _exporter_versions(),
        },
        sort_keys=True,
        default=list,
    )
    return hashlib.sha256(key_doc.encode()).hexdigest()[:24]


def cached_export(model: str, cache_dir: Path, **export_args: Any) -> Path:
    """``export_bundle(model, DIR, **export_args)`` once per key; the bundle's directory."""
    from model_export.bundle_writer import export_bundle

    out = Path(cache_dir) / export_key(model, **export_args)
    with _locked(out.with_name(out.name + ".lock")):
        if not (out / "manifest.json").is_file():
            export_bundle(model, out, **export_args)
    return out

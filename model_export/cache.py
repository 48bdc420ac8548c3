"""Exports cached on disk, keyed by the exporter's own sources and the export arguments.

An export takes seconds (tens with TFLite); tests and benchmarks ask for the same bundles
again and again. A change to ``model_export/`` or ``edge_sdk/bundle.py`` changes the key, so a
stale bundle is never served::

    path = cached_export("model_export.models:DigitsMLP", Path(".cache/bundles"),
                         input_shape=(1, 64), lr=0.05)
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["cached_export", "source_digest"]

_ROOT = Path(__file__).resolve().parents[1]


def source_digest() -> str:
    """sha256 over the exporter's sources and the manifest format module."""
    h = hashlib.sha256()
    files = [*sorted((_ROOT / "model_export").rglob("*.py")), _ROOT / "edge_sdk" / "bundle.py"]
    for path in files:
        h.update(str(path.relative_to(_ROOT)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


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


def cached_export(model: str, cache_dir: Path, **export_args: Any) -> Path:
    """``export_bundle(model, DIR, **export_args)`` once per key; the bundle's directory."""
    from model_export.bundle_writer import export_bundle

    key_doc = json.dumps(
        {"model": model, "args": export_args, "sources": source_digest()},
        sort_keys=True,
        default=list,
    )
    out = Path(cache_dir) / hashlib.sha256(key_doc.encode()).hexdigest()[:24]
    with _locked(out.with_name(out.name + ".lock")):
        if not (out / "manifest.json").is_file():
            export_bundle(model, out, **export_args)
    return out

"""Resolve a MODEL spec (``path/to/file.py:Name`` or ``package.module:Name``) to an nn.Module.

``Name`` is an ``nn.Module`` subclass or a zero-argument factory returning a module::

    >>> load_model("model_export.models:DigitsMLP")
    DigitsMLP(...)
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

from torch import nn

from model_export.errors import ExportError, ModelNotFound, NotAModule

__all__ = ["load_model", "model_file", "resolve_spec"]


def _import_file(path: Path) -> Any:
    if not path.is_file():
        raise ModelNotFound(f"model file {path} does not exist")
    # A name unique per file so two files called model.py do not shadow each other.
    name = "fedge_user_model_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ModelNotFound(f"cannot import {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise ModelNotFound(f"importing {path} failed: {type(e).__name__}: {e}") from e
    return module


def _is_file_target(target: str) -> bool:
    return target.endswith(".py") or "/" in target or "\\" in target


def spec_label(spec: str) -> str:
    """``spec`` as a manifest records it: a file target by its file name alone, so that the
    bundle id (a hash of the manifest) is the same however and wherever the path was typed."""
    target, _, attr = spec.rpartition(":")
    if not _is_file_target(target):
        return spec
    return f"{Path(target).name}:{attr}"


def model_file(spec: str) -> Path | None:
    """The source file that defines the module ``spec`` names, found without running it (the
    parent packages are imported), or None if there is none."""
    target = spec.rpartition(":")[0]
    if _is_file_target(target):
        return Path(target)
    try:
        found = importlib.util.find_spec(target)
    except (ImportError, ValueError):
        return None
    return Path(found.origin) if found is not None and found.origin else None


def resolve_spec(spec: str) -> Any:
    """The object ``spec`` names (not yet instantiated)."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise ModelNotFound(
            f"model spec {spec!r} must be path/to/file.py:Name or package.module:Name"
        )
    if _is_file_target(target):
        module = _import_file(Path(target))
    else:
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as e:
            raise ModelNotFound(f"no module named {e.name!r} (from model spec {spec!r})") from e
        except Exception as e:
            raise ModelNotFound(f"importing {target} failed: {type(e).__name__}: {e}") from e
    obj = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ModelNotFound(f"{target} has no attribute {attr!r}") from None
    return obj


def load_model(spec: str | nn.Module | Any) -> nn.Module:
    """An nn.Module from a spec string, a module class, a zero-argument factory or a module."""
    obj = resolve_spec(spec) if isinstance(spec, str) else spec
    if isinstance(obj, nn.Module):
        return obj
    label = spec if isinstance(spec, str) else getattr(obj, "__name__", repr(obj))
    if not callable(obj):
        raise NotAModule(f"{label} is a {type(obj).__name__}, not an nn.Module class or factory")
    try:
        model = obj()
    except TypeError as e:
        raise NotAModule(f"{label} cannot be called without arguments: {e}") from e
    except Exception as e:
        raise ExportError(f"{label}() failed: {type(e).__name__}: {e}") from e
    if not isinstance(model, nn.Module):
        raise NotAModule(f"{label}() returned a {type(model).__name__}, not an nn.Module")
    return model

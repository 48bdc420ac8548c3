"""The package's public names resolve, and its light modules do not drag torch in."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import model_export

ROOT = Path(__file__).resolve().parents[2]


def test_public_names_resolve() -> None:
    for name in model_export.__all__:
        assert getattr(model_export, name) is not None
    with pytest.raises(AttributeError):
        _ = model_export.nothing_here  # type: ignore[attr-defined]


@pytest.mark.parametrize("module", ["model_export.config", "edge_sdk.trainers", "edge_sdk.bundle"])
def test_light_modules_import_without_torch(module: str) -> None:
    code = f"import sys, {module}; print('torch' in sys.modules, 'onnxruntime' in sys.modules)"
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert run.stdout.split() == ["False", "False"]

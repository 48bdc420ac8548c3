"""MODEL specs: files, packages, classes, factories, and every way they can be wrong."""

from __future__ import annotations

from pathlib import Path

import pytest
from torch import nn

from model_export.errors import ExportError, ModelNotFound, NotAModule
from model_export.loading import load_model
from model_export.models import DigitsMLP

BAD = Path(__file__).with_name("bad_models.py")


def test_package_spec_class() -> None:
    assert isinstance(load_model("model_export.models:DigitsMLP"), DigitsMLP)


def test_file_spec_factory() -> None:
    model = load_model(f"{BAD}:make_linear")
    assert isinstance(model, nn.Linear) and model.in_features == 8


def test_module_instance_and_class_pass_through() -> None:
    m = DigitsMLP()
    assert load_model(m) is m
    assert isinstance(load_model(DigitsMLP), DigitsMLP)


@pytest.mark.parametrize(
    ("spec", "error", "match"),
    [
        ("no_colon_here", ModelNotFound, "must be path/to/file.py:Name"),
        ("/nonexistent/model.py:Net", ModelNotFound, "does not exist"),
        ("no_such_package.models:Net", ModelNotFound, "no module named 'no_such_package'"),
        ("model_export.models:Missing", ModelNotFound, "has no attribute 'Missing'"),
        (f"{BAD}:Missing", ModelNotFound, "has no attribute 'Missing'"),
        (f"{BAD}:NOT_CALLABLE", NotAModule, "not an nn.Module class or factory"),
        (f"{BAD}:not_a_module", NotAModule, "returned a int"),
        (f"{BAD}:needs_arguments", NotAModule, "cannot be called without arguments"),
    ],
)
def test_bad_specs(spec: str, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        load_model(spec)


def test_file_that_fails_to_import(tmp_path: Path) -> None:
    broken = tmp_path / "broken.py"
    broken.write_text("import torch\nraise RuntimeError('boom')\n")
    with pytest.raises(ModelNotFound, match=r"importing .*broken\.py failed: RuntimeError: boom"):
        load_model(f"{broken}:Net")


def test_factory_that_raises(tmp_path: Path) -> None:
    path = tmp_path / "net.py"
    path.write_text("def make():\n    raise RuntimeError('no weights here')\n")
    with pytest.raises(ExportError, match=r"make\(\) failed: RuntimeError: no weights here"):
        load_model(f"{path}:make")

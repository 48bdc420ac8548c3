"""The export cache key: every input that decides a bundle's content is part of it."""

from __future__ import annotations

from pathlib import Path

from model_export.cache import export_key

MODEL = """from torch import nn


class Net(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(nn.Linear(4, {width}), nn.ReLU(), nn.Linear({width}, 2))
"""


def test_key_follows_the_model_file_outside_model_export(tmp_path: Path) -> None:
    path = tmp_path / "net.py"
    spec = f"{path}:Net"
    path.write_text(MODEL.format(width=3))
    first = export_key(spec, input_shape=(1, 4), lr=0.1)
    assert export_key(spec, input_shape=(1, 4), lr=0.1) == first
    path.write_text(MODEL.format(width=5))  # same spec, different model
    assert export_key(spec, input_shape=(1, 4), lr=0.1) != first


def test_key_follows_the_arguments_and_a_module_spec() -> None:
    spec = "model_export.models:DigitsMLP"
    assert export_key(spec, lr=0.1) == export_key(spec, lr=0.1)
    assert export_key(spec, lr=0.1) != export_key(spec, lr=0.2)
    assert export_key(spec, lr=0.1) != export_key("model_export.models:WideMLP", lr=0.1)

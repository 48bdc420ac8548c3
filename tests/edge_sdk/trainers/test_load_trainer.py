"""Backend choice: the named backend or the best installed one the bundle supports."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import edge_sdk.trainers as trainers
from edge_sdk.bundle import BundleError, bundle_id_of
from edge_sdk.trainers import BACKENDS, BundleNotSupported, available_backends, load_trainer
from tests.edge_sdk.trainers.trainer_suite import CASES
from tests.fixtures.bundles import cached_bundle


def test_default_is_the_portable_step_on_onnxruntime(digits_bundle: Path) -> None:
    assert available_backends()[0] == "ort-step"
    assert load_trainer(digits_bundle).backend == "ort-step"


def test_order_skips_backends_that_are_missing_or_refuse(
    digits_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A device without plain onnxruntime: the digits bundle has no TFLite files, so the
    # choice falls through litert-step to ort-training.
    monkeypatch.setattr(trainers, "_installed", lambda b: b != "ort-step")
    assert load_trainer(digits_bundle).backend == "ort-training"
    monkeypatch.setattr(trainers, "_installed", lambda b: b == "litert-step")
    with pytest.raises(BundleNotSupported, match=r"litert-step: exported without TFLite"):
        load_trainer(digits_bundle)


def test_named_backend_that_the_bundle_cannot_run(digits_bundle: Path) -> None:
    with pytest.raises(BundleNotSupported, match="--tflite"):
        load_trainer(digits_bundle, backend="litert-step")
    spec, args = CASES["mlp-sgd-momentum-wd"]
    with pytest.raises(BundleNotSupported, match="momentum"):
        load_trainer(cached_bundle(spec, **args), backend="ort-training")
    with pytest.raises(ValueError, match="unknown backend"):
        load_trainer(digits_bundle, backend="tensorflow")


def test_a_bundle_that_does_not_match_its_manifest_is_not_loaded(
    digits_bundle: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "b"
    shutil.copytree(digits_bundle, copy)
    with open(copy / "step.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match=r"step\.onnx"):
        load_trainer(copy)
    with pytest.raises(BundleError, match=r"no manifest\.json"):
        load_trainer(tmp_path)


def test_backend_names() -> None:
    assert BACKENDS == ("ort-step", "litert-step", "ort-training")
    assert set(available_backends()) <= set(BACKENDS)


def test_a_bundle_from_an_older_exporter_gets_a_clear_error(
    digits_bundle: Path, tmp_path: Path
) -> None:
    # Bundles exported before the FedProx graph was split off have no step_prox_onnx.
    copy = tmp_path / "old"
    shutil.copytree(digits_bundle, copy)
    raw = json.loads((copy / "manifest.json").read_text())
    del raw["graphs"]["step_prox_onnx"]
    raw["bundle_id"] = bundle_id_of(raw)
    (copy / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError, match=r"no step_prox_onnx graph; re-export"):
        load_trainer(copy, backend="ort-step")

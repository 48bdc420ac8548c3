"""export_bundle: the manifest and files it writes, and every model it must refuse."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from edge_sdk.bundle import BundleError, bundle_id_of, load_manifest, sha256_file, verify_bundle
from edge_sdk.trainers import BundleNotSupported, load_trainer
from model_export import (
    DataDependentControlFlow,
    LossMismatch,
    UnsupportedModel,
    UnsupportedOperator,
    export_bundle,
)
from model_export.models import BackboneHead, DigitsMLP
from tests.edge_sdk.trainers.trainer_suite import CASES
from tests.fixtures.bundles import cached_bundle

BAD = Path(__file__).with_name("bad_models.py")


def _flat(tensors: list[torch.Tensor]) -> np.ndarray:
    return torch.cat([t.detach().reshape(-1) for t in tensors]).numpy()


def test_digits_manifest_matches_the_model(digits_bundle: Path) -> None:
    manifest = verify_bundle(digits_bundle)
    raw = manifest.raw
    torch.manual_seed(0)  # export_bundle's default seed
    model = DigitsMLP()
    named = list(model.named_parameters())
    assert [(p["name"], tuple(p["shape"])) for p in raw["parameters"]] == [
        (n, tuple(t.shape)) for n, t in named
    ]
    assert raw["parameters"][2]["offset"] == 32 * 64 + 32
    assert raw["num_parameters"] == 2410 and raw["frozen"] == []
    params = np.fromfile(digits_bundle / "params.f32", dtype="<f4")
    np.testing.assert_array_equal(params, _flat([t for _, t in named]))
    assert raw["input"] == {"shape": [None, 64], "dtype": "float32"}
    assert raw["target"] == {"shape": [None], "dtype": "int64"}
    assert (raw["task"], raw["num_classes"], raw["loss"]) == ("classification", 10, "cross_entropy")
    assert raw["optimizer"] == {
        "name": "sgd",
        "lr": 0.05,
        "momentum": 0.0,
        "dampening": 0.0,
        "weight_decay": 0.0,
        "nesterov": False,
    }
    assert raw["bundle_id"] == bundle_id_of(raw)
    on_disk = {
        p.relative_to(digits_bundle).as_posix() for p in digits_bundle.rglob("*") if p.is_file()
    } - {"manifest.json"}
    assert set(raw["files"]) == on_disk
    assert {"step.onnx", "eval.onnx", "infer.onnx", "params.f32", "ort/checkpoint"} <= on_disk
    for name, meta in raw["files"].items():
        assert meta["sha256"] == sha256_file(digits_bundle / name)
    assert raw["backends"]["ort-step"]["supported"] is True
    assert raw["backends"]["ort-training"]["supported"] is True
    assert raw["backends"]["litert-step"]["supported"] is False


@pytest.mark.parametrize("graph", ["step", "step_prox"])
def test_step_graph_has_a_dynamic_batch_and_runs_on_ort_1_17(
    digits_bundle: Path, graph: str
) -> None:
    model = onnx.load(str(digits_bundle / f"{graph}.onnx"))
    # ORT 1.17 reads IR <= 9 and opset <= 20; ORT-training 1.19.2 rejects IR > 10.
    assert model.ir_version <= 9
    assert all(o.version <= 20 for o in model.opset_import if o.domain in ("", "ai.onnx"))
    inputs = {i.name: i.type.tensor_type.shape.dim for i in model.graph.input}
    raw = load_manifest(digits_bundle).raw
    assert list(inputs) == raw["signatures"][graph]["inputs"]
    assert [o.name for o in model.graph.output] == raw["signatures"][graph]["outputs"]
    assert inputs["x"][0].dim_param and inputs["y"][0].dim_param  # symbolic batch
    # one input per trainable parameter, of its own shape (DigitsMLP: 64-32-10)
    shapes = {"fc1.weight": [32, 64], "fc1.bias": [32], "fc2.weight": [10, 32], "fc2.bias": [10]}
    assert [p["name"] for p in raw["parameters"]] == list(shapes)
    for name, shape in shapes.items():
        assert [d.dim_value for d in inputs[f"params.{name}"]] == shape
        if graph == "step_prox":
            assert [d.dim_value for d in inputs[f"anchor.{name}"]] == shape
    assert ("mu" in inputs) == (graph == "step_prox")
    onnx.checker.check_model(model)


def test_tampered_bundle_is_rejected(digits_bundle: Path, tmp_path: Path) -> None:
    copy = tmp_path / "b"
    shutil.copytree(digits_bundle, copy)
    data = bytearray((copy / "params.f32").read_bytes())
    data[0] ^= 1
    (copy / "params.f32").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"params\.f32"):
        verify_bundle(copy)
    raw = json.loads((copy / "manifest.json").read_text())
    raw["optimizer"]["lr"] = 1.0  # edited manifest: the id no longer matches
    (copy / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="bundle_id"):
        load_manifest(copy)


@pytest.mark.parametrize(
    ("key", "value"),
    [("initial_parameters", "../outside.f32"), ("graphs", {"step_onnx": "/etc/step.onnx"})],
)
def test_a_manifest_pointing_outside_its_file_list_is_rejected(
    digits_bundle: Path, tmp_path: Path, key: str, value: object
) -> None:
    copy = tmp_path / "b"
    shutil.copytree(digits_bundle, copy)
    raw = json.loads((copy / "manifest.json").read_text())
    raw[key] = {**raw[key], **value} if isinstance(value, dict) else value
    raw["bundle_id"] = bundle_id_of(raw)  # a self-consistent manifest: only the check stops it
    (copy / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="do not list"):
        verify_bundle(copy)


@pytest.mark.parametrize(
    "entry", [{"sha256": "0" * 64}, "0" * 64, {"sha256": "0" * 64, "bytes": "many"}]
)
def test_a_malformed_file_entry_is_a_bundle_error(
    digits_bundle: Path, tmp_path: Path, entry: object
) -> None:
    """A self-consistent manifest whose files entry is not {sha256, bytes}: refused as a bad
    bundle (BundleError, what load_trainer promises), not a KeyError or TypeError."""
    raw = json.loads((digits_bundle / "manifest.json").read_text())
    bad = _rewrite(digits_bundle, tmp_path / "b", {"files": {**raw["files"], "params.f32": entry}})
    with pytest.raises(BundleError, match=r"params\.f32"):
        verify_bundle(bad)


def test_frozen_parameters_are_listed_separately() -> None:
    spec, args = CASES["frozen-backbone-adamw"]
    bundle = cached_bundle(spec, **args)
    raw = verify_bundle(bundle).raw
    torch.manual_seed(0)
    model = BackboneHead()
    named = dict(model.named_parameters())
    assert [p["name"] for p in raw["parameters"]] == ["head.weight", "head.bias"]
    assert [p["name"] for p in raw["frozen"]] == [n for n in named if n.startswith("backbone.")]
    assert raw["num_parameters"] == 16 * 10 + 10
    frozen = np.fromfile(bundle / raw["frozen_parameters"], dtype="<f4")
    np.testing.assert_array_equal(frozen, _flat([named[p["name"]] for p in raw["frozen"]]))


def test_parameters_the_model_sets_requires_grad_false_on_stay_frozen(tmp_path: Path) -> None:
    """The ordinary way to freeze a backbone in torch: requires_grad_(False) on its parameters.
    torch's optimizer leaves them as they are; so must the bundle (without any --freeze)."""
    torch.manual_seed(0)
    model = BackboneHead()
    model.backbone.requires_grad_(False)
    raw = export_bundle(model, tmp_path / "b", ort_training=False).raw
    assert [p["name"] for p in raw["parameters"]] == ["head.weight", "head.bias"]
    backbone = [n for n, _ in model.named_parameters() if n.startswith("backbone.")]
    assert [p["name"] for p in raw["frozen"]] == backbone
    x, y = np.random.default_rng(0).normal(size=(4, 64)).astype(np.float32), np.array([1, 2, 3, 4])
    trainer = load_trainer(tmp_path / "b", backend="ort-step")
    trainer.train_step(x, y)
    reference = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    torch.nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y)).backward()
    reference.step()
    np.testing.assert_allclose(
        trainer.get_parameters(), _flat([model.head.weight, model.head.bias]), rtol=1e-5, atol=1e-6
    )


class _UnusedHead(torch.nn.Module):
    """A head the forward pass does not use (an auxiliary or old head kept in the model)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(8, 3)
        self.aux = torch.nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def test_parameters_no_output_depends_on_stay_as_torch_leaves_them(tmp_path: Path) -> None:
    """torch.optim skips a parameter whose gradient is None: AdamW neither decays it nor
    counts a step for it. So must the bundle's step (and its delta)."""
    torch.manual_seed(0)
    model = _UnusedHead()
    raw = export_bundle(model, tmp_path / "b", input_shape=(1, 8), optimizer="adamw", lr=0.1).raw
    x, y = np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32), np.array([0, 1, 2, 0])
    trainer = load_trainer(tmp_path / "b", backend="ort-step")
    trainer.train_step(x, y)
    reference = torch.optim.AdamW(model.parameters(), lr=0.1)
    torch.nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y)).backward()
    reference.step()
    named = dict(model.named_parameters())
    want = _flat([named[p["name"]] for p in raw["parameters"]])
    np.testing.assert_allclose(trainer.get_parameters(), want, rtol=1e-5, atol=1e-6)
    assert [p["name"] for p in raw["frozen"]] == ["aux.weight", "aux.bias"]


def test_optimizers_ort_cannot_express_are_marked_in_the_manifest() -> None:
    spec, args = CASES["mlp-sgd-momentum-wd"]
    raw = load_manifest(cached_bundle(spec, **args)).raw
    entry = raw["backends"]["ort-training"]
    assert entry["supported"] is False and "momentum" in entry["reason"]
    assert raw["backends"]["ort-step"]["supported"] is True
    assert raw["optimizer_state"] == [{"name": "momentum_buffer", "shape": [2410]}]


def test_exporting_the_same_model_twice_gives_the_same_bundle(tmp_path: Path) -> None:
    """In one process too (a notebook, a service, a test run exporting many bundles): the
    bundle id is a content hash that caches and the coordinator key on."""
    first, second = (
        export_bundle("model_export.models:DigitsMLP", tmp_path / name, lr=0.05)
        for name in ("a", "b")
    )
    assert second.files == first.files
    assert second.bundle_id == first.bundle_id


def test_the_bundle_id_does_not_depend_on_how_the_model_files_path_was_typed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "net.py").write_text(
        "import torch.nn as nn\n\n"
        "class Net(nn.Sequential):\n"
        "    def __init__(self):\n"
        "        super().__init__(nn.Linear(4, 3))\n"
    )
    monkeypatch.chdir(tmp_path)
    spellings = ["models/net.py:Net", "./models/../models/net.py:Net",
                 f"{tmp_path}/models/net.py:Net"]  # fmt: skip
    bundles = [
        export_bundle(spec, tmp_path / f"b{i}", ort_training=False)
        for i, spec in enumerate(spellings)
    ]
    assert {b.bundle_id for b in bundles} == {bundles[0].bundle_id}
    assert bundles[0].raw["model"]["source"] == "net.py:Net"
    # a module spec is recorded as it is
    assert export_bundle(
        "model_export.models:DigitsMLP", tmp_path / "m", ort_training=False
    ).raw["model"]["source"] == "model_export.models:DigitsMLP"


def test_input_shape_defaults_from_a_first_linear(tmp_path: Path) -> None:
    m = export_bundle(DigitsMLP(), tmp_path / "b", ort_training=False)
    assert m.raw["input"]["shape"] == [None, 64]
    with pytest.raises(ValueError, match="--input-shape"):
        export_bundle("model_export.models:DigitsCNN", tmp_path / "c")


@pytest.mark.parametrize(
    ("model", "kwargs", "error", "match"),
    [
        ("DataDependent", {}, DataDependentControlFlow, "data-dependent control flow"),
        ("UnsupportedOp", {"loss": "mse"}, UnsupportedOperator, "bessel_j0"),
        ("TupleOutput", {}, LossMismatch, "returns a tuple"),
        ("OneLogit", {}, LossMismatch, r"cross_entropy needs logits of shape \(batch, classes"),
        ("UnsupportedLayer", {}, UnsupportedOperator, r"layer 'act' \(Bessel\).*bessel_j0"),
        ("CumulativeBatchNorm", {}, UnsupportedModel, r"layer 'bn' \(BatchNorm1d\): momentum=None"),
        ("CountsCalls", {}, UnsupportedModel, "updates buffer 'calls'"),
        ("SelfNormalizing", {}, UnsupportedOperator, "alpha_dropout .*use nn.Dropout"),
        ("make_linear", {"input_shape": (1, 9)}, LossMismatch, "fails on an input of shape"),
        ("make_linear", {"freeze": ("nothing",)}, UnsupportedModel, "matches no parameter"),
        ("make_linear", {"freeze": ("weight", "bias")}, UnsupportedModel, "no trainable"),
        ("make_linear", {"loss": "hinge"}, ValueError, "unknown loss"),
        ("make_linear", {"input_dtype": "bfloat16"}, ValueError, "unsupported input dtype"),
    ],
)
def test_models_that_cannot_be_exported(
    tmp_path: Path, model: str, kwargs: dict, error: type[Exception], match: str
) -> None:
    out = tmp_path / "bundle"
    args = {"input_shape": (1, 8), "ort_training": False, **kwargs}
    with pytest.raises(error, match=match):
        export_bundle(f"{BAD}:{model}", out, **args)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no staging directory left behind


def test_failed_export_leaves_a_previous_bundle_untouched(
    digits_bundle: Path, tmp_path: Path
) -> None:
    out = tmp_path / "bundle"
    shutil.copytree(digits_bundle, out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(DataDependentControlFlow):
        export_bundle(f"{BAD}:DataDependent", out, input_shape=(1, 8))
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_exporting_over_the_bundle_in_the_current_directory(
    digits_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``cd bundle && fedge export ... --out .``: the new bundle replaces the old one."""
    out = tmp_path / "bundle"
    shutil.copytree(digits_bundle, out)
    monkeypatch.chdir(out)
    manifest = export_bundle(BackboneHead(), ".", ort_training=False)
    assert verify_bundle(out).bundle_id == manifest.bundle_id
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no staging left behind


def test_refuses_to_overwrite_a_directory_that_is_not_a_bundle(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds no bundle"):
        export_bundle(DigitsMLP(), tmp_path, ort_training=False)
    assert (tmp_path / "notes.txt").read_text() == "mine"


# -- each backend on its own ------------------------------------------------------------------


def _failing_converter(out_dir: Path, name: str) -> None:
    """Leaves a partial file behind, then fails, as a converter crashing midway would."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / name).write_bytes(b"partial")
    raise RuntimeError("converter crashed on op frobnicate")


def test_a_failing_optional_backend_is_recorded_and_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The export is about the portable step: ORT artifacts and TFLite failing are recorded in
    the manifest with the reason (partial files removed) and their trainers refuse with it."""
    import model_export.bundle_writer as writer
    import model_export.tflite as tflite

    monkeypatch.setattr(
        writer,
        "write_ort_artifacts",
        lambda model, x, out_dir, **kw: _failing_converter(out_dir / "ort", "training_model.onnx"),
    )
    monkeypatch.setattr(
        tflite,
        "write_tflite",
        lambda fns, args, out_dir, **kw: _failing_converter(out_dir, "step.tflite"),
    )
    out = tmp_path / "b"
    manifest = export_bundle(DigitsMLP(), out, tflite=True, ort_training=True)
    raw = manifest.raw
    for backend in ("ort-training", "litert-step"):
        entry = raw["backends"][backend]
        assert entry["supported"] is False
        assert "converter crashed on op frobnicate" in entry["reason"]
        with pytest.raises(BundleNotSupported, match="converter crashed on op frobnicate"):
            load_trainer(out, backend=backend)
    assert raw["graphs"]["ort_training"] is None and raw["graphs"]["step_tflite"] is None
    assert not (out / "ort").exists() and not (out / "step.tflite").exists()
    trainer = load_trainer(out)  # the portable step is whole
    assert trainer.backend == "ort-step"
    trainer.train_step(np.zeros((2, 64), np.float32), np.array([1, 2]))


# -- manifest format versions ---------------------------------------------------------------


def _rewrite(bundle: Path, out: Path, change: dict) -> Path:
    shutil.copytree(bundle, out)
    raw = json.loads((out / "manifest.json").read_text())
    for key, value in change.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    raw["bundle_id"] = bundle_id_of(raw)
    (out / "manifest.json").write_text(json.dumps(raw))
    return out


def test_a_format_1_bundle_still_loads_and_trains(digits_bundle: Path, tmp_path: Path) -> None:
    old = _rewrite(
        digits_bundle,
        tmp_path / "old",
        {
            "format_version": 1,
            "buffers": None,
            "num_trainable": None,
            "step_seed": None,
            "batchnorm_modules": None,
        },
    )
    manifest = verify_bundle(old)
    assert (manifest.buffers, manifest.num_trainable, manifest.step_seed) == ([], 2410, False)
    trainer = load_trainer(old, backend="ort-step")
    x, y = np.ones((3, 64), np.float32), np.array([0, 1, 2])
    fresh = load_trainer(digits_bundle, backend="ort-step")
    assert trainer.train_step(x, y) == fresh.train_step(x, y)
    np.testing.assert_array_equal(trainer.get_parameters(), fresh.get_parameters())


def test_a_newer_format_is_refused_with_a_clear_message(
    digits_bundle: Path, tmp_path: Path
) -> None:
    new = _rewrite(digits_bundle, tmp_path / "new", {"format_version": 3})
    with pytest.raises(BundleError, match=r"version 3 \(this SDK reads fedge-bundle versions 1, 2"):
        verify_bundle(new)

"""The model zoo (:mod:`model_export.zoo`) exported and trained on every backend that accepts it,
checked against torch autograd after several steps of several batch sizes, one of them 1.

Exports are slow (torch dynamo, tens of seconds per model on a shared machine) and cached per
exporter version (``tests/fixtures/bundles``). A representative subset runs by default (batch
norm state, integer inputs with a padding index, dropout seeds); the other families and the
four networks run with ``--slow``. The reference is torch in float64, so that the tolerance
measures the exporter and not float32 rounding, which differs between any two
implementations of the same layer (attention, recurrent layers, AdamW).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from edge_sdk.bundle import Manifest, load_manifest
from edge_sdk.trainers import BundleNotSupported, Trainer, load_trainer
from model_export.zoo import VOCAB
from tests.edge_sdk.trainers.reference import TorchReference
from tests.fixtures.bundles import cached_bundle

Z = "model_export.zoo:"
SGD: dict[str, Any] = {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9}
ADAMW: dict[str, Any] = {"optimizer": "adamw", "lr": 0.01}
# name -> (spec, export arguments, default suite?)
ZOO: dict[str, tuple[str, dict[str, Any], bool]] = {
    "batchnorm-mlp": (Z + "BatchNormMLP", {"input_shape": (1, 16), **SGD}, True),
    "embedding-bag": (
        Z + "EmbeddingBag",
        {"input_shape": (1, 6), "input_dtype": "int64", **SGD},
        True,
    ),
    "depthwise-cnn": (Z + "DepthwiseCNN", {"input_shape": (1, 4, 8, 8), **SGD}, False),
    "pooling-cnn": (Z + "PoolingCNN", {"input_shape": (1, 1, 9, 9), **ADAMW}, False),
    "conv-layernorm-gelu": (Z + "ConvNormGELU", {"input_shape": (1, 1, 6, 6), **ADAMW}, False),
    "gru-tagger": (Z + "GRUTagger", {"input_shape": (1, 5, 6), **SGD}, False),
    # SGD for attention: the key bias's gradient is 0 in exact arithmetic (softmax ignores a
    # per-row constant), so AdamW would scale float rounding noise (1e-9 vs 1e-17) up to lr
    "attention-pool": (Z + "AttentionPool", {"input_shape": (1, 5, 8), **SGD}, False),
    "mobilenet": (Z + "TinyMobileNet", {"input_shape": (1, 1, 8, 8), **SGD}, False),
    "keyword-spotter": (
        Z + "keyword_spotter_deterministic",
        {"input_shape": (1, 10, 32), **SGD},
        False,
    ),
    "next-word-lstm": (
        Z + "NextWordLSTM",
        {"input_shape": (1, 6), "input_dtype": "int64", **ADAMW},
        False,
    ),
    "transformer": (
        Z + "tiny_transformer_deterministic",
        {"input_shape": (1, 8), "input_dtype": "int64", **SGD},
        False,
    ),
}
# What each backend supports today, pinned so that losing support fails a test instead of
# passing as a documented refusal; the reasons' openings are part of the pin.
_BATCH_STATS = "ORT training artifacts hold only trainable parameters"
_PADDING = "ORT training's embedding gradient ignores padding_idx"
_MOMENTUM = "ORT training artifacts have no SGD momentum"
ORT_TRAINING_REFUSED: dict[str, str] = {
    "batchnorm-mlp": _BATCH_STATS,
    "embedding-bag": _PADDING,
    "depthwise-cnn": _BATCH_STATS,
    "pooling-cnn": "ORT training artifacts: cannot be exported to standard ops",
    "gru-tagger": _MOMENTUM,
    "attention-pool": _MOMENTUM,
    "mobilenet": _BATCH_STATS,
    "keyword-spotter": _BATCH_STATS,
    "next-word-lstm": _PADDING,
    "transformer": _PADDING,
}
_FIXED_BATCH = "the TFLite step has a fixed batch that shorter batches are padded to"
_LITERT_CANNOT_RUN = "TFLite step graph: converted, but ai-edge-litert cannot run it"
LITERT_REFUSED: dict[str, str] = {
    "batchnorm-mlp": _FIXED_BATCH,
    "depthwise-cnn": _FIXED_BATCH,
    "mobilenet": _FIXED_BATCH,
    "keyword-spotter": _FIXED_BATCH,
    "embedding-bag": _LITERT_CANNOT_RUN,
    "next-word-lstm": _LITERT_CANNOT_RUN,
    "transformer": _LITERT_CANNOT_RUN,
}
DROPOUT = (Z + "DropoutMLP", {"input_shape": (1, 64), "optimizer": "sgd", "lr": 0.1})
BATCHES = (1, 8, 5, 8, 3)
RTOL = 2e-5


def _cases() -> list[Any]:
    return [
        pytest.param(name, id=name, marks=[] if fast else [pytest.mark.slow])
        for name, (_, _, fast) in ZOO.items()
    ]


def bundle_of(name: str) -> Path:
    spec, args, _ = ZOO[name]
    return cached_bundle(spec, **args)


def zoo_batch(manifest: Manifest, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    raw = manifest.raw
    shape = (n, *raw["input"]["shape"][1:])
    if raw["input"]["dtype"] == "int64":
        x = rng.integers(0, VOCAB, size=shape)  # 0, the padding index, included
    else:
        x = rng.normal(size=shape).astype(np.float32)
    return x, rng.integers(0, raw["num_classes"], size=n)


def _batches(manifest: Manifest) -> tuple[int, ...]:
    # torch refuses to train batch norm over (N, C) features on one example
    flat_bn = any(len(b.shape) == 1 for b in manifest.buffers) and manifest.raw["input"][
        "shape"
    ] == [None, manifest.raw["input"]["shape"][1]]
    return tuple(n for n in BATCHES if not (flat_bn and n == 1))


def _close(got: np.ndarray, want: np.ndarray, what: str) -> None:
    scale = float(np.abs(want).max())
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * scale, err_msg=what)


def _check_parity(trainer: Trainer, bundle: Path) -> None:
    ref = TorchReference(bundle, dtype=torch.float64)
    start = ref.parameters()
    _close(trainer.get_parameters(), start, "initial model vector")
    for i, n in enumerate(_batches(trainer.manifest)):
        x, y = zoo_batch(trainer.manifest, n, seed=i)
        loss = trainer.train_step(x, y)
        assert loss == pytest.approx(ref.train_step(x, y), rel=1e-4, abs=1e-6), f"step {i}"
        _close(trainer.get_parameters(), ref.parameters(), f"step {i}, batch {n}")
    assert not np.allclose(trainer.get_parameters(), start), "training changed nothing"
    x, y = zoo_batch(trainer.manifest, 11, seed=99)
    _close(trainer.predict(x), ref.outputs(x), "eval-mode outputs")
    assert trainer.evaluate(x, y)["loss"] == pytest.approx(ref.eval_loss(x, y), rel=1e-4)


@pytest.mark.parametrize("name", _cases())
def test_zoo_trains_like_torch_on_ort_step(name: str) -> None:
    bundle = bundle_of(name)
    _check_parity(load_trainer(bundle, backend="ort-step"), bundle)


@pytest.mark.parametrize("name", _cases())
def test_every_other_backend_trains_like_torch_or_is_refused_with_a_reason(name: str) -> None:
    bundle = bundle_of(name)
    raw = load_manifest(bundle).raw
    assert raw["backends"]["ort-step"] == {"supported": True, "reason": None, "fedprox": True}
    entry = raw["backends"]["ort-training"]
    assert entry["supported"] == (name not in ORT_TRAINING_REFUSED), entry["reason"]
    if not entry["supported"]:
        assert entry["reason"].startswith(ORT_TRAINING_REFUSED[name])
        with pytest.raises(BundleNotSupported, match=re.escape(entry["reason"][:40])):
            load_trainer(bundle, backend="ort-training")
    elif importlib.util.find_spec("onnxruntime.training") is not None:
        _check_parity(load_trainer(bundle, backend="ort-training"), bundle)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ZOO))
def test_litert_step_trains_like_torch_where_tflite_converts_the_model(name: str) -> None:
    """With TFLite files asked for: litert-step matches torch, or the manifest says why not
    and the trainer refuses with that reason."""
    pytest.importorskip("litert_torch")
    pytest.importorskip("ai_edge_litert")
    spec, args, _ = ZOO[name]
    bundle = cached_bundle(spec, **args, tflite=True, tflite_batch=8)  # the batches below fit
    entry = load_manifest(bundle).raw["backends"]["litert-step"]
    assert entry["supported"] == (name not in LITERT_REFUSED), entry["reason"]
    if not entry["supported"]:
        assert entry["reason"].startswith(LITERT_REFUSED[name])
        with pytest.raises(BundleNotSupported, match=re.escape(entry["reason"][:40])):
            load_trainer(bundle, backend="litert-step")
        return
    _check_parity(load_trainer(bundle, backend="litert-step"), bundle)


def test_ort_training_is_refused_for_an_embedding_padding_index() -> None:
    """ORT's Gather gradient trains the padding row (measured on the next-word LSTM); the
    manifest says so and the trainer refuses rather than train it silently."""
    entry = load_manifest(bundle_of("embedding-bag")).raw["backends"]["ort-training"]
    assert entry["supported"] is False
    assert "padding_idx (layer 'emb')" in entry["reason"]


def test_batch_norm_statistics_are_in_the_model_vector() -> None:
    raw = load_manifest(bundle_of("batchnorm-mlp")).raw
    assert [(b["name"], b["shape"], b["offset"]) for b in raw["buffers"]] == [
        ("bn.running_mean", [32], raw["num_trainable"]),
        ("bn.running_var", [32], raw["num_trainable"] + 32),
    ]
    assert raw["num_parameters"] == raw["num_trainable"] + 64
    assert raw["batchnorm_modules"] == ["bn"]
    inputs = raw["signatures"]["step"]["inputs"]
    assert inputs[6:8] == ["buffers.bn.running_mean", "buffers.bn.running_var"]  # 6 parameters
    assert "buffers_out.bn.running_var" in raw["signatures"]["step"]["outputs"]
    assert raw["optimizer_state"] == [{"name": "momentum_buffer", "shape": [raw["num_trainable"]]}]
    params = np.fromfile(bundle_of("batchnorm-mlp") / "params.f32", dtype="<f4")
    np.testing.assert_array_equal(params[-64:], [0.0] * 32 + [1.0] * 32)  # torch's initial


# -- dropout --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dropout_trainer() -> Trainer:
    return load_trainer(cached_bundle(DROPOUT[0], **DROPOUT[1]), backend="ort-step")


def test_dropout_bundle_takes_a_seed(dropout_trainer: Trainer) -> None:
    raw = dropout_trainer.manifest.raw
    assert raw["step_seed"] is True
    assert raw["signatures"]["step"]["inputs"][-1] == "seed"
    assert "seed" in raw["signatures"]["step_prox"]["inputs"]
    assert "seed" not in raw["signatures"]["eval"]["inputs"]


def _step_from(trainer: Trainer, start: np.ndarray, seed: int, x: Any, y: Any) -> np.ndarray:
    trainer.set_parameters(start)
    trainer.reset_optimizer()
    trainer.seed(seed)
    trainer.train_step(x, y)
    return trainer.get_parameters()


def test_dropout_masks_follow_the_seed(dropout_trainer: Trainer) -> None:
    start = dropout_trainer.get_parameters()
    x, y = zoo_batch(dropout_trainer.manifest, 8, seed=1)
    a = _step_from(dropout_trainer, start, 3, x, y)
    np.testing.assert_array_equal(a, _step_from(dropout_trainer, start, 3, x, y))
    assert not np.array_equal(a, _step_from(dropout_trainer, start, 4, x, y))
    # and from one step to the next without reseeding
    dropout_trainer.set_parameters(start)
    dropout_trainer.seed(3)
    dropout_trainer.train_step(x, y)
    dropout_trainer.set_parameters(start)
    dropout_trainer.train_step(x, y)
    assert not np.array_equal(a, dropout_trainer.get_parameters())


def test_dropout_drops_units_at_the_rate_of_the_layer(dropout_trainer: Trainer) -> None:
    """One example per step: hidden unit j's outgoing weights (fc2's column j) get no update
    exactly when dropout dropped j (or ReLU silenced it). Over many seeds the dropped share of
    the live units is p = 0.5, within 5 standard deviations."""
    manifest = dropout_trainer.manifest
    start = dropout_trainer.get_parameters()
    spec = {p.name: p for p in manifest.parameters}
    w1, b1 = (
        start[spec[n].offset : spec[n].offset + spec[n].size] for n in ("fc1.weight", "fc1.bias")
    )
    fc2 = spec["fc2.weight"]
    dropped = live = 0
    for seed in range(40):
        x, y = zoo_batch(manifest, 1, seed=seed)
        hidden = x[0] @ w1.reshape(48, 64).T + b1
        after = _step_from(dropout_trainer, start, seed, x, y)
        delta = (after - start)[fc2.offset : fc2.offset + fc2.size].reshape(10, 48)
        alive = hidden > 0
        live += int(alive.sum())
        dropped += int((np.abs(delta[:, alive]).max(axis=0) == 0).sum())
    rate = dropped / live
    assert abs(rate - 0.5) < 5 * np.sqrt(0.25 / live), (rate, live)

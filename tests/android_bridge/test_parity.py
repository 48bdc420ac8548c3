"""Parity: the Kotlin trainer (OrtStepTrainer on ONNX Runtime's Java API) and the Python
``ort-step`` trainer, given the same bundle, start and batches, end with the same parameters
(1e-6 relative) and report the same losses: plain SGD, AdamW (per-parameter and scalar
optimizer state) and FedProx."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_sdk.trainers import load_trainer
from fedge.bundle_cache import DIGITS_BUNDLE_ARGS, DIGITS_MODEL, cached_bundle
from fedge.fleet.datasets import load_digits
from tests.android_bridge.jvm import KotlinTools, read_f32, write_raw_data

pytestmark = pytest.mark.slow

STEPS, BATCH = 12, 32


@pytest.mark.parametrize(
    ("optimizer", "mu"),
    [("sgd", 0.0), ("adamw", 0.0), ("sgd", 0.1)],
    ids=["sgd", "adamw", "fedprox"],
)
def test_kotlin_trainer_matches_python_ort_step(
    kotlin_tools: KotlinTools, tmp_path: Path, optimizer: str, mu: float
) -> None:
    args = {**DIGITS_BUNDLE_ARGS, "optimizer": optimizer}
    if optimizer == "adamw":
        args["lr"] = 0.01
    bundle = cached_bundle(DIGITS_MODEL, **args)
    train, _ = load_digits(seed=0)
    rng = np.random.default_rng(7)
    idx = rng.integers(0, len(train.y), STEPS * BATCH)
    x = train.x[idx].astype(np.float32).reshape(STEPS * BATCH, -1)
    y = train.y[idx].astype(np.int64)
    lr = 0.03
    batches = write_raw_data(tmp_path / "batches", x, y, steps=STEPS, batch=BATCH, lr=lr, mu=mu)

    py = load_trainer(bundle, "ort-step")
    start = py.get_parameters()
    py.reset_optimizer()
    py.set_proximal(start if mu else None, mu)
    losses = [
        py.train_step(x[s * BATCH : (s + 1) * BATCH], y[s * BATCH : (s + 1) * BATCH], lr=lr)
        for s in range(STEPS)
    ]
    expected = py.get_parameters()

    out = tmp_path / "kotlin.f32"
    kotlin_tools.run(
        "parity", "--bundle", str(bundle), "--batches", str(batches), "--out", str(out)
    )
    got = read_f32(out)
    assert got.shape == expected.shape
    assert not np.array_equal(got, start)  # the steps moved the parameters
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(read_f32(Path(f"{out}.loss")), losses, rtol=1e-6)

"""One abstract test suite for every trainer backend: parity with torch autograd.

A concrete module subclasses :class:`TrainerSuite` and sets ``backend`` (plus the cases its
runtime cannot express, and which cases are slow for it). Every case is a bundle exported from
a real model; the reference is :class:`TorchReference` (torch.optim + autograd), so a wrong
gradient scale (the batch-size bug of DESIGN.md), a wrong optimizer formula or a wrong
parameter layout all fail here.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from edge_sdk.trainers import BundleNotSupported, Trainer, load_trainer
from tests.edge_sdk.trainers.reference import TorchReference
from tests.fixtures.bundles import DIGITS_BUNDLE_ARGS, cached_bundle

M = "model_export.models:"
# name -> (model spec, export arguments)
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "mlp-sgd": (M + "DigitsMLP", DIGITS_BUNDLE_ARGS),
    "mlp-sgd-momentum-wd": (
        M + "DigitsMLP",
        {"input_shape": (1, 64), "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3},
    ),
    "mlp-adamw": (M + "DigitsMLP", {"input_shape": (1, 64), "optimizer": "adamw", "lr": 0.01}),
    "cnn-sgd-momentum": (
        M + "DigitsCNN",
        {"input_shape": (1, 1, 8, 8), "lr": 0.1, "momentum": 0.9},
    ),
    "frozen-backbone-adamw": (
        M + "BackboneHead",
        {"input_shape": (1, 64), "optimizer": "adamw", "lr": 0.01, "freeze": ("backbone",)},
    ),
    "mse-sgd-momentum": (
        M + "MLPRegressor",
        {"input_shape": (1, 8), "loss": "mse", "lr": 0.05, "momentum": 0.5},
    ),
    "bce-adamw": (
        M + "MLPRegressor",
        {"input_shape": (1, 8), "loss": "bce", "optimizer": "adamw", "lr": 0.01},
    ),
}
BATCHES = (1, 8, 5, 8, 3)  # several sizes, incl. 1, in one run so the state carries over
RTOL = 1e-5


def batch(manifest: Any, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A random batch that fits the manifest (labels of every class, targets in [0, 1])."""
    rng = np.random.default_rng(seed)
    raw = manifest.raw
    x = rng.normal(size=(n, *raw["input"]["shape"][1:])).astype(np.float32)
    if raw["loss"] == "cross_entropy":
        y = rng.integers(0, raw["num_classes"], size=n)
    else:
        y = rng.uniform(0, 1, size=(n, *raw["target"]["shape"][1:])).astype(np.float32)
    return x, y


def assert_close(got: np.ndarray, ref: np.ndarray, rtol: float = RTOL) -> None:
    """Within ``rtol`` relative to the vector's scale (elementwise rtol explodes near 0)."""
    scale = float(np.abs(ref).max())
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=rtol * scale)


class TrainerSuite:
    backend: ClassVar[str]
    runtime_module: ClassVar[str]
    tflite: ClassVar[bool] = False
    # cases this backend refuses (BundleNotSupported is tested instead of parity)
    unsupported: ClassVar[frozenset[str]] = frozenset()
    # cases run only with --slow for this backend (e.g. TFLite conversions)
    slow_cases: ClassVar[frozenset[str]] = frozenset()
    fedprox: ClassVar[bool] = True

    # -- fixtures ---------------------------------------------------------------------------

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        if "case" not in metafunc.fixturenames:
            return
        if "adamw_case" in metafunc.fixturenames:
            names = ["mlp-adamw"]
        else:
            supported = "unsupported_case" not in metafunc.fixturenames
            names = [n for n in CASES if (n in self.unsupported) != supported]
        metafunc.parametrize(
            "case",
            [
                pytest.param(n, id=n, marks=[pytest.mark.slow] if n in self.slow_cases else [])
                for n in names
            ],
        )

    @pytest.fixture(autouse=True)
    def _runtime(self) -> None:
        if importlib.util.find_spec(self.runtime_module) is None:
            pytest.skip(f"{self.runtime_module} is not installed")

    def bundle_for(self, case: str) -> Path:
        spec, args = CASES[case]
        extra: dict[str, Any] = {"tflite": True, "tflite_batch": 8} if self.tflite else {}
        return cached_bundle(spec, **args, **extra)

    def trainer_for(self, case: str) -> tuple[Trainer, TorchReference]:
        bundle = self.bundle_for(case)
        trainer = load_trainer(bundle, backend=self.backend)
        assert trainer.backend == self.backend
        return trainer, TorchReference(bundle)

    @pytest.fixture
    def digits(self) -> tuple[Trainer, TorchReference]:
        return self.trainer_for("mlp-sgd")

    # -- parity with torch ------------------------------------------------------------------

    def test_steps_match_torch(self, case: str) -> None:
        trainer, ref = self.trainer_for(case)
        assert_close(trainer.get_parameters(), ref.parameters(), rtol=0)
        for i, n in enumerate(BATCHES):
            x, y = batch(trainer.manifest, n, seed=i)
            loss = trainer.train_step(x, y)
            ref_loss = ref.train_step(x, y)
            assert loss == pytest.approx(ref_loss, rel=RTOL, abs=1e-7), f"step {i}, batch {n}"
            assert_close(trainer.get_parameters(), ref.parameters())
        assert not np.array_equal(
            trainer.get_parameters(), TorchReference(self.bundle_for(case)).parameters()
        ), "training changed nothing"

    @pytest.mark.parametrize("n", [1, 8])
    def test_update_matches_torch_at_batch_size(self, case: str, n: int) -> None:
        """The update itself (not the parameters around it) equals torch's: a gradient off by
        a factor of the batch size, as DESIGN.md's exporter bug produces, fails here."""
        trainer, ref = self.trainer_for(case)
        start = ref.parameters()
        x, y = batch(trainer.manifest, n, seed=100 + n)
        trainer.train_step(x, y)
        ref.train_step(x, y)
        got, want = trainer.get_parameters() - start, ref.parameters() - start
        assert np.linalg.norm(want) > 0
        assert np.linalg.norm(got - want) <= 1e-3 * np.linalg.norm(want)

    def test_evaluate_and_predict_match_torch(self, case: str) -> None:
        trainer, ref = self.trainer_for(case)
        x, y = batch(trainer.manifest, 13, seed=7)
        trainer.train_step(x[:8], y[:8])
        ref.train_step(x[:8], y[:8])
        out = ref.outputs(x)
        assert_close(trainer.predict(x), out)
        metrics = trainer.evaluate(x, y)
        assert metrics["num_examples"] == 13
        assert metrics["loss"] == pytest.approx(ref.eval_loss(x, y), rel=RTOL, abs=1e-7)
        if trainer.manifest.loss == "cross_entropy":
            assert metrics["accuracy"] == pytest.approx(np.mean(out.argmax(1) == y))
        elif trainer.manifest.loss == "bce":
            assert metrics["accuracy"] == pytest.approx(np.mean((out > 0) == (y > 0.5)))
        else:
            assert "accuracy" not in metrics

    def test_fedprox_matches_torch_with_proximal_term(self, case: str) -> None:
        trainer, ref = self.trainer_for(case)
        rng = np.random.default_rng(3)
        anchor = ref.parameters() + rng.normal(scale=0.05, size=ref.parameters().shape).astype(
            np.float32
        )
        if not self.fedprox:
            with pytest.raises(BundleNotSupported):
                trainer.set_proximal(anchor, 0.5)
            return
        trainer.set_proximal(anchor, 0.5)
        ref.set_proximal(anchor, 0.5)
        for i, n in enumerate((4, 1, 6)):
            x, y = batch(trainer.manifest, n, seed=20 + i)
            assert trainer.train_step(x, y) == pytest.approx(ref.train_step(x, y), rel=RTOL)
            assert_close(trainer.get_parameters(), ref.parameters())
        trainer.set_proximal(None, 0.0)  # and off again: plain steps
        ref.set_proximal(anchor, 0.0)
        x, y = batch(trainer.manifest, 5, seed=30)
        trainer.train_step(x, y)
        ref.train_step(x, y)
        assert_close(trainer.get_parameters(), ref.parameters())
        # a new anchor and mu for the next round replace the old ones
        anchor = anchor[::-1].copy()
        trainer.set_proximal(anchor, 0.2)
        ref.set_proximal(anchor, 0.2)
        x, y = batch(trainer.manifest, 3, seed=31)
        assert trainer.train_step(x, y) == pytest.approx(ref.train_step(x, y), rel=RTOL)
        assert_close(trainer.get_parameters(), ref.parameters())

    def test_unsupported_bundle_is_refused(self, case: str, unsupported_case: None) -> None:
        with pytest.raises(BundleNotSupported, match=self.backend):
            load_trainer(self.bundle_for(case), backend=self.backend)

    @pytest.fixture
    def unsupported_case(self) -> None:
        """Marker fixture: parametrize this test over the cases the backend refuses."""

    @pytest.fixture
    def adamw_case(self) -> None:
        """Marker fixture: parametrize this test over the AdamW case only."""

    def test_reset_optimizer_restarts_adamw(self, case: str, adamw_case: None) -> None:
        """After reset_optimizer the next step is a first AdamW step (zero moments, step 1)."""
        trainer, ref = self.trainer_for(case)
        start = ref.parameters()
        for i in range(3):
            trainer.train_step(*batch(trainer.manifest, 4, seed=40 + i))
        trainer.reset_optimizer()
        trainer.set_parameters(start)
        x, y = batch(trainer.manifest, 6, seed=50)
        trainer.train_step(x, y)
        ref.train_step(x, y)
        assert_close(trainer.get_parameters(), ref.parameters())

    # -- behaviour on the demo bundle --------------------------------------------------------

    def test_lr_override_and_reset_optimizer(self, digits: tuple[Trainer, TorchReference]) -> None:
        trainer, ref = digits
        x, y = batch(trainer.manifest, 8, seed=1)
        trainer.train_step(x, y, lr=0.2)
        ref.train_step(x, y, lr=0.2)
        assert_close(trainer.get_parameters(), ref.parameters())
        trainer.reset_optimizer()
        start = ref.parameters()
        trainer.set_parameters(start)
        np.testing.assert_array_equal(trainer.get_parameters(), start)

    def test_set_parameters_round_trip_and_copy(
        self, digits: tuple[Trainer, TorchReference]
    ) -> None:
        trainer, _ = digits
        vec = np.arange(trainer.manifest.num_parameters, dtype=np.float32) / 1e4
        trainer.set_parameters(vec)
        got = trainer.get_parameters()
        np.testing.assert_array_equal(got, vec)
        got[:] = 0  # a copy: mutating it changes nothing inside
        np.testing.assert_array_equal(trainer.get_parameters(), vec)
        out = trainer.predict(np.ones((2, 64), np.float32))
        w1, b1 = vec[:2048].reshape(32, 64), vec[2048:2080]
        w2, b2 = vec[2080:2400].reshape(10, 32), vec[2400:2410]
        want = np.maximum(np.ones((2, 64)) @ w1.T + b1, 0) @ w2.T + b2
        np.testing.assert_allclose(out, want, rtol=1e-5)

    @pytest.mark.parametrize(
        "bad",
        [
            "x-shape",
            "x-nan",
            "y-shape",
            "y-float-labels",
            "y-out-of-range",
            "y-negative",
            "empty",
        ],
    )
    def test_bad_batch_is_refused_and_changes_nothing(
        self, digits: tuple[Trainer, TorchReference], bad: str
    ) -> None:
        trainer, _ = digits
        x, y = batch(trainer.manifest, 4, seed=0)
        if bad == "x-shape":
            x = x[:, :63]
        elif bad == "x-nan":
            x[1, 3] = np.nan
        elif bad == "y-shape":
            y = y[:3]
        elif bad == "y-float-labels":
            y = y.astype(np.float32) + 0.5
        elif bad == "y-out-of-range":
            y[0] = 10
        elif bad == "y-negative":
            y[0] = -1
        else:
            x, y = x[:0], y[:0]
        before = trainer.get_parameters()
        with pytest.raises(ValueError):
            trainer.train_step(x, y)
        with pytest.raises(ValueError):
            trainer.evaluate(x, y)
        np.testing.assert_array_equal(trainer.get_parameters(), before)

    @pytest.mark.parametrize("n", [2409, 2411])
    def test_wrong_length_parameters_are_refused(
        self, digits: tuple[Trainer, TorchReference], n: int
    ) -> None:
        trainer, _ = digits
        before = trainer.get_parameters()
        with pytest.raises(ValueError, match="2410"):
            trainer.set_parameters(np.zeros(n, np.float32))
        bad = before.copy()
        bad[5] = np.inf
        with pytest.raises(ValueError, match="NaN or Inf"):
            trainer.set_parameters(bad)
        np.testing.assert_array_equal(trainer.get_parameters(), before)

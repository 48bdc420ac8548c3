"""The plan loop around a trainer: step counts, learning rates, re-checks, FedProx, no leaks.

The trainer here is a numpy least-squares model that records what the loop asks of it: these
tests are about the loop, not a runtime (the runtimes have their own suite in trainers/).
"""

from __future__ import annotations

import math
import os
import stat
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_sdk.bundle import Manifest
from edge_sdk.codecs import CodecSpec
from edge_sdk.data import ArrayDataset
from edge_sdk.errors import ConditionsLapsed
from edge_sdk.local_training import LocalLayers, Plan, PlanError, evaluate, train
from edge_sdk.trainers.base import Trainer


class LeastSquares(Trainer):
    backend = "numpy-test"
    manifest = Manifest({})

    def __init__(self, dim: int) -> None:
        self.w = np.zeros(dim, dtype=np.float32)
        self.calls: list[tuple[str, Any]] = []
        self.anchor: np.ndarray | None = None
        self.mu = 0.0

    def get_parameters(self) -> np.ndarray:
        return self.w.copy()

    def set_parameters(self, vec: np.ndarray) -> None:
        self.calls.append(("set_parameters", vec.copy()))
        self.w = np.asarray(vec, dtype=np.float32).copy()

    def reset_optimizer(self) -> None:
        self.calls.append(("reset_optimizer", None))

    def set_proximal(self, anchor: np.ndarray | None, mu: float) -> None:
        self.calls.append(("set_proximal", mu))
        self.anchor, self.mu = anchor, mu

    def train_step(self, x: np.ndarray, y: np.ndarray, lr: float | None = None) -> float:
        assert lr is not None
        self.calls.append(("train_step", (len(x), lr)))
        err = x @ self.w - y
        loss = float(np.mean(err**2))
        grad = 2.0 * x.T @ err / len(x)
        if self.mu and self.anchor is not None:
            grad = grad + self.mu * (self.w - self.anchor)
        self.w = (self.w - lr * grad).astype(np.float32)
        return loss

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
        return {"loss": float(np.mean((x @ self.w - y) ** 2)), "num_examples": len(x)}

    def predict(self, x: np.ndarray) -> np.ndarray:
        return x @ self.w

    def steps(self) -> list[tuple[int, float]]:
        return [arg for name, arg in self.calls if name == "train_step"]


def _data(n: int = 50, dim: int = 4) -> ArrayDataset:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    return ArrayDataset(x, x @ np.arange(1, dim + 1, dtype=np.float32))


def test_epochs_run_every_batch_with_the_decayed_learning_rate() -> None:
    t = LeastSquares(4)
    plan = Plan(batch_size=16, lr=0.1, epochs=2, lr_decay=0.5)
    result = train(t, _data(), plan, np.zeros(4, np.float32), round_=3,
                   rng=np.random.default_rng(0))
    assert [n for n, _ in t.steps()] == [16, 16, 16, 2] * 2
    assert {lr for _, lr in t.steps()} == {0.1 * 0.5**3}
    assert (result.steps, result.examples_seen, result.num_examples) == (8, 100, 50)


def test_steps_mode_cycles_over_the_data() -> None:
    t = LeastSquares(4)
    plan = Plan.from_json({"epochs": 1, "steps": 7, "batch_size": 20, "lr": 0.01})
    result = train(t, _data(), plan, np.zeros(4, np.float32), round_=0,
                   rng=np.random.default_rng(0))
    assert [n for n, _ in t.steps()] == [20, 20, 10, 20, 20, 10, 20]
    assert result.steps == 7


def test_loss_is_the_example_weighted_mean_of_batch_losses() -> None:
    data = _data()
    t = LeastSquares(4)
    plan = Plan(batch_size=16, lr=0.05)
    start = np.zeros(4, np.float32)
    result = train(t, data, plan, start, round_=0, rng=np.random.default_rng(5))
    # replay the same batches by hand
    w: np.ndarray = start.astype(np.float64)
    total = 0.0
    for x, y in data.batches(16, np.random.default_rng(5)):
        err = x @ w - y
        total += float(np.mean(err**2)) * len(x)
        w = w - 0.05 * 2.0 * x.T @ err / len(x)
    assert math.isclose(result.loss, total / 50, rel_tol=1e-5)
    np.testing.assert_allclose(t.get_parameters(), w, rtol=1e-5)


def test_recheck_every_k_steps_stops_training_when_conditions_lapse() -> None:
    t = LeastSquares(4)
    checks: list[int] = []

    def recheck() -> tuple[str, ...]:
        checks.append(len(t.steps()))
        return ("not_charging",) if len(checks) == 2 else ()

    plan = Plan(batch_size=5, lr=0.01, epochs=3, recheck_every_steps=4)
    with pytest.raises(ConditionsLapsed) as info:
        train(t, _data(), plan, np.zeros(4, np.float32), round_=0,
              rng=np.random.default_rng(0), recheck=recheck)
    assert checks == [4, 8] and len(t.steps()) == 8
    assert info.value.reasons == ("not_charging",) and info.value.step == 8


def test_every_round_starts_clean_on_a_shared_trainer() -> None:
    t = LeastSquares(4)
    a, b = np.ones(4, np.float32), np.full(4, -2.0, np.float32)
    train(t, _data(), Plan(batch_size=50, lr=0.1, prox_mu=0.5), a, round_=0,
          rng=np.random.default_rng(0))
    t.calls.clear()
    train(t, _data(), Plan(batch_size=50, lr=0.1), b, round_=0, rng=np.random.default_rng(0))
    names = [name for name, _ in t.calls]
    assert names[:3] == ["set_parameters", "reset_optimizer", "set_proximal"]
    np.testing.assert_array_equal(t.calls[0][1], b)
    assert t.mu == 0.0  # the previous client's proximal term is gone


def test_fedprox_anchors_at_the_start_parameters() -> None:
    t = LeastSquares(4)
    start = np.full(4, 3.0, np.float32)
    train(t, _data(), Plan(batch_size=50, lr=0.1, prox_mu=0.7), start, round_=0,
          rng=np.random.default_rng(0))
    assert t.mu == 0.7 and t.anchor is not None
    np.testing.assert_array_equal(t.anchor, start)


def test_evaluate_weights_batches_by_their_size() -> None:
    data = _data(600)
    t = LeastSquares(4)
    w = np.array([1.0, 0.0, 3.0, 1.0], np.float32)
    result = evaluate(t, data, w)
    expected = float(np.mean((data.x @ w - data.y) ** 2))
    assert result.num_examples == 600 and result.accuracy is None
    assert math.isclose(result.loss, expected, rel_tol=1e-5)


@pytest.mark.parametrize(
    ("plan", "match"),
    [
        ({"batch_size": 32}, "lacks 'lr'"),
        ({"lr": -1.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"lr": 0.1, "batch_size": 0}, "batch_size"),
        ({"lr": 0.1, "batch_size": True}, "batch_size"),
        ({"lr": 0.1, "epochs": 1.5}, "integer"),
        ({"lr": 0.1, "batch_size": float("inf")}, "integer"),
        ({"lr": 0.1, "steps": float("nan")}, "integer"),
        ({"lr": 0.1, "epochs": None, "steps": None}, "exactly one"),
        ({"lr": 0.1, "codec": {"name": "zip"}}, "codec"),
        ({"lr": 0.1, "recheck_every_steps": -1}, "recheck"),
        ({"lr": 0.1, "batchnorm": "fedbn"}, "batchnorm"),
        ([], "object"),
    ],
)
def test_bad_plans_are_refused(plan: Any, match: str) -> None:
    with pytest.raises(PlanError, match=match):
        Plan.from_json(plan)


def test_plan_from_the_protocol_example() -> None:
    plan = Plan.from_json(
        {"epochs": 1, "steps": None, "batch_size": 32, "lr": 0.05, "lr_decay": 1.0,
         "prox_mu": 0.0, "codec": {"name": "int8", "bits": 8, "block": 256},
         "recheck_every_steps": 5}
    )
    assert plan == Plan(batch_size=32, lr=0.05, epochs=1, codec=CodecSpec("int8"),
                        recheck_every_steps=5)


# -- batch norm layers under FedBN ("batchnorm": "local") ------------------------------------


def _digits_like(n: int, shift: float, seed: int) -> ArrayDataset:
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(n, 64)) + shift).astype(np.float32)
    return ArrayDataset(x, rng.integers(0, 10, size=n))


def test_fedbn_keeps_the_batch_norm_layers_on_the_device(tmp_path: Path) -> None:
    """Under a local plan the device trains from its own batch norm entries, saves them, and
    hands back the global ones (no change to report); under an aggregate plan they are
    trained and reported like the rest of the model vector."""
    from edge_sdk.trainers import load_trainer
    from tests.fixtures.bundles import cached_bundle

    bundle = cached_bundle("model_export.zoo:digits_batchnorm_mlp", input_shape=(1, 64), lr=0.1)
    trainer = load_trainer(bundle, backend="ort-step")
    index = trainer.manifest.batchnorm_indices()
    names = {p.name for p in (*trainer.manifest.parameters, *trainer.manifest.buffers)}
    assert {"bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"} <= names
    assert index.size == 4 * 32
    start = trainer.get_parameters()
    data = _digits_like(64, shift=2.0, seed=1)
    rng = np.random.default_rng(0)
    local = LocalLayers.for_task(tmp_path, "task-1")
    plan = Plan(batch_size=16, lr=0.1, epochs=1, batchnorm="local")

    train(trainer, data, plan, start, round_=0, rng=rng, local=local)
    after = trainer.get_parameters()
    np.testing.assert_array_equal(after[index], start[index])  # nothing to report for them
    rest = np.setdiff1d(np.arange(start.size), index)
    assert not np.allclose(after[rest], start[rest])
    mine = local.load(index.size)
    assert mine is not None and not np.allclose(mine, start[index])

    # evaluation and the next round use the device's layers, not the global ones
    aggregate = Plan(batch_size=16, lr=0.1, epochs=1)
    before_eval = evaluate(trainer, data, start)
    with_local = evaluate(trainer, data, start, local=local)
    assert with_local.loss != before_eval.loss
    train(trainer, data, plan, start, round_=1, rng=np.random.default_rng(0), local=local)
    second = local.load(index.size)
    assert second is not None and not np.array_equal(second, mine)

    # aggregate: the same entries are trained and returned like any other
    train(trainer, data, aggregate, start, round_=0, rng=np.random.default_rng(0), local=local)
    agg = trainer.get_parameters()
    assert not np.allclose(agg[index], start[index])
    np.testing.assert_array_equal(local.load(index.size), second)  # untouched


def test_saved_local_layers_are_durable_once_save_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rename is durable only once its directory is fsync'ed (edge_sdk.state's rule for
    every write in the state directory)."""
    steps: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        steps.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        steps.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    LocalLayers.for_task(tmp_path, "t").save(np.arange(4, dtype=np.float32))
    assert steps == ["fsync file", "rename", "fsync dir"]


def test_local_layers_of_another_model_are_ignored(tmp_path: Path) -> None:
    local = LocalLayers.for_task(tmp_path, "t")
    assert local.load(4) is None
    local.save(np.arange(4, dtype=np.float32))
    np.testing.assert_array_equal(local.load(4), np.arange(4))
    assert local.load(5) is None  # a re-exported model with other layers
    (tmp_path / "local_layers" / "t.npy").write_bytes(b"not numpy")
    assert local.load(4) is None
    # an empty file (a lost write): np.load raises EOFError, which would fail every round
    # of the task, since the file is only rewritten after a round trained
    (tmp_path / "local_layers" / "t.npy").write_bytes(b"")
    assert local.load(4) is None
    with pytest.raises(ValueError, match="not safe"):
        LocalLayers.for_task(tmp_path, "../escape")

"""Streaming aggregation and the server optimizers against plain-numpy references."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.aggregation import (
    RunningSum,
    ServerOptimizerSpec,
    make_server_optimizer,
)
from coordinator.errors import InvalidRequest

N = 301


def _rounds(seed: int = 0, rounds: int = 4, clients: int = 5) -> list[list[tuple[np.ndarray, int]]]:
    rng = np.random.default_rng(seed)
    return [
        [(rng.normal(0, 0.1, N), int(rng.integers(1, 300))) for _ in range(clients)]
        for _ in range(rounds)
    ]


def _reference(name: str, x0: np.ndarray, rounds, lr, mom=0.9, b1=0.9, b2=0.99, tau=1e-3):
    """The optimizers written out element by element from Reddi et al. 2021, Algorithm 2."""
    x = [float(v) for v in x0]
    m = [0.0] * len(x)
    v = [tau * tau] * len(x)
    for updates in rounds:
        total = sum(n for _, n in updates)
        for i in range(len(x)):
            d = sum(n * float(u[i]) for u, n in updates) / total
            if name == "fedavg":
                x[i] += lr * d
            elif name == "fedavgm":
                m[i] = mom * m[i] + d
                x[i] += lr * m[i]
            else:
                m[i] = b1 * m[i] + (1 - b1) * d
                if name == "fedadam":
                    v[i] = b2 * v[i] + (1 - b2) * d * d
                else:
                    s = (v[i] > d * d) - (v[i] < d * d)
                    v[i] = v[i] - (1 - b2) * d * d * s
                x[i] += lr * m[i] / (v[i] ** 0.5 + tau)
    return np.array(x)


def test_running_sum_is_the_weighted_mean() -> None:
    updates = _rounds(1, rounds=1, clients=7)[0]
    s = RunningSum(N)
    for u, n in updates:
        s.fold(u, n)
    expected = np.average(
        np.stack([u for u, _ in updates]), axis=0, weights=[n for _, n in updates]
    )
    np.testing.assert_allclose(s.mean(), expected, rtol=1e-12)
    assert s.count == 7 and s.weight == sum(n for _, n in updates)


def test_running_sum_refuses_bad_input() -> None:
    s = RunningSum(4)
    with pytest.raises(ValueError):
        s.mean()
    with pytest.raises(ValueError):
        s.fold(np.zeros(5), 1)
    with pytest.raises(ValueError):
        s.fold(np.zeros(4), 0)


def test_check_refuses_what_folded_refuses() -> None:
    """``check`` (then an in-place ``fold``) refuses what ``folded`` (a checked copy) refuses,
    and leaves the sum as it was either way."""
    s = RunningSum(4)
    s.fold(np.full(4, 1e308), 1.0)  # float64 sums can sit near the top of the range
    before = s.total.copy()
    bad = [
        (np.array([1.0, np.nan, 0.0, 0.0], np.float32), 1.0),
        (np.array([np.inf, 0.0, 0.0, 0.0], np.float32), 1.0),
        (np.ones(4, np.float32), float("inf")),
        (np.ones(4, np.float32), -1.0),
        (np.ones(5, np.float32), 1.0),
        (np.full(4, 1e308), 1.0),  # a float64 delta whose sum overflows
        (np.full(4, 3e38, np.float32), 1e300),  # past the bound of 2**64: the sum is checked
    ]
    for delta, weight in bad:
        with pytest.raises(ValueError):
            s.folded(delta, weight)
        with pytest.raises(ValueError):
            s.check(delta, weight)
    np.testing.assert_array_equal(s.total, before)
    assert s.count == 1


def test_check_then_fold_is_the_weighted_mean() -> None:
    """float32 deltas at the edge of their range with weights near 2**63: the in-place fold
    that ``check`` allows gives numpy's float64 weighted mean, finite."""
    rng = np.random.default_rng(3)
    deltas = [rng.uniform(-3e38, 3e38, N).astype(np.float32) for _ in range(5)]
    weights = [float(2**63 - 1), 1.0, 7.0, float(2**62), 3.0]
    s = RunningSum(N)
    for d, w in zip(deltas, weights, strict=True):
        s.check(d, w)
        s.fold(d, w)
    expected = np.average(np.stack(deltas).astype(np.float64), axis=0, weights=weights)
    assert np.isfinite(s.total).all()
    np.testing.assert_allclose(s.mean(), expected, rtol=1e-12)


@pytest.mark.parametrize(
    ("spec", "kwargs"),
    [
        ({"name": "fedavg"}, {"lr": 1.0}),
        ({"name": "fedavg", "lr": 0.5}, {"lr": 0.5}),
        ({"name": "fedavgm", "lr": 0.7, "momentum": 0.8}, {"lr": 0.7, "mom": 0.8}),
        ({"name": "fedadam"}, {"lr": 0.01}),
        (
            {"name": "fedadam", "lr": 0.03, "beta1": 0.8, "beta2": 0.95, "tau": 0.01},
            {"lr": 0.03, "b1": 0.8, "b2": 0.95, "tau": 0.01},
        ),
        ({"name": "fedyogi"}, {"lr": 0.01}),
        (
            {"name": "fedyogi", "lr": 0.02, "beta2": 0.9, "tau": 1e-2},
            {"lr": 0.02, "b2": 0.9, "tau": 1e-2},
        ),
    ],
)
def test_optimizer_matches_numpy_reference(spec: dict, kwargs: dict) -> None:
    rounds = _rounds(2)
    x0 = np.random.default_rng(3).normal(0, 1, N).astype(np.float32)
    opt = make_server_optimizer(ServerOptimizerSpec.from_json(spec))
    x, state_blob = x0, None
    for updates in rounds:
        s = RunningSum(N)
        for u, n in updates:
            s.fold(u, n)
        # state goes through its stored byte form between rounds, as on the service
        state = opt.unpack_state(state_blob, N)
        x, state = opt.step(x, s.mean(), state)
        state_blob = opt.pack_state(state) if opt.state_names else None
        assert x.dtype == np.float32
    expected = _reference(spec["name"], x0, rounds, **kwargs)
    np.testing.assert_allclose(x, expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(x, x0)


def test_step_does_not_mutate_inputs() -> None:
    opt = make_server_optimizer(ServerOptimizerSpec.from_json({"name": "fedadam"}))
    x = np.ones(N, dtype=np.float32)
    d = np.full(N, 0.1)
    state = opt.initial_state(N)
    copies = (x.copy(), d.copy(), {k: v.copy() for k, v in state.items()})
    opt.step(x, d, state)
    np.testing.assert_array_equal(x, copies[0])
    np.testing.assert_array_equal(d, copies[1])
    for k in state:
        np.testing.assert_array_equal(state[k], copies[2][k])


@pytest.mark.parametrize(
    "bad",
    [
        {"name": "sgd"},
        {"name": "fedavg", "lr": 0},
        {"name": "fedavg", "lr": "1"},
        {"name": "fedadam", "beta1": 1.5},
        {"name": "fedyogi", "tau": -1},
        {"name": "fedavg", "extra": 1},
        [],
    ],
)
def test_spec_validation(bad: object) -> None:
    with pytest.raises(InvalidRequest):
        ServerOptimizerSpec.from_json(bad)


def test_stored_state_of_the_wrong_size_is_refused() -> None:
    opt = make_server_optimizer(ServerOptimizerSpec.from_json({"name": "fedavgm"}))
    with pytest.raises(ValueError):
        opt.unpack_state(b"\0" * 8 * 3, N)

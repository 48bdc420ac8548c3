"""Staleness weighting against numpy formulas written out independently, and plan parsing."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest

from coordinator import staleness
from coordinator.errors import InvalidRequest
from coordinator.staleness import DEFAULT_MAX_STALENESS, StalenessPolicy, TooStale

S = np.arange(0, 60)


def test_default_is_inverse_sqrt() -> None:
    p = StalenessPolicy.from_plan({})
    np.testing.assert_allclose(p.weights(S), 1.0 / np.sqrt(1.0 + S), rtol=1e-15)
    assert p.max_staleness == DEFAULT_MAX_STALENESS


@pytest.mark.parametrize("a", [0.0, 0.25, 0.5, 1.0, 2.5])
def test_polynomial(a: float) -> None:
    p = StalenessPolicy.from_plan({"staleness": {"name": "polynomial", "a": a}})
    np.testing.assert_allclose(p.weights(S), np.power(1.0 + S, -a), rtol=1e-15)


def test_sqrt_equals_polynomial_half() -> None:
    sqrt = StalenessPolicy.from_plan({"staleness": "sqrt"})
    poly = StalenessPolicy.from_plan({"staleness": {"name": "polynomial", "a": 0.5}})
    np.testing.assert_allclose(sqrt.weights(S), poly.weights(S), rtol=1e-15)


def test_constant() -> None:
    p = StalenessPolicy.from_plan({"staleness": {"name": "constant"}})
    np.testing.assert_array_equal(p.weights(S), np.ones(len(S)))


@pytest.mark.parametrize(("a", "b"), [(10.0, 4.0), (1.0, 0.0), (0.5, 7.0)])
def test_hinge(a: float, b: float) -> None:
    p = StalenessPolicy.from_plan({"staleness": {"name": "hinge", "a": a, "b": b}})
    ref = np.where(b >= S, 1.0, 1.0 / (a * np.maximum(S - b, 0) + 1.0))
    np.testing.assert_allclose(p.weights(S), ref, rtol=1e-15)


def test_hinge_defaults() -> None:
    p = StalenessPolicy.from_plan({"staleness": "hinge"})
    assert (p.a, p.b) == (10.0, 4.0)
    assert p.weight(4) == 1.0 and math.isclose(p.weight(5), 1 / 11)


def test_weights_in_unit_interval_and_non_increasing() -> None:
    for spec in ("sqrt", "constant", "hinge", {"name": "polynomial", "a": 3}):
        w = StalenessPolicy.from_plan({"staleness": spec}).weights(S)
        assert np.all(w > 0) and np.all(w <= 1) and np.all(np.diff(w) <= 0)


def test_bound() -> None:
    p = StalenessPolicy.from_plan({"max_staleness": 3})
    for s in range(4):
        assert p.accepts(s)
        p.check(s)
    assert not p.accepts(4)
    with pytest.raises(TooStale) as e:
        p.check(4)
    assert (e.value.staleness, e.value.max_staleness) == (4, 3)
    assert "4 versions behind" in str(e.value)


def test_zero_bound_accepts_only_fresh() -> None:
    p = StalenessPolicy.from_plan({"max_staleness": 0})
    p.check(0)
    with pytest.raises(TooStale):
        p.check(1)


def test_negative_staleness_is_an_error() -> None:
    p = StalenessPolicy()
    assert not p.accepts(-1)
    with pytest.raises(ValueError, match="future"):
        p.check(-1)
    with pytest.raises(ValueError, match="future"):
        p.weight(-1)


@pytest.mark.parametrize(
    "plan",
    [
        {"staleness": "exponential"},
        {"staleness": 3},
        {"staleness": {"a": 1}},
        {"staleness": {"name": "polynomial", "a": -1}},
        {"staleness": {"name": "polynomial", "a": float("nan")}},
        {"staleness": {"name": "polynomial", "a": "1"}},
        {"staleness": {"name": "polynomial", "a": True}},
        {"staleness": {"name": "hinge", "b": -2}},
        {"staleness": {"name": "hinge", "c": 1}},
        {"staleness": {"name": "sqrt", "a": 1}},
        {"max_staleness": -1},
        {"max_staleness": 2.5},
        {"max_staleness": True},
        {"max_staleness": "10"},
    ],
)
def test_bad_plans(plan: dict) -> None:
    with pytest.raises(InvalidRequest):
        StalenessPolicy.from_plan(plan)


@pytest.mark.parametrize(
    "spec", ["sqrt", "constant", {"name": "polynomial", "a": 2}, {"name": "hinge", "a": 3, "b": 1}]
)
def test_to_plan_round_trips(spec: object) -> None:
    p = StalenessPolicy.from_plan({"staleness": spec, "max_staleness": 7})
    assert StalenessPolicy.from_plan(p.to_plan()) == p


def test_docstring_examples() -> None:
    assert doctest.testmod(staleness).failed == 0

"""Robust aggregation against independent references: numpy/plain Python for the aggregators, a
brute-force Krum, a direct simulation of Andrew et al.'s clipping rule, and the plan's
validation of the ``robust`` object."""

from __future__ import annotations

import math
import statistics
from typing import Any

import numpy as np
import pytest

from coordinator.errors import InvalidRequest
from coordinator.plan import TaskPlan
from coordinator.robust import AgreementSpec, ClipSpec, RobustSpec
from coordinator.robust.aggregators import (
    coordinate_median,
    krum_scores,
    multi_krum,
    trimmed_mean,
    weighted_mean,
)
from coordinator.robust.agreement import agree, cosines
from coordinator.robust.clipping import (
    MIN_BOUND,
    clip_factor,
    example_cap,
    first_bound,
    next_bound,
)


def _rows(n: int = 9, d: int = 1003, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = rng.normal(0, 1, (n, d))
    rows[: n // 4] *= 50  # a few outliers
    return rows


def _trimmed_reference(rows: np.ndarray, trim: float) -> np.ndarray:
    """Per coordinate, in plain Python: sort, cut int(trim x n) at each end, average."""
    n = len(rows)
    k = int(trim * n)
    return np.array([statistics.fmean(sorted(col)[k : n - k]) for col in rows.T])


def _memmap(rows: np.ndarray, tmp_path: Any) -> np.ndarray:
    m = np.memmap(tmp_path / "rows", dtype=np.float64, mode="w+", shape=rows.shape)
    m[:] = rows
    return m


@pytest.mark.parametrize("chunk", [1, 7, 1000, 1 << 16])
def test_median_and_trimmed_mean_match_numpy_and_scipy_in_any_chunking(chunk, tmp_path) -> None:
    rows = _rows()
    m = _memmap(rows, tmp_path)
    np.testing.assert_allclose(coordinate_median(m, chunk), np.median(rows, axis=0), rtol=1e-12)
    for trim in (0.0, 0.1, 0.25, 0.4):
        np.testing.assert_allclose(
            trimmed_mean(m, trim, chunk), _trimmed_reference(rows, trim), rtol=1e-12
        )
    w = np.arange(1.0, rows.shape[0] + 1)
    np.testing.assert_allclose(
        weighted_mean(m, w, chunk), np.average(rows, axis=0, weights=w), rtol=1e-12
    )


def _krum_reference(rows: np.ndarray, f: int) -> tuple[list[int], np.ndarray]:
    """Blanchard et al.'s score written out with explicit pairwise distances."""
    n = len(rows)
    k = max(1, n - f - 2)
    scores = []
    for i in range(n):
        d = sorted(float(np.sum((rows[i] - rows[j]) ** 2)) for j in range(n) if j != i)
        scores.append(sum(d[:k]))
    order = sorted(range(n), key=lambda i: (scores[i], i))
    return sorted(order[: n - f]), np.array(scores)


@pytest.mark.parametrize(("n", "f"), [(3, 0), (7, 1), (10, 3), (12, 5)])
def test_multi_krum_matches_a_brute_force_reference(n, f, tmp_path) -> None:
    rows = _rows(n, 301, seed=n)
    chosen_ref, scores_ref = _krum_reference(rows, f)
    np.testing.assert_allclose(krum_scores(_memmap(rows, tmp_path), f, 50), scores_ref, rtol=1e-9)
    w = np.random.default_rng(1).uniform(1, 5, n)
    mean, chosen = multi_krum(_memmap(rows, tmp_path), w, f, chunk=37)
    assert list(chosen) == chosen_ref
    np.testing.assert_allclose(
        mean, np.average(rows[chosen_ref], axis=0, weights=w[chosen_ref]), rtol=1e-12
    )


def test_multi_krum_leaves_out_the_outliers() -> None:
    rng = np.random.default_rng(3)
    honest = rng.normal(0, 0.1, (8, 50)) + 1.0
    hostile = np.full((2, 50), -5.0)
    _, chosen = multi_krum(np.vstack([hostile, honest]), np.ones(10), f=2)
    assert set(chosen) == set(range(2, 10))


def test_aggregators_refuse_what_they_cannot_compute() -> None:
    with pytest.raises(ValueError):
        coordinate_median(np.zeros((0, 3)))
    with pytest.raises(ValueError):
        trimmed_mean(np.zeros((2, 3)), 0.49 + 0.01)  # 1 of 2 at each end leaves none
    with pytest.raises(ValueError):
        multi_krum(np.zeros((3, 3)), np.ones(3), f=3)
    with pytest.raises(ValueError):
        weighted_mean(np.zeros((3, 3)), np.array([1.0, 0.0, 1.0]))


def _clip_reference(
    norms_per_round: list[list[float]], c0: float, gamma: float, eta: float
) -> list[float]:
    """Andrew et al. 2021, Algorithm 1 without noise, one bound per round."""
    bounds = [c0]
    for norms in norms_per_round:
        c = bounds[-1]
        b = np.mean([1.0 if x <= c else 0.0 for x in norms])
        bounds.append(c * math.exp(-eta * (b - gamma)))
    return bounds


@pytest.mark.parametrize(("gamma", "eta"), [(0.5, 0.2), (0.9, 0.5), (0.2, 1.0)])
def test_adaptive_bound_follows_the_papers_update_rule(gamma, eta) -> None:
    rng = np.random.default_rng(7)
    rounds = [list(rng.lognormal(0.0, 0.5, 20) * 3.0) for _ in range(60)]
    clip = ClipSpec(quantile=gamma, lr=eta, initial=0.1)
    bounds = [first_bound(clip, rounds[0])]
    for norms in rounds:
        bounds.append(next_bound(clip, bounds[-1], norms))
    np.testing.assert_allclose(bounds, _clip_reference(rounds, 0.1, gamma, eta), rtol=1e-12)
    # and it converges to the target quantile of the norms' distribution
    quantile = 3.0 * math.exp(0.5 * statistics.NormalDist().inv_cdf(gamma))
    assert bounds[-1] == pytest.approx(quantile, rel=0.25)


def test_first_bound_is_the_target_quantile_unless_the_plan_sets_one() -> None:
    norms = [1.0, 2.0, 3.0, 100.0, 4.0]
    assert first_bound(ClipSpec(), norms) == 3.0
    assert first_bound(ClipSpec(quantile=0.25), norms) == np.quantile(norms, 0.25)
    assert first_bound(ClipSpec(initial=0.7), norms) == 0.7
    # all-zero updates: the bound stays positive and recovers once updates move again
    zero = first_bound(ClipSpec(), [0.0, 0.0])
    assert zero == MIN_BOUND
    assert next_bound(ClipSpec(), zero, [0.0] * 5) == MIN_BOUND
    assert next_bound(ClipSpec(), zero, [1.0] * 5) > MIN_BOUND
    fixed = ClipSpec(initial=2.0, adaptive=False)
    assert next_bound(fixed, 2.0, [5.0, 5.0]) == 2.0
    assert clip_factor(4.0, 2.0) == 0.5 and clip_factor(1.0, 2.0) == 1.0


def test_example_cap_is_the_smaller_of_the_fixed_and_relative_bounds() -> None:
    declared = [10, 20, 30, 1_000_000]
    assert example_cap(RobustSpec(), declared) == 25.0
    assert example_cap(RobustSpec(example_cap_factor=2.0), declared) == 50.0
    assert example_cap(RobustSpec(example_cap=20), declared) == 20
    assert example_cap(RobustSpec(example_cap=400, example_cap_factor=3.0), declared) == 75
    assert example_cap(RobustSpec(example_cap_factor=None), declared) == math.inf
    assert example_cap(RobustSpec.none(), declared) == math.inf


# -- direction agreement ----------------------------------------------------------------------


def _cosines_reference(rows: np.ndarray, reference: np.ndarray) -> list[float]:
    """In plain Python, one row at a time."""
    ref = [float(v) for v in reference]
    out = []
    for row in rows:
        r = [float(v) for v in row]
        norms = math.sqrt(sum(v * v for v in r)) * math.sqrt(sum(v * v for v in ref))
        out.append(0.0 if norms == 0 else sum(a * b for a, b in zip(r, ref, strict=True)) / norms)
    return out


@pytest.mark.parametrize("chunk", [1, 7, 1000, 1 << 16])
def test_cosines_with_the_median_match_a_reference_in_any_chunking(chunk, tmp_path) -> None:
    rows = _rows()
    rows[1] = -rows[2]
    rows[3] = 0.0
    m = _memmap(rows, tmp_path)
    med = np.median(rows, axis=0)
    np.testing.assert_allclose(cosines(m, med, chunk), _cosines_reference(rows, med), atol=1e-12)
    weights = np.arange(1.0, len(rows) + 1)
    specs = [AgreementSpec(), AgreementSpec(0.05), AgreementSpec(-0.05), AgreementSpec(weigh=True)]
    for spec in specs:
        got = agree(spec, m, weights, chunk)
        ref = _cosines_reference(rows, med)
        floor = max(spec.min_cosine, 0.0) if spec.weigh else spec.min_cosine
        keep = [i for i, c in enumerate(ref) if c > floor]
        assert list(got.keep) == keep
        assert (3 in keep) == (floor < 0)  # a zero update: cosine 0
        scale = [ref[i] if spec.weigh else 1.0 for i in keep]
        np.testing.assert_allclose(got.weights, weights[keep] * scale, rtol=1e-12)


def test_a_flipped_minority_is_dropped_and_a_zero_reference_drops_everything() -> None:
    rng = np.random.default_rng(4)
    honest = rng.normal(0, 1, 50) + rng.normal(0, 0.5, (7, 50))
    rows = np.vstack([honest, -honest[:2]])  # two sign flips of honest updates
    got = agree(AgreementSpec(), rows, np.ones(len(rows)))
    assert list(got.keep) == list(range(7))
    # half one way, half the other: the median is 0, no direction to agree with
    rows = np.vstack([honest[:3], -honest[:3]])
    assert agree(AgreementSpec(), rows, np.ones(6)).keep.size == 0


# -- plan validation ---------------------------------------------------------------------------


def test_plan_defaults_are_defended_fedavg_and_round_trip() -> None:
    plan = TaskPlan.from_json({})
    assert plan.robust == RobustSpec() and not plan.robust.undefended
    assert plan.robust.clip == ClipSpec() and plan.robust.example_cap_factor == 1.0
    assert plan.robust.agreement == AgreementSpec(min_cosine=0.0, weigh=False)
    assert TaskPlan.from_json({"robust": "none"}).robust.undefended
    for robust in (
        "none",
        {"aggregator": "multi_krum", "byzantine": 0.3, "clip": None},
        {"aggregator": "trimmed_mean", "trim": 0.2, "example_cap": 500},
        {"clip": {"quantile": 0.8, "lr": 0.1, "initial": 3.0, "adaptive": False}},
        {"agreement": None},
        {"agreement": {"min_cosine": -0.2, "weigh": True}},
    ):
        plan = TaskPlan.from_json({"robust": robust})
        assert TaskPlan.from_json(plan.to_json()) == plan


@pytest.mark.parametrize(
    ("robust", "message"),
    [
        ({"aggregator": "mean"}, "plan.robust.aggregator must be one of"),
        ({"trim": 0.5}, "plan.robust.trim must be <= 0.49"),
        ({"byzantine": -0.1}, "plan.robust.byzantine must be >= 0.0"),
        ({"example_cap": 0}, "plan.robust.example_cap must be in [1,"),
        ({"example_cap": 1.5}, "plan.robust.example_cap must be an integer"),
        ({"example_cap_factor": 0.5}, "plan.robust.example_cap_factor must be >= 1.0"),
        ({"clip": {"quantile": 0}}, "plan.robust.clip.quantile must be > 0.0"),
        ({"clip": {"lr": "fast"}}, "plan.robust.clip.lr must be a finite number"),
        ({"clip": {"adaptive": False}}, "plan.robust.clip.initial is required"),
        ({"clip": {"quantile": 0.5, "gamma": 1}}, "unknown fields in plan.robust.clip: gamma"),
        ({"krum": 1}, "unknown fields in plan.robust: krum"),
        ({"agreement": {"min_cosine": 1}}, "plan.robust.agreement.min_cosine must be < 1.0"),
        ({"agreement": {"min_cosine": -1.5}}, "plan.robust.agreement.min_cosine must be >= -1"),
        ({"agreement": {"weigh": 1}}, "plan.robust.agreement.weigh must be true or false"),
        ({"agreement": {"reference": "mean"}}, "unknown fields in plan.robust.agreement"),
        ({"agreement": "off"}, "plan.robust.agreement must be a JSON object"),
        ("fedavg", "plan.robust must be a JSON object"),
        ([], "plan.robust must be a JSON object"),
    ],
)
def test_bad_robust_values_are_refused_with_the_plans_errors(robust, message) -> None:
    with pytest.raises(InvalidRequest) as e:
        TaskPlan.from_json({"robust": robust})
    assert message in str(e.value)
    assert e.value.status == 400


@pytest.mark.parametrize("aggregator", ["median", "trimmed_mean", "multi_krum"])
def test_robust_aggregators_need_three_updates_per_aggregate(aggregator) -> None:
    def checked(mode: str, **fields: int) -> TaskPlan:
        plan = TaskPlan.from_json({**fields, "robust": {"aggregator": aggregator}})
        plan.check_mode(mode)
        return plan

    with pytest.raises(InvalidRequest, match="needs at least 3 updates"):
        checked("sync", goal=2)
    with pytest.raises(InvalidRequest, match="buffer_k in async mode"):
        checked("async", goal=10, buffer_k=2)
    assert checked("sync", goal=3).robust.aggregator == aggregator
    # each mode counts only what it commits with: a sync round ignores buffer_k, an async
    # buffer ignores goal
    assert checked("sync", goal=10, buffer_k=2).robust.aggregator == aggregator
    assert checked("async", goal=2, buffer_k=10).robust.aggregator == aggregator
    # plain FedAvg works with any count
    plan = TaskPlan.from_json({"goal": 1, "buffer_k": 1, "robust": {"aggregator": "fedavg"}})
    plan.check_mode("sync")
    plan.check_mode("async")

"""The privacy ledger against dp-accounting composed independently, and the Gaussian mechanism."""

from __future__ import annotations

import math

import pytest
from dp_accounting import dp_event
from dp_accounting.pld import PLDAccountant
from dp_accounting.privacy_accountant import NeighboringRelation
from dp_accounting.rdp import RdpAccountant
from scipy.stats import norm

from coordinator import privacy
from coordinator.privacy import NOISE_GRID, Ledger, Round, noise_for_budget, noise_grid


def reference(blocks: list[tuple[int, int, float, int]], delta: float) -> float:
    # The task's rounds as consecutive blocks, in order: what the grouped ledger must equal.
    # Replacing one device moves a sum of updates clipped to C by up to 2C, and dp-accounting
    # measures noise against the sensitivity under the relation: sigma / (2C) = z / 2.
    acc = RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
    for population, cohort, z, times in blocks:
        sampled = dp_event.SampledWithoutReplacementDpEvent(
            population, cohort, dp_event.GaussianDpEvent(z / 2)
        )
        acc.compose(sampled, times)
    return float(acc.get_epsilon(delta))


def test_ledger_matches_dp_accounting_composed_independently() -> None:
    blocks = [(1000, 50, 1.1, 30), (1200, 60, 0.9, 20), (1000, 50, 1.1, 10)]
    ledger = Ledger(delta=1e-5)
    for population, cohort, z, times in blocks:
        for _ in range(times):
            ledger = ledger.plus(Round(population, cohort, z))
    assert len(ledger.rounds) == 2  # grouped
    assert ledger.epsilon() == pytest.approx(reference(blocks, 1e-5), rel=1e-9)


def test_full_participation_is_the_gaussian_mechanism() -> None:
    # Cohort = population: one Gaussian release with sensitivity 2 (replace-one). The exact
    # (eps, delta) curve of the Gaussian mechanism (Balle & Wang 2018) bounds RDP from below,
    # and the PLD accountant computes it almost exactly.
    z, delta = 2.0, 1e-5
    eps = Ledger(delta).plus(Round(100, 100, z)).epsilon()
    sigma = z / 2  # noise relative to the replace-one sensitivity of 2 * clip

    def exact_delta(e: float) -> float:
        a, b = 0.5 / sigma, e * sigma
        return float(norm.cdf(a - b) - math.exp(e) * norm.cdf(-a - b))

    pld = PLDAccountant()
    pld.compose(dp_event.GaussianDpEvent(sigma))
    pld_eps = float(pld.get_epsilon(delta))
    assert exact_delta(pld_eps) == pytest.approx(delta, rel=0.05)
    assert pld_eps <= eps <= 1.5 * pld_eps


def test_epsilon_grows_with_rounds_and_shrinks_with_noise() -> None:
    r = Round(10_000, 100, 1.0)
    one, many = Ledger(1e-5).plus(r), Ledger(1e-5).plus(r, 100)
    assert 0 < one.epsilon() < many.epsilon()
    assert Ledger(1e-5).plus(Round(10_000, 100, 2.0), 100).epsilon() < many.epsilon()
    assert Ledger(1e-5).epsilon() == 0.0


def test_budget_check_and_calibrated_noise() -> None:
    z = noise_for_budget(8.0, population=1000, cohort=50, rounds=100, delta=1e-5)
    spent = Ledger(1e-5).plus(Round(1000, 50, z), 100)
    assert spent.epsilon() <= 8.0
    assert Ledger(1e-5).plus(Round(1000, 50, z * 0.98), 100).epsilon() > 8.0
    almost = Ledger(1e-5).plus(Round(1000, 50, z), 99)
    assert not almost.would_exceed(Round(1000, 50, z), 8.0)
    assert spent.would_exceed(Round(1000, 50, z), 8.0)


@pytest.mark.parametrize(
    ("population", "cohort", "z"), [(10, 11, 1.0), (10, 0, 1.0), (10, 5, 0.0), (10, 5, math.nan)]
)
def test_bad_rounds_are_refused(population: int, cohort: int, z: float) -> None:
    with pytest.raises(ValueError):
        Round(population, cohort, z)


def _epsilon(population: int, cohort: int, z: float, rounds: int, delta: float) -> float:
    return reference([(population, cohort, z, rounds)], delta)


@pytest.mark.parametrize(
    ("budget", "population", "cohort", "rounds"),
    [(8.0, 1000, 100, 50), (1.0, 500, 100, 50), (4.0, 15, 13, 3), (0.5, 40, 40, 1),
     (30.0, 10_000, 10, 1000)],
)
def test_calibration_is_the_smallest_grid_noise_within_the_budget(
    budget: float, population: int, cohort: int, rounds: int
) -> None:
    z = noise_for_budget(budget, population, cohort, rounds, 1e-5)
    k = math.log(z) / math.log(NOISE_GRID)
    assert abs(k - round(k)) < 1e-6  # a grid point
    assert _epsilon(population, cohort, z, rounds, 1e-5) <= budget
    below = noise_grid(round(k) - 1)
    assert _epsilon(population, cohort, below, rounds, 1e-5) > budget


def test_calibration_evaluates_the_full_accountant_once(monkeypatch) -> None:
    """The reason a create request with an epsilon target answers promptly: one evaluation
    at all the accountant's orders (a plain bisection takes a dozen); the others look at a
    handful of cheap orders."""
    calls: list[int | None] = []
    inner = privacy._epsilon

    def counted(rnd, rounds, delta, orders):
        calls.append(None if orders is None else len(orders))
        return inner(rnd, rounds, delta, orders)

    monkeypatch.setattr(privacy, "_epsilon", counted)
    privacy.noise_for_budget.cache_clear()
    noise_for_budget(3.0, 2000, 100, 80, 1e-5)
    assert calls.count(None) == 1
    assert len(calls) <= 25 and max(n for n in calls if n is not None) < 80  # of 156


@pytest.mark.slow  # the plain bisection runs the full accountant a dozen times
def test_calibration_equals_a_plain_bisection_with_the_full_accountant() -> None:
    for budget, population, cohort, rounds in [(2.0, 1000, 100, 50), (8.0, 300, 30, 200)]:
        lo, hi = round(math.log(1e-3) / math.log(NOISE_GRID)), 0
        while _epsilon(population, cohort, noise_grid(hi), rounds, 1e-5) > budget:
            lo, hi = hi, hi + 256
        while hi - lo > 1:
            mid = (lo + hi) // 2
            within = _epsilon(population, cohort, noise_grid(mid), rounds, 1e-5) <= budget
            lo, hi = (lo, mid) if within else (mid, hi)
        assert noise_for_budget(budget, population, cohort, rounds, 1e-5) == noise_grid(hi)


def test_an_unreachable_budget_is_refused() -> None:
    with pytest.raises(ValueError, match="no noise multiplier"):
        noise_for_budget(0.01, 10, 10, 1000, 1e-5)


def test_the_calibrated_noise_pays_for_every_round_in_the_coordinators_own_ledger() -> None:
    """The create request's promise, checked the way the task spends: round after round, each
    commit starting from the JSON the previous one stored (``ledger_after``), each selection
    asking ``would_exceed``. All ``rounds`` rounds are released at the calibrated noise, and
    one grid step less noise would stop the task early; both against dp-accounting composing
    the same events independently."""
    import json

    import numpy as np

    budget, population, cohort, rounds, delta = 4.0, 500, 100, 50, 1e-5
    z = noise_for_budget(budget, population, cohort, rounds, delta)
    spec = privacy.DpSpec(clip=1.0, noise_multiplier=z, delta=delta, budget=budget)

    def released(noise: float) -> tuple[int, float]:
        before: dict | None = None
        for n in range(rounds):
            this = Round(population, cohort, noise)
            ledger = privacy.ledger_after(delta, before)
            if ledger.would_exceed(this, budget):  # the selection's check
                return n, ledger.epsilon()
            ledger = ledger.plus(this)
            result = privacy.NoisedMean(np.zeros(1), cohort, 0)
            record = privacy.round_record(spec, ledger, this, result, cohort, n)
            before = json.loads(json.dumps(record))  # as the store keeps it
        assert before is not None and before["rounds"] == rounds
        return rounds, before["epsilon"]

    done, spent = released(z)
    assert done == rounds and spent <= budget
    acc = RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
    acc.compose(dp_event.SelfComposedDpEvent(dp_event.SampledWithoutReplacementDpEvent(
        population, cohort, dp_event.GaussianDpEvent(z / 2)), rounds))  # fmt: skip
    assert spent == pytest.approx(float(acc.get_epsilon(delta)), rel=1e-9)
    assert released(z / NOISE_GRID)[0] < rounds

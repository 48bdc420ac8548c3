"""Heterogeneity: determinism per seed, the documented distributions, day schedules."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedge.fleet.heterogeneity import DAY_S, DaySchedule, Heterogeneity

H = 3600.0


def test_profiles_are_deterministic_per_seed_and_independent_of_fleet_size() -> None:
    model = Heterogeneity.realistic()
    a = model.sample(200, seed=42)
    b = model.sample(200, seed=42)
    assert a == b
    assert model.sample(50, seed=42) == a[:50]
    c = model.sample(200, seed=43)
    assert [p.compute_multiplier for p in a] != [p.compute_multiplier for p in c]
    fates_a = [p.job_fate(j) for p in a for j in range(5)]
    fates_b = [p.job_fate(j) for p in b for j in range(5)]
    assert fates_a == fates_b


def test_lognormal_compute_speed_is_heavy_tailed_as_documented() -> None:
    mult = np.array([p.compute_multiplier for p in
                     Heterogeneity(compute_median=2.0, compute_sigma=1.0).sample(20_000, 1)])
    assert np.median(mult) == pytest.approx(2.0, rel=0.05)
    # LogNormal(0, 1): the 99th percentile is exp(2.326) = 10.2 times the median.
    assert np.quantile(mult, 0.99) / np.median(mult) == pytest.approx(math.exp(2.326), rel=0.1)


def test_pareto_compute_speed_has_the_documented_median_and_tail() -> None:
    a = 1.5
    mult = np.array([p.compute_multiplier for p in
                     Heterogeneity(compute="pareto", compute_shape=a).sample(40_000, 2)])
    assert np.median(mult) == pytest.approx(1.0, rel=0.05)
    # m = X / 2^(1/a), P(X > x) = x^-a  =>  P(m > 10) = (10 * 2^(1/a))^-a = 10^-a / 2.
    assert np.mean(mult > 10) == pytest.approx(10**-a / 2, rel=0.15)
    assert mult.min() >= 2 ** (-1 / a) - 1e-12


def test_bandwidth_and_time_arithmetic() -> None:
    (p,) = Heterogeneity(download_mbps=8.0, upload_mbps=2.0, download_sigma=0,
                         upload_sigma=0, compute_sigma=0, compute_median=3.0).sample(1, 0)
    # 1 MB down at 8 Mbit/s = 1 s; 0.5 MB up at 2 Mbit/s = 2 s.
    assert p.transfer_time_s(bytes_down=1_000_000, bytes_up=500_000) == pytest.approx(3.0)
    assert p.compute_time_s(steps=10, step_time_s=0.01) == pytest.approx(0.3)


def test_job_fates_follow_their_probabilities() -> None:
    (p,) = Heterogeneity(dropout_prob=0.3, lapse_prob=0.1).sample(1, 5)
    fates = [p.job_fate(j) for j in range(5_000)]
    drops = [f.dropout_at for f in fates if f.dropout_at is not None]
    lapses = [f.lapse_at for f in fates if f.lapse_at is not None]
    assert len(drops) / 5_000 == pytest.approx(0.3, abs=0.03)
    assert len(lapses) / 5_000 == pytest.approx(0.1, abs=0.02)
    assert 0.4 < np.mean(drops) < 0.6 and all(0 <= d < 1 for d in drops)
    assert np.mean([f.lapse_s for f in fates]) == pytest.approx(600, rel=0.1)
    (reliable,) = Heterogeneity().sample(1, 5)
    assert all(reliable.job_fate(j).dropout_at is None for j in range(200))


def _brute_state(t: float, charging: list, busy: list, wifi: list) -> tuple[bool, bool, bool]:
    def inside(iv: list) -> bool:
        for a, b in iv:
            for shift in (-DAY_S, 0.0, DAY_S):
                if a + shift <= t % DAY_S < b + shift:
                    return True
        return False

    return inside(charging), not inside(busy), inside(wifi)


@pytest.mark.parametrize("seed", range(5))
def test_day_schedule_matches_brute_force_membership(seed: int) -> None:
    rng = np.random.default_rng(seed)

    def intervals() -> list[tuple[float, float]]:
        out = []
        for _ in range(rng.integers(0, 4)):
            a = rng.uniform(0, DAY_S)
            out.append((a, a + rng.uniform(60, 10 * H)))
        return out

    charging, busy, wifi = intervals(), intervals(), intervals()
    sched = DaySchedule.from_intervals(charging, busy, wifi)
    for t in rng.uniform(0, 3 * DAY_S, 2_000):
        assert sched.state_at(t) == _brute_state(t, charging, busy, wifi)
    for t in rng.uniform(0, 2 * DAY_S, 50):
        nxt = sched.next_change(t)
        if math.isinf(nxt):
            assert len(sched.states) == 1
            continue
        assert nxt > t
        assert sched.state_at(nxt) != sched.state_at(t)
        grid = np.linspace(t, nxt - 2e-3, 200)
        assert all(sched.state_at(g) == sched.state_at(t) for g in grid)


def test_diurnal_devices_charge_at_night_and_never_chargers_never_do() -> None:
    model = Heterogeneity(availability="diurnal", start_hour=0.0, never_charging_fraction=0.1)
    fleet = model.sample(500, seed=3)

    def eligible_share(hour: float) -> float:
        return float(np.mean([all(p.schedule.state_at(hour * H)) for p in fleet]))

    assert eligible_share(3.0) > 0.6
    assert eligible_share(14.0) < 0.2
    never = [p for p in fleet if p.never_charging]
    assert 25 <= len(never) <= 75
    minutes = np.arange(0, 2 * DAY_S, 60.0)
    for p in never:
        assert not any(p.conditions_at(t).charging for t in minutes)
    assert all(p.schedule.eligible_fraction() == 0 for p in never)


def test_start_hour_shifts_the_emulated_clock() -> None:
    (night,) = Heterogeneity(availability="diurnal", start_hour=3.0).sample(1, 9)
    (noon,) = Heterogeneity(availability="diurnal", start_hour=15.0).sample(1, 9)
    assert night.schedule == noon.schedule
    for t in np.arange(0, DAY_S, 600.0):
        assert night.conditions_at(t + 12 * H) == noon.conditions_at(t)


@pytest.mark.parametrize("kwargs", [
    {"dropout_prob": 1.5}, {"lapse_prob": -0.1}, {"compute_median": 0}, {"compute": "gamma"},
    {"availability": "sometimes"}, {"upload_mbps": -1.0},
    # Taken before: a NaN or out-of-day start hour shifted every schedule by NaN or by days (a
    # NaN offset made every device unavailable for the whole run), a NaN or negative sigma
    # gave NaN or mirrored multipliers, a NaN rate of user sessions no session at all.
    {"start_hour": float("nan")}, {"start_hour": 24.5}, {"start_hour": -1.0},
    {"compute_sigma": float("nan")}, {"download_sigma": -0.5}, {"upload_sigma": float("inf")},
    {"active_per_hour": float("nan")}, {"active_per_hour": -1.0},
])
def test_bad_parameters_are_rejected(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        Heterogeneity(**kwargs)

"""Pace steering: the formula, the spread, and check-in rates in a simulated population."""

from __future__ import annotations

import heapq
import json
import random
from pathlib import Path

import numpy as np
import pytest

from coordinator.blobs import BlobStore
from coordinator.clock import FakeClock
from coordinator.config import CoordinatorConfig, PacingConfig
from coordinator.pacing import PaceSteering
from coordinator.service import Coordinator, DeviceIdentity
from coordinator.store import SQLiteStore
from tests.fixtures.coordinator import GOOD_CONDITIONS


def test_interval_follows_the_formula() -> None:
    cfg = PacingConfig(min_retry_s=1, max_retry_s=1e6, headroom=1.5, horizon_s=100)
    p = PaceSteering(cfg, random.Random(0))
    for i in range(600):
        p.saw(f"d{i}", 0.0)
    # N = 600, R = 13, P = 130 s: lambda = 1.5 x 13 / 130 = 0.15/s, I = 600 / 0.15 = 4000 s
    assert p.interval(10.0, 13, 130.0) == pytest.approx(4000.0)
    # clamped at both ends
    assert PaceSteering(PacingConfig(max_retry_s=50), random.Random(0)).interval(0, 1, 1e5) == 50
    assert PaceSteering(PacingConfig(min_retry_s=7), random.Random(0)).interval(0, 1000, 1) == 7


def test_population_forgets_devices_that_do_not_come_back() -> None:
    p = PaceSteering(PacingConfig(horizon_s=60), random.Random(0))
    p.saw("a", 0.0)
    p.saw("b", 0.0)
    p.expect("b", 0.0, 500.0)  # told to come back at 500: counts until 560
    assert p.population(59.0) == 2
    assert p.population(61.0) == 1
    assert p.population(559.0) == 1
    assert p.population(561.0) == 1  # never below one (the formula divides by nothing else)
    p.saw("a", 600.0)
    assert p.population(600.0) == 1


def test_jitter_spreads_returns_uniformly() -> None:
    p = PaceSteering(PacingConfig(jitter=0.5, min_retry_s=0, max_retry_s=1e9), random.Random(1))
    for i in range(1000):
        p.saw(f"d{i}", 0.0)
    draws = np.array([p.retry_after(0.0, 10, 100.0) for _ in range(20000)])
    interval = p.interval(0.0, 10, 100.0)
    assert draws.min() >= 0.5 * interval and draws.max() <= 1.5 * interval
    hist, _ = np.histogram(draws, bins=10, range=(0.5 * interval, 1.5 * interval))
    assert hist.min() > 0.9 * 2000 and hist.max() < 1.1 * 2000  # flat: no herd


def test_candidates_short_of_the_goal_wait_for_the_missing_ones_at_the_pace_seen() -> None:
    p = PaceSteering(PacingConfig(selection_return_spread_s=2.0), random.Random(0))
    # opened at 100, 5 candidates by 120 (one per 4 s), 8 missing of 13: back in 32 s + U(0.05, 2)
    waits = [p.until_goal(120.0, 100.0, 5, 13, 400.0) for _ in range(2000)]
    assert 32.05 <= min(waits) < 32.1 and 33.95 < max(waits) <= 34.0
    # never past the selection timeout (then the round starts with what it has, or not)
    assert 10.05 <= p.until_goal(390.0, 100.0, 5, 13, 400.0) <= 12.0
    # the goal reached (a window kept open only by its length): just the spread
    assert 0.05 <= p.until_goal(120.0, 100.0, 13, 13, 400.0) <= 2.0
    # a window that opened this instant has seen no pace yet: it asks again soon
    assert 0.05 <= p.until_goal(100.0, 100.0, 1, 13, 400.0) <= 2.0


def _arrival_rate(processes: int, replicas: int, devices: int = 2000) -> float:
    """Check-ins per second, in the steady state, of ``devices`` that each come back when
    told, to any of ``processes`` coordinators (chosen at random, as a load balancer does)
    whose pacing assumes ``replicas``; rounds need R = 20 every P = 100 s."""
    cfg = PacingConfig(min_retry_s=1, max_retry_s=1e6, headroom=1.5, horizon_s=120,
                       replicas=replicas)  # fmt: skip
    pick = random.Random(7)
    nodes = [PaceSteering(cfg, random.Random(i)) for i in range(processes)]
    due = [(pick.uniform(0, 600), f"d{i}") for i in range(devices)]
    heapq.heapify(due)
    end, counted = 400_000.0, 0
    while due[0][0] < end:
        now, device = heapq.heappop(due)
        node = pick.choice(nodes)
        node.saw(device, now)
        wait = node.retry_after(now, 20, 100.0)
        node.expect(device, now, wait)
        heapq.heappush(due, (now + wait, device))
        counted += now >= end / 2
    return counted / (end / 2)


@pytest.mark.parametrize("devices", [100, 2000])  # waits shorter and longer than the horizon
def test_replicas_sharing_the_devices_ask_for_the_rate_one_coordinator_would(
    devices: int,
) -> None:
    wanted = 1.5 * 20 / 100.0  # headroom x R / P
    assert _arrival_rate(1, 1, devices) == pytest.approx(wanted, rel=0.05)
    # Two or three coordinators that know they share the devices: as one would.
    assert _arrival_rate(2, 2, devices) == pytest.approx(wanted, rel=0.05)
    assert _arrival_rate(3, 3, devices) == pytest.approx(wanted, rel=0.05)
    # Had each counted only the devices it saw lately, they would ask for far more.
    assert _arrival_rate(3, 1, devices) > 1.5 * wanted


def _coordinator(tmp_path: Path, clock: FakeClock, pacing: PacingConfig) -> Coordinator:
    cfg = CoordinatorConfig(db_path=str(tmp_path / "unused.db"), seed=5, pacing=pacing)
    return Coordinator(
        cfg, store=SQLiteStore(":memory:"), blobs=BlobStore(tmp_path / "blobs"), clock=clock
    )


def test_a_herd_is_turned_into_the_rate_rounds_need(tmp_path: Path, tiny_bundle: Path) -> None:
    """500 devices all check in within 10 s; the answers spread their later check-ins so that
    they arrive at lambda = h R / P per second, evenly."""
    from coordinator.admin import tar_directory

    clock = FakeClock(0.0)
    pacing = PacingConfig(min_retry_s=1, max_retry_s=1e6, jitter=0.5, headroom=1.5, horizon_s=600)
    coord = _coordinator(tmp_path, clock, pacing)
    bundle_id = coord.add_bundle(tar_directory(tiny_bundle))["bundle_id"]
    plan = {"goal": 10, "selection_window_s": 10.0, "round_deadline_s": 120.0}
    task = coord.create_task(json.dumps({"bundle_id": bundle_id, "plan": plan}).encode())
    coord.set_paused(task["task_id"], True)  # every check-in is answered with pace steering
    lam = 1.5 * 13 / 130.0  # target ceil(10 x 1.3), period = window + deadline

    devices = []
    for _ in range(500):
        reg = coord.register(b'{"runtimes": ["ort-step"]}')
        devices.append(DeviceIdentity(reg["device_id"], "default"))
    body = json.dumps({"runtimes": ["ort-step"], "conditions": GOOD_CONDITIONS}).encode()
    rng = random.Random(3)
    queue = [(rng.uniform(0, 10), i) for i in range(len(devices))]
    heapq.heapify(queue)
    arrivals = []
    horizon = 5 * 500 / lam
    while queue and queue[0][0] < horizon:
        t, i = heapq.heappop(queue)
        clock.set(t)
        answer = coord.checkin(devices[i], body)
        assert answer["reason"] == "paused"
        arrivals.append(t)
        heapq.heappush(queue, (t + answer["retry_after_s"], i))
    interval = 500 / lam
    # after the herd has been spread once, the rate is lambda and flat
    steady = np.array([t for t in arrivals if 2 * interval <= t < 4 * interval])
    rate = len(steady) / (2 * interval)
    assert rate == pytest.approx(lam, rel=0.1)
    counts, _ = np.histogram(steady, bins=20)
    assert counts.max() < 1.5 * counts.mean()
    # whereas the first 10 s saw all 500 at once
    assert sum(t < 10 for t in arrivals) >= 500
    coord.close()

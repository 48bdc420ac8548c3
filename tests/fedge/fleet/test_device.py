"""The emulated device's parts: shared-trainer views, the time model, fates, links, conditions."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edge_sdk.bundle import load_manifest
from edge_sdk.conditions import EligibilityPolicy
from edge_sdk.data import ArrayDataset
from edge_sdk.errors import ConditionsLapsed
from edge_sdk.local_training import Plan, train
from edge_sdk.pool import TrainerPool
from edge_sdk.trainers import load_trainer
from fedge.fleet.clock import SimClock
from fedge.fleet.datasets import load_digits
from fedge.fleet.device import (
    DeviceVanished,
    EmulatedTrainers,
    LinkTransport,
    ProfileConditions,
)
from fedge.fleet.heterogeneity import DAY_S, DeviceProfile, Heterogeneity

PLAN = Plan(batch_size=16, lr=0.1, epochs=1)


class ManualClock(SimClock):
    """A fleet clock that moves only when told to, recording the sleeps asked of it."""

    def __init__(self) -> None:
        super().__init__(speedup=1.0)
        self.t = 0.0
        self.slept: list[float] = []

    def now(self) -> float:
        return self.t

    def sleep_blocking(self, emulated_s: float) -> None:
        self.slept.append(emulated_s)


def _profile(**kw: object) -> DeviceProfile:
    (p,) = Heterogeneity(**{"compute_sigma": 0.0, **kw}).sample(1, seed=0)  # type: ignore[arg-type]
    return p


def _trainers(pool: TrainerPool, profile: DeviceProfile, clock: SimClock, n: int,
              step_time_s: float | None = None) -> EmulatedTrainers:
    return EmulatedTrainers(pool, profile=profile, clock=clock, num_examples=n,
                            conditions=ProfileConditions(profile, clock),
                            step_time_s=step_time_s)


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    train_set, _ = load_digits(seed=0)
    return train_set.x[:200], train_set.y[:200]


def test_devices_sharing_one_trainer_get_what_a_dedicated_trainer_gives(
    digits_bundle: Path, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    manifest = load_manifest(digits_bundle)
    pool = TrainerPool("ort-step")
    clock = SimClock()
    x, y = digits
    halves = [(x[:100], y[:100]), (x[100:], y[100:])]
    start = load_trainer(digits_bundle, backend="ort-step").get_parameters()
    # Two devices step alternately on the one shared trainer.
    devices = [_trainers(pool, _profile(), clock, 100) for _ in halves]
    leases = [d.lease(digits_bundle, manifest) for d in devices]
    views = [lease.__enter__() for lease in leases]
    for v in views:
        v.set_parameters(start)
        v.reset_optimizer()
    for i in range(0, 100, 20):
        for v, (hx, hy) in zip(views, halves, strict=True):
            v.train_step(hx[i : i + 20], hy[i : i + 20], lr=0.1)
    got = [v.get_parameters() for v in views]
    for lease in leases:
        lease.__exit__(None, None, None)
    assert pool.loads == 1
    # Reference: a trainer of its own per device, same batches in the same order.
    for (hx, hy), params in zip(halves, got, strict=True):
        ref = load_trainer(digits_bundle, backend="ort-step")
        ref.set_parameters(start)
        for i in range(0, 100, 20):
            ref.train_step(hx[i : i + 20], hy[i : i + 20], lr=0.1)
        np.testing.assert_array_equal(params, ref.get_parameters())
    assert not np.array_equal(got[0], got[1])


def test_a_job_takes_its_modelled_compute_time(
    digits_bundle: Path, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    manifest = load_manifest(digits_bundle)
    # A slow speedup leaves each modelled step ~30 ms of real time, so a loaded machine's
    # real step time stays inside it (no overrun) and the bounds below are not a race.
    clock = SimClock(speedup=2.0)
    profile = _profile(compute_median=3.0)
    trainers = _trainers(TrainerPool("ort-step"), profile, clock, 160, step_time_s=0.02)
    x, y = digits
    t0 = clock.now()
    with trainers.lease(digits_bundle, manifest) as view:
        result = train(view, ArrayDataset(x[:160], y[:160]), PLAN, view.get_parameters(),
                       round_=0, rng=np.random.default_rng(0))
        view.get_parameters()
    elapsed = clock.now() - t0
    modelled = result.steps * 0.02 * 3.0  # steps x step time x the device's multiplier
    assert result.steps == 10
    assert trainers.log.emulated_compute_s == pytest.approx(modelled, rel=0.01)
    assert trainers.log.overruns == 0
    # The emulated clock really advanced by the modelled time, and not twice over.
    assert modelled <= elapsed < 1.5 * modelled


def test_dropout_vanishes_at_its_step_without_a_word(
    digits_bundle: Path, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    manifest = load_manifest(digits_bundle)
    profile = _profile(dropout_prob=1.0)
    fate = profile.job_fate(0)
    assert fate.dropout_at is not None
    trainers = _trainers(TrainerPool("ort-step"), profile, SimClock(), 160)
    x, y = digits
    with pytest.raises(DeviceVanished), trainers.lease(digits_bundle, manifest) as view:
        train(view, ArrayDataset(x[:160], y[:160]), PLAN, view.get_parameters(),
              round_=0, rng=np.random.default_rng(0))
        view.get_parameters()
    assert trainers.log.steps == int(fate.dropout_at * 10)
    # BaseException, so that the client's `except Exception` (which would abort) misses it.
    assert not issubclass(DeviceVanished, Exception)


def test_a_lapse_mid_job_makes_the_recheck_fail(
    digits_bundle: Path, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    manifest = load_manifest(digits_bundle)
    profile = _profile(lapse_prob=1.0)
    clock = ManualClock()
    trainers = _trainers(TrainerPool("ort-step"), profile, clock, 160)
    policy = EligibilityPolicy()
    assert policy.check(trainers.conditions.read())[0]
    x, y = digits
    plan = Plan(batch_size=16, lr=0.1, epochs=1, recheck_every_steps=1)

    def recheck() -> tuple[str, ...]:
        ok, reasons = policy.check(trainers.conditions.read())
        return () if ok else tuple(reasons)

    with pytest.raises(ConditionsLapsed), trainers.lease(digits_bundle, manifest) as view:
        train(view, ArrayDataset(x[:160], y[:160]), plan, view.get_parameters(), round_=0,
              rng=np.random.default_rng(0), recheck=recheck)
    fate = profile.job_fate(0)
    assert fate.lapse_at is not None
    assert trainers.log.steps == int(fate.lapse_at * 10) + 1
    clock.t += fate.lapse_s + 1  # the user puts it down again
    assert policy.check(trainers.conditions.read())[0]


def test_conditions_follow_the_profile_schedule_over_days() -> None:
    clock = ManualClock()
    clock.t = 1234.0
    profile = Heterogeneity(availability="diurnal", start_hour=20.0).sample(40, seed=1)[7]
    provider = ProfileConditions(profile, clock)
    for t in np.linspace(1234.0, 1234.0 + 2.5 * DAY_S, 700):
        clock.t = float(t)
        c, want = provider.read(), profile.conditions_at(float(t))
        assert (c.charging, c.idle, c.unmetered) == (want.charging, want.idle, want.unmetered)


@pytest.fixture()
def echo_server() -> Iterator[str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            body = b"x" * 50_000
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_link_transport_charges_the_links_transfer_time(echo_server: str) -> None:
    profile = _profile(download_mbps=4.0, upload_mbps=1.0, download_sigma=0.0, upload_sigma=0.0)
    clock = ManualClock()
    with LinkTransport(echo_server, profile=profile, clock=clock) as t:
        response = t.request("POST", "/", body=b"u" * 20_000)
    assert len(response.body) == 50_000
    # 20 kB up at 1 Mbit/s = 0.16 s before sending; 50 kB down at 4 Mbit/s = 0.1 s after.
    assert clock.slept == [pytest.approx(0.16), pytest.approx(0.1)]

"""The fleet: N emulated devices, each a real SDK client, against one coordinator over HTTP.

::

    fleet = Fleet("http://127.0.0.1:8080", partitions, heterogeneity=Heterogeneity.realistic(),
                  seed=0, clock=SimClock(speedup=60))
    with fleet:                                  # devices run in a background thread
        fleet.wait_for(lambda: admin.task(task_id)["rounds_completed"] >= 10, timeout_s=300)
    print(fleet.summary().as_dict())

How thousands fit in one process on two cores: one asyncio loop holds a coroutine per device
that mostly sleeps on the fleet's :class:`~fedge.fleet.clock.SimClock` (pace steering, being
ineligible); a device's blocking pass (:meth:`Client.run_once`: check-in, download, training,
upload) runs in a bounded thread pool; all devices share one bundle cache and one loaded
trainer per bundle (:class:`~fedge.fleet.device.EmulatedTrainer`); each holds only its client,
its partition and a keep-alive socket.

Each device has its own state directory (credential, error-feedback residuals) under
``state_root`` and registers with the coordinator on its first eligible pass.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import logging
import random
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from edge_sdk.cache import BundleCache
from edge_sdk.client import Client, ClientConfig, Outcome
from edge_sdk.pool import TrainerPool
from edge_sdk.tls import TlsConfig
from fedge.fleet.attacks import Attack, AttackTransport
from fedge.fleet.clock import SimClock
from fedge.fleet.datasets import Dataset
from fedge.fleet.device import (
    DeviceVanished,
    EmulatedTrainers,
    LinkTransport,
    ProfileConditions,
)
from fedge.fleet.heterogeneity import DeviceProfile, Heterogeneity
from fedge.fleet.running import FleetRun
from fedge.fleet.runtime import TORCH_FREE_BACKENDS, import_ort_without_training

__all__ = ["VANISHED", "Fleet", "FleetSummary", "status_line"]

VANISHED = "vanished"  # the outcome the emulator records for a mid-job dropout
CRASHED = "crashed"  # a pass raised past the client's error handling (a bug)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FleetSummary:
    devices: int
    checkins: int  # answered check-ins (wait, train, evaluate)
    tasks_started: int  # training/evaluation jobs begun on a device
    uploads_acknowledged: int
    evaluations_reported: int
    aborts: int  # conditions lapsed mid-job; the client told the coordinator
    dropouts: int  # vanished mid-job without a word
    rejected: int  # uploads the coordinator refused (late, stale)
    failures: int  # passes that failed (network, coordinator errors)
    ineligible_checks: int  # local checks that found the device ineligible (no network)
    devices_registered: int
    bytes_up: int  # request bodies, all devices
    bytes_down: int  # response bodies, all devices
    update_bytes: int  # encoded deltas in acknowledged uploads
    emulated_s: float
    wall_s: float
    speedup: float
    time_overruns: int  # steps whose real time exceeded the modelled compute time
    lag_p50_s: float  # real seconds passes started after their due time (recent passes)
    lag_p95_s: float

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["emulated_s"] = round(self.emulated_s, 3)
        d["wall_s"] = round(self.wall_s, 3)
        d["lag_p50_s"] = round(self.lag_p50_s, 4)
        d["lag_p95_s"] = round(self.lag_p95_s, 4)
        return d


def status_line(s: FleetSummary) -> str:
    """The one-line progress of a fleet (one process or the sum of its parts)."""
    return (
        f"[fleet] t={s.emulated_s:,.0f}s (x{s.speedup:g}) devices {s.devices}"
        f" | check-ins {s.checkins} | jobs {s.tasks_started} | uploads "
        f"{s.uploads_acknowledged} | aborts {s.aborts} | dropouts {s.dropouts}"
        f" | up {s.bytes_up / 1e6:.2f} MB down {s.bytes_down / 1e6:.2f} MB"
    )


class _Device:
    def __init__(self, fleet: Fleet, index: int, data: Dataset, profile: DeviceProfile) -> None:
        self.index = index
        self.profile = profile
        self.conditions = ProfileConditions(profile, fleet.clock)
        self.trainers = EmulatedTrainers(
            fleet.pool, profile=profile, clock=fleet.clock, num_examples=len(data),
            conditions=self.conditions, step_time_s=fleet.step_time_s,
        )
        seed = int(np.random.SeedSequence([fleet.seed, index, 1]).generate_state(1)[0])
        config = dataclasses.replace(fleet.client_config, seed=seed)
        attack = fleet.attacks.get(index)
        link: Callable[..., LinkTransport] = (
            LinkTransport if attack is None else functools.partial(AttackTransport, attack=attack)
        )
        self.client = Client(
            fleet.url,
            state_dir=fleet.state_root / f"device-{index:05d}",
            data=(data.x, data.y),
            conditions=self.conditions,
            config=config,
            cache=fleet.cache,
            trainers=self.trainers,  # duck-typed: anything with lease(bundle_dir, manifest)
            clock=fleet.clock.now,
            sleep=fleet.clock.sleep_blocking,
            transport=link(
                fleet.url, profile=profile, clock=fleet.clock, timeout=config.request_timeout_s,
                retry=config.retry, rng=random.Random(seed), tls=config.tls,
            ),
        )
        self._rejoin_rng = random.Random(seed + 1)
        self._rejoin_s = fleet.rejoin_s

    def run_once(self, due: float, lags: deque[float]) -> Outcome:
        # How late the pass starts against its schedule: event loop and thread pool backlog.
        lags.append(time.monotonic() - due)
        try:
            return self.client.run_once()
        except DeviceVanished:
            # The app was killed: its connection goes with it; it restarts a while later.
            self.client.transport.close()
            return Outcome(VANISHED, self._rejoin_s * self._rejoin_rng.uniform(0.5, 1.5))


class Fleet(FleetRun):
    """N emulated devices; ``datasets[i]`` is device i's local data (see the module docstring).

    ``heterogeneity`` (default: uniform devices) draws each device's profile from ``seed``;
    ``clock`` sets the time acceleration (default real time); ``step_time_s`` is the modelled
    time of one training step before the device's multiplier (None: the step's real time on
    this host); ``client_config`` is the base :class:`ClientConfig` (its seed is replaced per
    device). ``progress`` writes one updating status line to a stream (True: stderr).
    ``enrollment_token`` (what devices register with) and ``tls`` (CA bundle, pin) go into
    every device's config. ``attacks`` makes the devices at those indices hostile
    (:mod:`fedge.fleet.attacks`: they train honestly and tamper with their uploads).
    ``first_index`` numbers the devices from there (profiles, seeds, state directories and
    attacks follow the global index): one part of a fleet split over processes
    (:mod:`fedge.fleet.processes`) is the same devices it would be in one process.
    ``cache_root`` is where the devices' shared bundle cache lives (default
    ``state_root/bundles``; a cache serves one process, so each part has its own).
    """

    def __init__(
        self,
        coordinator: str,
        datasets: Sequence[Dataset],
        *,
        heterogeneity: Heterogeneity | None = None,
        seed: int = 0,
        clock: SimClock | None = None,
        state_root: Path | str | None = None,
        backend: str | None = "ort-step",
        step_time_s: float | None = None,
        workers: int | None = None,
        start_spread_s: float = 5.0,
        rejoin_s: float = 300.0,
        client_config: ClientConfig | None = None,
        progress: bool | TextIO = False,
        enrollment_token: str | None = None,
        tls: TlsConfig | None = None,
        attacks: Mapping[int, Attack] | None = None,
        first_index: int = 0,
        cache_root: Path | str | None = None,
    ) -> None:
        if not datasets:
            raise ValueError("a fleet needs at least one device")
        self.url = coordinator
        self.seed = seed
        self.first_index = first_index
        self.attacks = dict(attacks or {})
        self.heterogeneity = heterogeneity or Heterogeneity.uniform()
        self.clock = clock or SimClock()
        self.step_time_s = step_time_s
        self.start_spread_s = start_spread_s
        self.rejoin_s = rejoin_s
        self.client_config = client_config or ClientConfig(backend=backend)
        if client_config is not None and backend is not None and client_config.backend is None:
            self.client_config = dataclasses.replace(client_config, backend=backend)
        if enrollment_token is not None:
            self.client_config = dataclasses.replace(
                self.client_config, enrollment_token=enrollment_token
            )
        if tls is not None:
            self.client_config = dataclasses.replace(self.client_config, tls=tls)
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if state_root is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="fedge-fleet-")
            state_root = self._tmp.name
        self.state_root = Path(state_root)
        self.state_root.mkdir(parents=True, exist_ok=True)
        self.cache = BundleCache(self.state_root / "bundles" if cache_root is None else cache_root)
        if self.client_config.backend in TORCH_FREE_BACKENDS:
            import_ort_without_training()  # keeps ~280 MB of torch out of a fleet process
        self.pool = TrainerPool(self.client_config.backend)
        self.workers = workers or min(len(datasets), 128)
        self.profiles = [self.heterogeneity.sample_one(first_index + i, seed)
                         for i in range(len(datasets))]
        self.devices = [
            _Device(self, first_index + i, data, profile)
            for i, (data, profile) in enumerate(zip(datasets, self.profiles, strict=True))
        ]
        self._progress: TextIO | None = sys.stderr if progress is True else (progress or None)
        self._outcomes: Counter[str] = Counter()
        self._lags: deque[float] = deque(maxlen=5_000)
        self._update_bytes = 0
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started_wall = 0.0
        self._started_emulated = 0.0
        self._ended: tuple[float, float] | None = None
        self._error: BaseException | None = None
        self.on_outcome: Callable[[int, Outcome], None] | None = None

    # -- life cycle -------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the fleet is already running")
        ready = threading.Event()
        self._thread = threading.Thread(target=self._main, args=(ready,), name="fedge-fleet",
                                        daemon=True)
        self._thread.start()
        ready.wait()

    def stop(self) -> FleetSummary:
        """Stop every device and summarize. Halts the clock (its blocking sleeps return at
        once from now on), so passes in flight finish quickly; a clock serves one run."""
        if self._thread is not None and self._loop is not None and self._stop is not None:
            self.clock.halt()
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join()
        for d in self.devices:
            d.client.close()
        if self._error is not None:
            raise RuntimeError("the fleet's event loop failed") from self._error
        return self.summary()

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> Fleet:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def alive(self) -> bool:
        return self._thread is None or self._thread.is_alive()

    # -- the loop ---------------------------------------------------------------------------

    def _main(self, ready: threading.Event) -> None:
        try:
            asyncio.run(self._run(ready))
        except BaseException as e:  # surfaced by stop()
            self._error = e
            ready.set()

    async def _run(self, ready: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        executor = concurrent.futures.ThreadPoolExecutor(self.workers, "fedge-device")
        rng = random.Random(self.seed)
        # Past the draws of the devices before this part's first (one random() per uniform()):
        # a part of a split fleet starts device i when one fleet would, not with device 0's
        # delay, and a one-process fleet keeps the delays it always had.
        for _ in range(self.first_index):
            rng.random()
        self._started_wall = time.monotonic()
        self._started_emulated = self.clock.now()
        tasks = [asyncio.create_task(self._device(d, executor, rng.uniform(0, self.start_spread_s)))
                 for d in self.devices]
        if self._progress is not None:
            tasks.append(asyncio.create_task(self._show_progress()))
        ready.set()
        await self._stop.wait()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # Passes in flight finish quickly: the clock is halted, so their sleeps return at once.
        await asyncio.to_thread(executor.shutdown, wait=True)
        self._ended = (time.monotonic(), self.clock.now())
        if self._progress is not None:
            self._progress.write("\r" + self._status_line() + "\n")
            self._progress.flush()

    async def _device(self, device: _Device, executor: concurrent.futures.Executor,
                      delay_s: float) -> None:
        loop = asyncio.get_running_loop()
        wait_s = delay_s
        while True:
            due = time.monotonic() + self.clock.real_seconds(wait_s)
            await self.clock.sleep(wait_s)
            try:
                outcome = await loop.run_in_executor(executor, device.run_once, due, self._lags)
            except Exception:
                # A bug below the client's own error handling: keep the device, say so.
                log.exception("device %d: pass crashed", device.index)
                outcome = Outcome(CRASHED, self.rejoin_s)
            self._record(device.index, outcome)
            wait_s = outcome.next_run_in_s

    def _record(self, index: int, outcome: Outcome) -> None:
        self._outcomes[outcome.action] += 1
        if outcome.action == "trained":
            self._update_bytes += int(outcome.metrics.get("bytes_up", 0))
        if self.on_outcome is not None:
            self.on_outcome(index, outcome)

    async def _show_progress(self) -> None:
        assert self._progress is not None
        while True:
            self._progress.write("\r" + self._status_line() + "\x1b[K")
            self._progress.flush()
            await asyncio.sleep(0.5)

    def _status_line(self) -> str:
        return status_line(self.summary())

    # -- results ----------------------------------------------------------------------------

    def summary(self) -> FleetSummary:
        o = self._outcomes
        answered = ("wait", "trained", "evaluated", "aborted", "rejected", VANISHED)
        now_wall, now_emulated = self._ended or (time.monotonic(), self.clock.now())
        logs = [d.trainers.log for d in self.devices]
        lags = list(self._lags)
        return FleetSummary(
            devices=len(self.devices),
            checkins=sum(o[a] for a in answered),
            tasks_started=sum(log.jobs for log in logs),
            uploads_acknowledged=o["trained"]
            + sum(d.client.acknowledged_on_resend for d in self.devices),
            evaluations_reported=o["evaluated"],
            aborts=o["aborted"],
            dropouts=o[VANISHED],
            rejected=o["rejected"],
            failures=o["failed"] + o[CRASHED],
            ineligible_checks=o["ineligible"],
            devices_registered=sum(d.client.device_id is not None for d in self.devices),
            bytes_up=sum(d.client.transport.bytes_sent for d in self.devices),
            bytes_down=sum(d.client.transport.bytes_received for d in self.devices),
            update_bytes=self._update_bytes,
            emulated_s=now_emulated - self._started_emulated,
            wall_s=now_wall - self._started_wall if self._started_wall else 0.0,
            speedup=self.clock.speedup,
            time_overruns=sum(log.overruns for log in logs),
            lag_p50_s=float(np.percentile(lags, 50)) if lags else 0.0,
            lag_p95_s=float(np.percentile(lags, 95)) if lags else 0.0,
        )

    def device_ids(self) -> list[str | None]:
        """The coordinator's id of each device (None until it registered)."""
        return [d.client.device_id for d in self.devices]

"""One emulated device: a real :class:`edge_sdk.client.Client` wired to emulated hardware.

The client is the SDK's own, unchanged; the emulator replaces only what hardware would give it:

* :class:`ProfileConditions` — the conditions provider: the device's day schedule at the
  fleet clock's time, plus a lapse (the user picks the device up) switched on mid-job;
* :class:`LinkTransport` — the SDK transport whose transfers also take the emulated link's
  time (``8 * bytes / Mbit/s``, slept on the fleet clock);
* :class:`EmulatedTrainer` — a per-device view of the fleet's one shared trainer per bundle:
  the device's parameters are swapped in for each step (exact for stateless optimizers, i.e.
  SGD without momentum; otherwise the view holds the shared trainer for the whole job), each
  step also takes the device's emulated compute time, and the job's fate (dropout, lapse) is
  played out at its step.

A dropout raises :class:`DeviceVanished`, a ``BaseException`` so that the client's own error
handling (which would tell the coordinator) does not see it: the device simply disappears
mid-round, closes its connection and comes back after ``rejoin_s``, as a killed app would.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from edge_sdk.bundle import Manifest
from edge_sdk.conditions import ConditionsProvider, DeviceConditions, ScriptedConditions
from edge_sdk.pool import TrainerPool
from edge_sdk.trainers.base import Trainer
from edge_sdk.transport import Response, Transport
from fedge.fleet.clock import SimClock
from fedge.fleet.heterogeneity import DAY_S, DeviceProfile, JobFate

__all__ = [
    "DeviceVanished",
    "EmulatedTrainer",
    "EmulatedTrainers",
    "JobLog",
    "LinkTransport",
    "ProfileConditions",
]

# Sleep owed compute time in chunks of at least this many real seconds (fewer, longer sleeps).
_MIN_SLEEP_S = 0.002


class DeviceVanished(BaseException):
    """The emulated device died mid-job (a ``BaseException``: the client must not handle it)."""


class ProfileConditions(ConditionsProvider):
    """The device's day schedule as a repeating :class:`ScriptedConditions` on the fleet
    clock, with a lapse overlay: while the user holds the device it is not idle."""

    def __init__(self, profile: DeviceProfile, clock: SimClock) -> None:
        self.profile = profile
        self.clock = clock
        steps = [(at, DeviceConditions(**c.as_dict())) for at, c in profile.script(clock.now())]
        self.script = ScriptedConditions(steps, clock=clock.now, period=DAY_S)
        self._busy_until = -math.inf

    def lapse(self, duration_s: float) -> None:
        """The user takes the device now, for ``duration_s`` emulated seconds."""
        self._busy_until = self.clock.now() + duration_s

    def read(self) -> DeviceConditions:
        c = self.script.read()
        if c.idle and self.clock.now() < self._busy_until:
            return c.replace(idle=False)
        return c


class LinkTransport(Transport):
    """A :class:`Transport` whose bodies also take the emulated link's time: an upload's before
    it is sent (a slow uplink can miss the deadline), a download's after it arrived."""

    def __init__(self, base_url: str, *, profile: DeviceProfile, clock: SimClock,
                 **kwargs: Any) -> None:
        super().__init__(base_url, sleep=clock.sleep_blocking, **kwargs)
        self.profile = profile
        self.clock = clock

    def _after_download(self, before: int) -> None:
        down = self.bytes_received - before
        self.clock.sleep_blocking(self.profile.transfer_time_s(bytes_down=down))

    def request(self, method: str, path: str, *, body: bytes = b"",
                headers: Any = None) -> Response:
        self.clock.sleep_blocking(self.profile.transfer_time_s(bytes_up=len(body)))
        before = self.bytes_received
        response = super().request(method, path, body=body, headers=headers)
        self._after_download(before)
        return response

    def download(self, path: str, sink: BinaryIO, *, limit: int) -> Response:
        before = self.bytes_received
        response = super().download(path, sink, limit=limit)
        self._after_download(before)
        return response


class JobLog:
    """Counters one device's jobs add to (read by the fleet for its summary)."""

    def __init__(self) -> None:
        self.jobs = 0
        self.steps = 0
        self.emulated_compute_s = 0.0
        self.overruns = 0  # steps whose real time alone exceeded the modelled time


class EmulatedTrainer(Trainer):
    """The device's own parameters and proximal term over the fleet's shared trainer."""

    def __init__(
        self,
        lease: Callable[[], AbstractContextManager[Trainer]],
        manifest: Manifest,
        *,
        device: EmulatedTrainers,
        fate: JobFate,
    ) -> None:
        self.manifest = manifest
        self._lease = lease
        # The device's profile, clock, data size, conditions, job log and step time.
        self._device = device
        self._fate = fate
        self._params = np.zeros(manifest.num_parameters, np.float32)
        self._anchor: np.ndarray | None = None
        self._mu = 0.0
        self._steps = 0
        self._debt_real_s = 0.0
        self._drop_step: int | None = None
        self._lapse_step: int | None = None
        self.backend = "emulated"

    def _plan_fate(self, batch: int) -> None:
        # Fates are placed within the job's first epoch: the step count of the whole job is
        # not known to a trainer, one epoch's is.
        epoch_steps = max(1, math.ceil(self._device.num_examples / max(batch, 1)))
        if self._fate.dropout_at is not None:
            self._drop_step = int(self._fate.dropout_at * epoch_steps)
        if self._fate.lapse_at is not None:
            self._lapse_step = int(self._fate.lapse_at * epoch_steps)

    def get_parameters(self) -> np.ndarray:
        self._settle()
        if self._drop_step is not None:
            raise DeviceVanished  # the job ended before its dropout step: vanish before upload
        return self._params.copy()

    def set_parameters(self, vec: np.ndarray) -> None:
        vec = np.asarray(vec, np.float32)
        if vec.shape != self._params.shape:
            raise ValueError(f"expected {self._params.size} parameters, got shape {vec.shape}")
        self._params = vec.copy()

    def reset_optimizer(self) -> None:
        with self._lease() as t:
            t.reset_optimizer()

    def set_proximal(self, anchor: np.ndarray | None, mu: float) -> None:
        with self._lease() as t:
            t.set_proximal(anchor, mu)  # raises BundleNotSupported where the backend has none
        self._anchor = None if anchor is None else np.asarray(anchor, np.float32).copy()
        self._mu = mu

    def train_step(self, x: np.ndarray, y: np.ndarray, lr: float | None = None) -> float:
        if self._steps == 0:
            self._plan_fate(len(x))
        if self._drop_step is not None and self._steps >= self._drop_step:
            raise DeviceVanished
        if self._lapse_step is not None and self._steps >= self._lapse_step:
            self._device.conditions.lapse(self._fate.lapse_s)
            self._lapse_step = None
        with self._lease() as t:
            started = time.perf_counter()
            t.set_parameters(self._params)
            t.set_proximal(self._anchor, self._mu)
            loss = t.train_step(x, y, lr=lr)
            self._params = t.get_parameters()
            real = time.perf_counter() - started
        self._charge(real)
        self._steps += 1
        return loss

    def _charge(self, real_s: float) -> None:
        """Owe the step's emulated compute time minus what its real run already took."""
        base = real_s if self._device.step_time_s is None else self._device.step_time_s
        modelled = base * self._device.profile.compute_multiplier
        used = real_s * self._device.clock.speedup
        self._device.log.steps += 1
        self._device.log.emulated_compute_s += max(modelled, used)
        if used > modelled:
            self._device.log.overruns += 1
        self._debt_real_s += self._device.clock.real_seconds(modelled - used)
        if self._debt_real_s >= _MIN_SLEEP_S:
            self._settle()

    def _settle(self) -> None:
        if self._debt_real_s > 0:
            self._device.clock.sleep_blocking(self._debt_real_s * self._device.clock.speedup)
            self._debt_real_s = 0.0

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
        with self._lease() as t:
            t.set_parameters(self._params)
            return t.evaluate(x, y)

    def predict(self, x: np.ndarray) -> np.ndarray:
        with self._lease() as t:
            t.set_parameters(self._params)
            return t.predict(x)


class EmulatedTrainers:
    """What a device's client takes as ``trainers=``: each lease is one job on an
    :class:`EmulatedTrainer` over the fleet's shared :class:`TrainerPool`."""

    def __init__(self, pool: TrainerPool, *, profile: DeviceProfile, clock: SimClock,
                 num_examples: int, conditions: ProfileConditions,
                 step_time_s: float | None) -> None:
        self.pool = pool
        self.profile = profile
        self.clock = clock
        self.num_examples = num_examples
        self.conditions = conditions
        self.step_time_s = step_time_s
        self.log = JobLog()
        self._lock = threading.Lock()

    @contextmanager
    def lease(self, bundle_dir: Path, manifest: Manifest) -> Iterator[Trainer]:
        with self._lock:
            job = self.log.jobs
            self.log.jobs += 1

        def view(lease: Callable[[], AbstractContextManager[Trainer]]) -> EmulatedTrainer:
            return EmulatedTrainer(lease, manifest, device=self, fate=self.profile.job_fate(job))

        if not manifest.raw.get("optimizer_state"):
            # A stateless optimizer (plain SGD): swapping parameters per step is exact, so
            # the shared trainer is taken only for the step itself.
            yield view(lambda: self.pool.lease(bundle_dir, manifest))
            return
        # Momentum or Adam state cannot be swapped: hold the shared trainer for the whole job.
        with self.pool.lease(bundle_dir, manifest) as held:
            yield view(lambda: nullcontext(held))

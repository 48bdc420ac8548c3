"""Emulated time: one clock for a whole fleet (and, when it allows, its coordinator).

Emulated time runs ``speedup`` times faster than real time: ``now()`` is the emulated seconds
since the clock started, and sleeping ``s`` emulated seconds sleeps ``s / speedup`` real ones.
Waits dominate an idle fleet (pace steering asks devices to come back in minutes; a diurnal
schedule spans a day), so a speedup of 100-1000 compresses a day into minutes.

Work that really runs (HTTP calls, training steps) also advances emulated time at ``speedup``
times its real duration. The emulator models a device's compute time as
``steps * step_time_s * multiplier`` (:class:`fedge.fleet.heterogeneity.DeviceProfile`) and
sleeps only the part the real work did not already use; when the real work alone overruns the
model (a large speedup on a fast device) the overrun is counted (``time_overruns`` in the
summary) rather than hidden. Keep ``speedup * real_step_time`` below the modelled step time.

A clock is shared across processes by its :meth:`SimClock.spec` (speedup, start and its origin
on the host's monotonic clock, which every process of one machine reads alike): a fleet split
over processes, and a coordinator in another, all see the same emulated time.
"""

from __future__ import annotations

import asyncio
import threading
import time

__all__ = ["SimClock", "UnixClock"]


class SimClock:
    def __init__(self, speedup: float = 1.0, start: float = 0.0,
                 origin: float | None = None) -> None:
        if not speedup > 0:
            raise ValueError(f"speedup must be > 0, got {speedup}")
        self.speedup = float(speedup)
        self._origin = time.monotonic() if origin is None else float(origin)
        self._start = float(start)
        self._halted = threading.Event()

    def spec(self) -> tuple[float, float, float]:
        """``(speedup, start, origin)``: ``SimClock(*spec)`` in another process of this host
        reads the same emulated time (``time.monotonic`` is system-wide)."""
        return (self.speedup, self._start, self._origin)

    def now(self) -> float:
        """Emulated seconds: ``start`` plus ``speedup`` times the real time elapsed."""
        return self._start + (time.monotonic() - self._origin) * self.speedup

    def real_seconds(self, emulated_s: float) -> float:
        return max(0.0, emulated_s) / self.speedup

    async def sleep(self, emulated_s: float) -> None:
        await asyncio.sleep(self.real_seconds(emulated_s))

    def sleep_blocking(self, emulated_s: float) -> None:
        """Sleep in a worker thread; returns at once after :meth:`halt`."""
        self._halted.wait(self.real_seconds(emulated_s))

    def halt(self) -> None:
        """End every current and later blocking sleep at once (a fleet shutting down)."""
        self._halted.set()

    def unix(self, epoch: float | None = None) -> UnixClock:
        """This clock as Unix seconds (``epoch`` + emulated time), the ``now()`` a coordinator
        reads: run it on the fleet's clock and its deadlines and pace steering speed up too."""
        return UnixClock(self, time.time() if epoch is None else epoch)

    async def sleep_until(self, emulated_t: float) -> None:
        await self.sleep(emulated_t - self.now())


class UnixClock:
    def __init__(self, sim: SimClock, epoch: float) -> None:
        self.sim = sim
        self.epoch = epoch

    def now(self) -> float:
        return self.epoch + self.sim.now()

"""Waiting on a running fleet, the same way for one process and for many.

:class:`FleetRun` gives :meth:`~FleetRun.wait_for` and :meth:`~FleetRun.run` to anything that
can start, stop (returning a :class:`~fedge.fleet.emulator.FleetSummary`), summarize, close,
say whether it is still alive, and has a :class:`~fedge.fleet.clock.SimClock`.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedge.fleet.clock import SimClock
    from fedge.fleet.emulator import FleetSummary

__all__ = ["FleetRun"]


class FleetRun(ABC):
    clock: SimClock

    @abstractmethod
    def start(self) -> None: ...

    @abstractmethod
    def stop(self) -> FleetSummary: ...

    @abstractmethod
    def summary(self) -> FleetSummary: ...

    @abstractmethod
    def close(self) -> None:
        """Remove what the fleet made for itself (its temporary state directory)."""

    @abstractmethod
    def alive(self) -> bool:
        """False once the devices stopped running on their own (a failure)."""

    def ready(self) -> bool:
        """True once the devices run (a fleet in parts: once every part has reported)."""
        return True

    def wait_for(self, predicate: Callable[[], bool], timeout_s: float,
                 poll_s: float = 0.2) -> bool:
        """Poll ``predicate`` (in the caller's thread) until true or ``timeout_s`` real seconds."""
        deadline = time.monotonic() + timeout_s
        while True:
            if predicate():
                return True
            if time.monotonic() >= deadline or not self.alive():
                return False
            time.sleep(poll_s)

    def run(self, *, until: Callable[[], bool] | None = None, emulated_s: float | None = None,
            timeout_s: float = math.inf, poll_s: float = 0.2) -> FleetSummary:
        """Run until ``until()`` holds, ``emulated_s`` of fleet time pass once the devices run
        (:meth:`ready`), or ``timeout_s``."""
        self.start()
        deadline = time.monotonic() + timeout_s
        asked = False

        def stop() -> bool:
            nonlocal asked
            asked = asked or (until is not None and until())
            return asked

        try:
            # A fleet in parts spawns processes (or Ray tasks) that import and load their
            # data before any device runs: counted in the duration, that start-up could
            # take all of a short run at a high speedup.
            self.wait_for(lambda: stop() or self.ready(), timeout_s, poll_s)
            end = None if emulated_s is None else self.clock.now() + emulated_s
            if not asked:
                self.wait_for(
                    lambda: stop() or (end is not None and self.clock.now() >= end),
                    max(0.0, deadline - time.monotonic()), poll_s,
                )
        finally:
            summary = self.stop()
        return summary

"""Readiness: whether this process can serve now, for a load balancer's or an orchestrator's
check (``GET /v1/ready``); ``GET /v1/health`` only says the process answers.

Derived from the deadline ticks, which read the store on the worker thread every
``tick_interval_s`` whether or not requests come: ready while the last tick succeeded and
one finished within ``stale_after_s``. A replica whose database went away (a lost
connection, a failover, a dropped schema) or whose worker is stuck stops being ready, and is
ready again after its next good tick, without a restart. Nothing is probed on the request's
path: a check costs no database round trip and never waits behind the worker.

Knows ticks only: must not import the service, the store or the HTTP layer.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["Readiness", "stale_after"]


def stale_after(tick_interval_s: float) -> float:
    """How long without a finished tick means stuck: well past a tick's period, and past
    what one slow operation ahead of it on the worker (a large commit) may take."""
    return max(10.0, 20.0 * tick_interval_s)


class Readiness:
    """The last tick's outcome; :meth:`problem` is what a check answers."""

    def __init__(self, stale_after_s: float, clock: Callable[[], float] = time.monotonic):
        self.stale_after_s = stale_after_s
        self._clock = clock
        self._finished: float | None = None  # when the last good tick finished
        self._failure: str | None = None  # what the last tick raised, if it failed

    def succeeded(self) -> None:
        self._finished = self._clock()
        self._failure = None

    def failed(self, error: BaseException) -> None:
        self._failure = f"{type(error).__name__}: {error}"

    def problem(self) -> str | None:
        """Why this process is not ready, or None."""
        if self._failure is not None:
            return f"the last tick failed ({self._failure})"
        if self._finished is None:
            return "starting: no tick has finished yet"
        age = self._clock() - self._finished
        if age > self.stale_after_s:
            return f"no tick has finished for {age:.1f} s (the worker is stuck or overrun)"
        return None

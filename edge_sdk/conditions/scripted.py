"""Conditions that follow a script: for tests and the fleet emulator.

>>> clock = FakeClock()
>>> provider = ScriptedConditions([(0, GOOD), (30, GOOD.replace(charging=False))], clock=clock)
>>> provider.read().charging
True
>>> clock.advance(31); provider.read().charging
False
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from edge_sdk.conditions.base import ConditionsProvider, DeviceConditions

__all__ = ["FakeClock", "ScriptedConditions"]


class FakeClock:
    """A clock that moves only when told to (seconds, like :func:`time.monotonic`)."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class ScriptedConditions(ConditionsProvider):
    """A schedule of ``(seconds after start, conditions)``; each state holds until the next.

    With ``period`` the schedule repeats (a device that charges every night). ``set`` replaces
    the script by one state from now on (a test flipping a condition mid-training). Safe to
    read from a training thread while another thread calls ``set``.
    """

    def __init__(
        self,
        schedule: Sequence[tuple[float, DeviceConditions]] | DeviceConditions,
        *,
        clock: Callable[[], float] = time.monotonic,
        period: float | None = None,
    ) -> None:
        if isinstance(schedule, DeviceConditions):
            schedule = [(0.0, schedule)]
        steps = sorted(((float(t), c) for t, c in schedule), key=lambda step: step[0])
        if not steps or steps[0][0] != 0.0:
            raise ValueError("a conditions schedule starts with a state at time 0")
        if period is not None and period <= steps[-1][0]:
            raise ValueError("the period must be longer than the last step's time")
        self._times = [t for t, _ in steps]
        self._states = [c for _, c in steps]
        self._clock = clock
        self._period = period
        self._start = clock()
        self._lock = threading.Lock()
        self.reads = 0

    @classmethod
    def from_json(cls, obj: Any, **kwargs: Any) -> ScriptedConditions:
        """From ``[{"at": 0, "conditions": {...}}, ...]`` (the fleet emulator's files)."""
        if not isinstance(obj, list):
            raise ValueError("a conditions script is a list of {'at', 'conditions'} objects")
        steps = []
        for item in obj:
            if not isinstance(item, dict) or set(item) != {"at", "conditions"}:
                raise ValueError(f"a script step has exactly 'at' and 'conditions': {item!r}")
            at = item["at"]
            if isinstance(at, bool) or not isinstance(at, int | float) or at < 0:
                raise ValueError(f"'at' must be a number of seconds >= 0, got {at!r}")
            steps.append((float(at), DeviceConditions.from_json(item["conditions"])))
        return cls(steps, **kwargs)

    def read(self) -> DeviceConditions:
        with self._lock:
            self.reads += 1
            elapsed = self._clock() - self._start
            if self._period is not None:
                elapsed %= self._period
            return self._states[max(0, bisect.bisect_right(self._times, elapsed) - 1)]

    def set(self, conditions: DeviceConditions) -> None:
        with self._lock:
            self._times, self._states, self._period = [0.0], [conditions], None
            self._start = self._clock()

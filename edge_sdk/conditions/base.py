"""What a device reports about itself, and the interface every conditions provider implements."""

from __future__ import annotations

import math
import shutil
import subprocess
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

__all__ = [
    "TEMPERATURE_RANGE_C",
    "WIRE_FIELDS",
    "CachedRunner",
    "CommandRunner",
    "ConditionsProvider",
    "DeviceConditions",
    "fraction",
    "plausible_temperature",
    "run_command",
]

# A command runner returns the command's stdout, or None if it is missing, fails or hangs.
# Providers take one so that tests feed them recorded outputs instead of running anything.
CommandRunner = Callable[[Sequence[str]], "str | None"]

# Readings outside this range are sensor errors, not temperatures; providers drop them.
TEMPERATURE_RANGE_C = (-100.0, 200.0)

# The keys of check-in "conditions" (docs/protocol.md); `throttled` stays on the device.
WIRE_FIELDS = ("charging", "battery", "idle", "unmetered", "free_memory_mb", "temperature_c")


def run_command(argv: Sequence[str], timeout: float = 5.0) -> str | None:
    """Run a command and return its stdout, or None if it is absent, fails or times out."""
    if shutil.which(argv[0]) is None:
        return None
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


class CachedRunner:
    """Remembers each command's output for ``ttl_s`` seconds.

    Clients re-read conditions every few training steps; ``nmcli`` or ``dumpsys`` take tens to
    hundreds of milliseconds, far longer than a step, and their answers change slowly.
    """

    def __init__(
        self,
        run: CommandRunner,
        ttl_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.run, self.ttl_s, self.clock = run, ttl_s, clock
        self._cache: dict[tuple[str, ...], tuple[float, str | None]] = {}
        self._lock = threading.Lock()

    def __call__(self, argv: Sequence[str]) -> str | None:
        key = tuple(argv)
        now = self.clock()
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None and now - hit[0] < self.ttl_s:
            return hit[1]
        out = self.run(argv)
        with self._lock:
            self._cache[key] = (now, out)
        return out


@dataclass(frozen=True)
class DeviceConditions:
    """A snapshot of the device's state. ``None`` means unknown on this device.

    ``charging`` means "on external power" (a device without a battery that is running is on
    mains). ``battery`` is the charge level in [0, 1]. ``idle`` means no user activity and low
    load. ``throttled`` (Raspberry Pi: under-voltage or thermal throttling right now) is used
    by the local policy only and is not sent to the coordinator.
    """

    charging: bool | None = None
    battery: float | None = None
    idle: bool | None = None
    unmetered: bool | None = None
    free_memory_mb: float | None = None
    temperature_c: float | None = None
    throttled: bool | None = None

    def __post_init__(self) -> None:
        for name in ("charging", "idle", "unmetered", "throttled"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"conditions: {name!r} must be true, false or null, got {value!r}")
        for name in ("battery", "free_memory_mb", "temperature_c"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"conditions: {name!r} must be a number or null, got {value!r}")
            try:
                finite = math.isfinite(value)
            except OverflowError:  # an integer too large for a float
                finite = False
            if not finite:
                raise ValueError(f"conditions: {name!r} must be finite, got {value!r}")
        if self.battery is not None and not 0.0 <= self.battery <= 1.0:
            raise ValueError(f"conditions: 'battery' must be in [0, 1], got {self.battery}")
        if self.free_memory_mb is not None and self.free_memory_mb < 0:
            raise ValueError(
                f"conditions: 'free_memory_mb' must be >= 0, got {self.free_memory_mb}"
            )
        low, high = TEMPERATURE_RANGE_C
        if self.temperature_c is not None and not low <= self.temperature_c <= high:
            raise ValueError(f"conditions: 'temperature_c' out of range: {self.temperature_c}")

    def to_json(self) -> dict[str, Any]:
        """The check-in ``conditions`` object: every wire key, ``null`` when unknown."""
        return {name: getattr(self, name) for name in WIRE_FIELDS}

    @classmethod
    def from_json(cls, obj: Any) -> DeviceConditions:
        """Parse a check-in ``conditions`` object; missing keys are unknown, others an error."""
        if not isinstance(obj, dict):
            raise ValueError(f"conditions must be an object, got {type(obj).__name__}")
        unknown = set(obj) - set(WIRE_FIELDS)
        if unknown:
            raise ValueError(f"conditions: unknown keys {', '.join(sorted(unknown))}")
        return cls(**{k: obj.get(k) for k in WIRE_FIELDS})

    def replace(self, **changes: Any) -> DeviceConditions:
        return replace(self, **changes)

    def or_else(self, other: DeviceConditions) -> DeviceConditions:
        """These conditions, with every unknown field taken from ``other``."""
        return replace(
            self,
            **{
                f.name: getattr(other, f.name)
                for f in fields(self)
                if getattr(self, f.name) is None
            },
        )


def fraction(value: float | None) -> float | None:
    """A level clamped to [0, 1]; None for a missing or non-finite reading."""
    if value is None or not math.isfinite(value):
        return None
    return min(max(value, 0.0), 1.0)


def plausible_temperature(celsius: float | None) -> float | None:
    """``celsius`` if a sensor could mean it, else None (unknown)."""
    low, high = TEMPERATURE_RANGE_C
    # NaN fails both comparisons, so it is dropped too.
    return celsius if celsius is not None and low <= celsius <= high else None


class ConditionsProvider(ABC):
    """Reads the device's current conditions. ``read`` never raises for a missing source: what
    it cannot find is ``None``."""

    @abstractmethod
    def read(self) -> DeviceConditions: ...

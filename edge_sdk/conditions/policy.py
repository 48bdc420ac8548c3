"""When a device may train: Google's rule (idle AND charging AND unmetered), configurable.

>>> ok, reasons = EligibilityPolicy(min_battery=0.5).check(conditions)   # doctest: +SKIP
>>> reasons
['not charging', 'battery 0.31 below 0.50']
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from edge_sdk.conditions.base import DeviceConditions

__all__ = ["EligibilityPolicy"]

_CHECKABLE = frozenset(
    {"charging", "battery", "idle", "unmetered", "free_memory_mb", "temperature_c", "throttled"}
)


@dataclass(frozen=True)
class EligibilityPolicy:
    """Requirements on :class:`DeviceConditions`; ``check`` says whether and why not.

    An unknown value (``None``) fails the requirement on it, unless its field is listed in
    ``unknown_ok`` (say ``{"unmetered"}`` on a board without NetworkManager).
    """

    require_idle: bool = True
    require_charging: bool = True
    require_unmetered: bool = True
    min_battery: float | None = None
    min_free_memory_mb: float | None = None
    max_temperature_c: float | None = None
    allow_throttled: bool = True
    unknown_ok: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        object.__setattr__(self, "unknown_ok", frozenset(self.unknown_ok))
        bad = self.unknown_ok - _CHECKABLE
        if bad:
            raise ValueError(f"unknown_ok names unknown fields: {', '.join(sorted(bad))}")
        if self.min_battery is not None and not 0.0 <= self.min_battery <= 1.0:
            raise ValueError(f"min_battery must be in [0, 1], got {self.min_battery}")

    @classmethod
    def permissive(cls) -> EligibilityPolicy:
        """Train whatever the conditions (development, benchmarks)."""
        return cls(require_idle=False, require_charging=False, require_unmetered=False)

    @classmethod
    def from_json(cls, obj: Any) -> EligibilityPolicy:
        if not isinstance(obj, dict):
            raise ValueError("an eligibility policy is an object")
        names = {f.name for f in fields(cls)}
        unknown = set(obj) - names
        if unknown:
            raise ValueError(f"eligibility policy: unknown keys {', '.join(sorted(unknown))}")
        values = dict(obj)
        if "unknown_ok" in values:
            values["unknown_ok"] = frozenset(values["unknown_ok"])
        return cls(**values)

    def check(self, c: DeviceConditions) -> tuple[bool, list[str]]:
        """``(eligible, reasons)``; ``reasons`` lists every requirement that fails."""
        reasons: list[str] = []

        def flag(name: str, value: bool | None, failing: str) -> None:
            if value is None:
                if name not in self.unknown_ok:
                    reasons.append(f"{name} unknown")
            elif not value:
                reasons.append(failing)

        def bound(name: str, value: float | None, limit: float, above: bool, text: str) -> None:
            if value is None:
                if name not in self.unknown_ok:
                    reasons.append(f"{name} unknown")
            elif (value < limit) if above else (value > limit):
                reasons.append(text.format(value=value, limit=limit))

        if self.require_idle:
            flag("idle", c.idle, "not idle")
        if self.require_charging:
            flag("charging", c.charging, "not charging")
        if self.require_unmetered:
            flag("unmetered", c.unmetered, "network metered")
        if self.min_battery is not None:
            bound(
                "battery",
                c.battery,
                self.min_battery,
                True,
                "battery {value:.2f} below {limit:.2f}",
            )
        if self.min_free_memory_mb is not None:
            bound(
                "free_memory_mb",
                c.free_memory_mb,
                self.min_free_memory_mb,
                True,
                "free memory {value:g} MB below {limit:g} MB",
            )
        if self.max_temperature_c is not None:
            bound(
                "temperature_c",
                c.temperature_c,
                self.max_temperature_c,
                False,
                "temperature {value:g} °C above {limit:g} °C",
            )
        if not self.allow_throttled:
            flag("throttled", None if c.throttled is None else not c.throttled, "throttled")
        return not reasons, reasons

"""Server-side eligibility: which checked-in devices may take part in a task.

A task's plan carries an :class:`EligibilityPolicy`; a device's check-in reports its
conditions, runtimes and codec capabilities. The device also runs its own checks (and aborts
when conditions lapse during training); this policy is what the coordinator enforces.
A condition the device did not report counts as not met.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from coordinator.validation import Fields

__all__ = ["Conditions", "EligibilityPolicy"]


@dataclass(frozen=True)
class Conditions:
    """What a device reported at check-in (already type-checked)."""

    charging: bool | None = None
    battery: float | None = None
    idle: bool | None = None
    unmetered: bool | None = None
    free_memory_mb: float | None = None
    temperature_c: float | None = None

    @classmethod
    def from_json(cls, obj: Any) -> Conditions:
        f = Fields(obj if obj is not None else {}, "conditions")
        out = cls(
            charging=f.bool("charging", None),
            battery=f.float("battery", None, minimum=0.0, maximum=1.0),
            idle=f.bool("idle", None),
            unmetered=f.bool("unmetered", None),
            free_memory_mb=f.float("free_memory_mb", None, minimum=0.0),
            temperature_c=f.float("temperature_c", None, minimum=-100.0, maximum=200.0),
        )
        # Devices may report more than we judge on; extra keys are ignored, not refused.
        return out


@dataclass(frozen=True)
class EligibilityPolicy:
    require_charging: bool = True
    require_idle: bool = True
    require_unmetered: bool = True
    min_battery: float = 0.0
    min_free_memory_mb: float = 0.0
    max_temperature_c: float | None = None
    # Runtimes a device may train with; None: any the bundle supports.
    runtimes: tuple[str, ...] | None = None

    @classmethod
    def from_json(cls, obj: Any) -> EligibilityPolicy:
        f = Fields(obj if obj is not None else {}, "plan.eligibility")
        runtimes = f.str_list("runtimes", None)
        out = cls(
            require_charging=f.bool("require_charging", True),
            require_idle=f.bool("require_idle", True),
            require_unmetered=f.bool("require_unmetered", True),
            min_battery=f.float("min_battery", 0.0, minimum=0.0, maximum=1.0),
            min_free_memory_mb=f.float("min_free_memory_mb", 0.0, minimum=0.0),
            max_temperature_c=f.float("max_temperature_c", None),
            runtimes=None if runtimes is None else tuple(runtimes),
        )
        f.done()
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "require_charging": self.require_charging,
            "require_idle": self.require_idle,
            "require_unmetered": self.require_unmetered,
            "min_battery": self.min_battery,
            "min_free_memory_mb": self.min_free_memory_mb,
            "max_temperature_c": self.max_temperature_c,
            "runtimes": None if self.runtimes is None else list(self.runtimes),
        }

    def usable_runtimes(self, bundle_backends: dict[str, Any]) -> set[str]:
        supported = {k for k, v in bundle_backends.items() if isinstance(v, dict) and v.get("supported")}
        return supported if self.runtimes is None else supported & set(self.runtimes)

    def check(
        self,
        cond: Conditions,
        device_runtimes: list[str],
        codecs: list[str] | None,
        bundle_backends: dict[str, Any],
        codec: str,
    ) -> str | None:
        """None if eligible, else a short reason (for logs and metrics, not the device)."""
        if self.require_charging and cond.charging is not True:
            return "not charging"
        if self.require_idle and cond.idle is not True:
            return "not idle"
        if self.require_unmetered and cond.unmetered is not True:
            return "metered network"
        if self.min_battery > 0 and (cond.battery is None or cond.battery < self.min_battery):
            return "battery low"
        if self.min_free_memory_mb > 0 and (
            cond.free_memory_mb is None or cond.free_memory_mb < self.min_free_memory_mb
        ):
            return "memory low"
        if self.max_temperature_c is not None and (
            cond.temperature_c is None or cond.temperature_c > self.max_temperature_c
        ):
            return "too hot"
        if not self.usable_runtimes(bundle_backends) & set(device_runtimes):
            return "no usable runtime"
        if codecs is not None and codec not in codecs:
            return f"codec {codec} unsupported"
        return None

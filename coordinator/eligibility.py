"""Server-side eligibility: which checked-in devices may take part in a task.

A task's plan carries ``eligibility``: the device-condition rules of
:class:`edge_sdk.conditions.EligibilityPolicy` (the very policy devices apply locally:
``require_idle``, ``require_charging``, ``require_unmetered``, ``min_battery``,
``min_free_memory_mb``, ``max_temperature_c``, ``unknown_ok``, ...) plus ``runtimes``, the
training runtimes the task accepts (default: every runtime the bundle supports). The
coordinator enforces it on the conditions, runtimes and codec capabilities a device reports at
check-in; the device's own check is a courtesy, this one is the rule.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from coordinator.errors import InvalidRequest
from coordinator.validation import Fields
from edge_sdk.conditions import DeviceConditions, EligibilityPolicy

__all__ = ["TaskEligibility", "parse_conditions"]


def parse_conditions(obj: Any) -> DeviceConditions:
    """A check-in's ``conditions`` (absent: all unknown); 400 for wrong keys or types."""
    try:
        return DeviceConditions.from_json({} if obj is None else obj)
    except (ValueError, TypeError, OverflowError) as e:  # Overflow: a 400-digit integer
        raise InvalidRequest(f"body.conditions: {e}") from e


@dataclass(frozen=True)
class TaskEligibility:
    conditions: EligibilityPolicy = field(default_factory=EligibilityPolicy)
    runtimes: tuple[str, ...] | None = None  # None: any the bundle supports

    @classmethod
    def from_json(cls, obj: Any) -> TaskEligibility:
        if obj is None:
            return cls()
        if not isinstance(obj, dict):
            raise InvalidRequest("plan.eligibility must be a JSON object")
        rules = dict(obj)
        runtimes = rules.pop("runtimes", None)
        if runtimes is not None and (
            not isinstance(runtimes, list) or not all(isinstance(r, str) for r in runtimes)
        ):
            raise InvalidRequest("plan.eligibility.runtimes must be a list of strings")
        # Thresholds are read as every other number of a plan: a finite number or null. NaN
        # compares false with every reading (a bound that refuses no device, silently), and
        # an infinity or a 400-digit integer is no threshold either.
        thresholds = Fields(rules, "plan.eligibility")
        for f in dataclasses.fields(EligibilityPolicy):
            if f.name.startswith(("min_", "max_")):
                thresholds.number(f.name, None)
        try:
            policy = EligibilityPolicy.from_json(rules)
        except (ValueError, TypeError) as e:
            raise InvalidRequest(f"plan.eligibility: {e}") from e
        for f in dataclasses.fields(policy):
            value = getattr(policy, f.name)
            if f.name.startswith(("require_", "allow_")) and not isinstance(value, bool):
                raise InvalidRequest(f"plan.eligibility.{f.name} must be true or false")
        return cls(policy, None if runtimes is None else tuple(runtimes))

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self.conditions)
        out["unknown_ok"] = sorted(self.conditions.unknown_ok)
        out["runtimes"] = None if self.runtimes is None else list(self.runtimes)
        return out

    def usable_runtimes(self, bundle_backends: dict[str, Any]) -> set[str]:
        supported = {
            k for k, v in bundle_backends.items() if isinstance(v, dict) and v.get("supported")
        }
        return supported if self.runtimes is None else supported & set(self.runtimes)

    def check(
        self,
        cond: DeviceConditions,
        device_runtimes: list[str],
        codecs: list[str] | None,
        bundle_backends: dict[str, Any],
        codec: str,
    ) -> str | None:
        """None if eligible, else the reasons (for logs and metrics, not the device)."""
        _, reasons = self.conditions.check(cond)
        if not self.usable_runtimes(bundle_backends) & set(device_runtimes):
            reasons.append("no usable runtime")
        if codecs is not None and codec not in codecs:
            reasons.append(f"codec {codec} unsupported")
        return "; ".join(reasons) if reasons else None

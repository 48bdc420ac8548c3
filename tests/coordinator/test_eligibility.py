"""Server-side eligibility: the device policy's rules plus runtimes and codec capabilities."""

from __future__ import annotations

import pytest

from coordinator.eligibility import TaskEligibility, parse_conditions
from coordinator.errors import InvalidRequest

BACKENDS = {"ort-step": {"supported": True}, "litert-step": {"supported": False, "reason": "x"}}
GOOD = {"charging": True, "idle": True, "unmetered": True, "battery": 0.5}


def check(policy: TaskEligibility, cond: dict, runtimes=("ort-step",), codecs=None) -> str | None:
    return policy.check(parse_conditions(cond), list(runtimes), codecs, BACKENDS, "int8")


def test_default_is_idle_charging_unmetered() -> None:
    p = TaskEligibility.from_json(None)
    assert check(p, GOOD) is None
    assert "not charging" in (check(p, {**GOOD, "charging": False}) or "")
    assert check(p, {**GOOD, "idle": None}) is not None  # unknown fails the requirement
    assert check(p, {k: v for k, v in GOOD.items() if k != "unmetered"}) is not None


def test_thresholds_runtimes_and_codecs() -> None:
    p = TaskEligibility.from_json({"min_battery": 0.6, "max_temperature_c": 40,
                                   "unknown_ok": ["temperature_c"]})  # fmt: skip
    assert check(p, GOOD) is not None  # battery 0.5 < 0.6
    assert check(p, {**GOOD, "battery": 0.7}) is None  # temperature unknown but allowed
    assert check(p, {**GOOD, "battery": 0.7, "temperature_c": 45.0}) is not None
    assert check(p, {**GOOD, "battery": 0.7}, runtimes=("litert-step",)) is not None
    assert check(p, {**GOOD, "battery": 0.7}, codecs=["fp32"]) is not None
    assert check(p, {**GOOD, "battery": 0.7}, codecs=["fp32", "int8"]) is None
    only_lite = TaskEligibility.from_json({"runtimes": ["litert-step"]})
    assert only_lite.usable_runtimes(BACKENDS) == set()
    assert TaskEligibility.from_json(p.to_json()) == p


@pytest.mark.parametrize("bound", ["min_free_memory_mb", "max_temperature_c"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 10**400, "40"])
def test_a_threshold_must_be_a_finite_number(bound: str, value: object) -> None:
    """As every other number of a plan (``Fields.number``). Before, NaN, an infinity and a
    400-digit integer were stored: NaN compares false with every reading, so a NaN bound
    refused no device, silently, and the task's JSON then held a bare ``NaN``."""
    with pytest.raises(InvalidRequest, match=f"plan.eligibility.{bound}"):
        TaskEligibility.from_json({bound: value})


@pytest.mark.parametrize(
    "bad", [{"battery": "full"}, {"charging": "yes"}, {"temperature_c": 1e6}, {"x": 1}, [1]]
)
def test_malformed_conditions(bad: object) -> None:
    with pytest.raises(InvalidRequest):
        parse_conditions(bad)


def test_ineligibility_is_counted_by_kind_not_by_the_values_devices_report() -> None:
    from coordinator.service import reason_kind

    kinds = {reason_kind(r) for r in ("battery 0.12 below 0.20", "battery 0.35 below 0.2",
                                      "battery 1e-05 below 0.20")}  # fmt: skip
    assert kinds == {"battery N below N"}
    assert reason_kind("not charging") == "not charging"
    assert reason_kind("free memory 300 MB below 512 MB") == "free memory N MB below N MB"

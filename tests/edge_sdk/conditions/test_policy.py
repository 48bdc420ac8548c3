"""EligibilityPolicy: Google's default, the configurable limits, unknown values."""

from __future__ import annotations

import itertools

import pytest

from edge_sdk.conditions import DeviceConditions, EligibilityPolicy

GOOD = DeviceConditions(
    charging=True, battery=0.8, idle=True, unmetered=True, free_memory_mb=900,
    temperature_c=35.0, throttled=False,
)  # fmt: skip


@pytest.mark.parametrize(
    ("idle", "charging", "unmetered"), list(itertools.product([True, False, None], repeat=3))
)
def test_default_is_idle_and_charging_and_unmetered(
    idle: bool | None, charging: bool | None, unmetered: bool | None
) -> None:
    c = GOOD.replace(idle=idle, charging=charging, unmetered=unmetered)
    ok, reasons = EligibilityPolicy().check(c)
    assert ok is (idle is True and charging is True and unmetered is True)
    expected = []
    for value, name, failing in (
        (idle, "idle", "not idle"),
        (charging, "charging", "not charging"),
        (unmetered, "unmetered", "network metered"),
    ):
        if value is None:
            expected.append(f"{name} unknown")
        elif value is False:
            expected.append(failing)
    assert reasons == expected


def test_default_ignores_battery_memory_and_temperature() -> None:
    c = GOOD.replace(battery=None, free_memory_mb=None, temperature_c=None, throttled=None)
    assert EligibilityPolicy().check(c) == (True, [])


def test_limits() -> None:
    policy = EligibilityPolicy(
        min_battery=0.5, min_free_memory_mb=1000, max_temperature_c=40, allow_throttled=False
    )
    ok, reasons = policy.check(GOOD.replace(battery=0.3, temperature_c=41.5, throttled=True))
    assert not ok
    assert reasons == [
        "battery 0.30 below 0.50",
        "free memory 900 MB below 1000 MB",
        "temperature 41.5 °C above 40 °C",
        "throttled",
    ]
    assert policy.check(GOOD.replace(free_memory_mb=1000, temperature_c=40.0)) == (True, [])


def test_unknown_fails_unless_allowed() -> None:
    board = GOOD.replace(unmetered=None, battery=None)
    policy = EligibilityPolicy(min_battery=0.2)
    assert policy.check(board) == (False, ["unmetered unknown", "battery unknown"])
    relaxed = EligibilityPolicy(min_battery=0.2, unknown_ok=frozenset({"unmetered", "battery"}))
    assert relaxed.check(board) == (True, [])


def test_permissive_and_from_json() -> None:
    assert EligibilityPolicy.permissive().check(DeviceConditions()) == (True, [])
    p = EligibilityPolicy.from_json({"require_idle": False, "unknown_ok": ["unmetered"]})
    assert p == EligibilityPolicy(require_idle=False, unknown_ok=frozenset({"unmetered"}))


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ({"require_wifi": True}, "unknown keys require_wifi"),
        ({"unknown_ok": ["wifi"]}, "unknown_ok names unknown fields: wifi"),
        ({"min_battery": 5}, "min_battery must be in"),
        ([], "is an object"),
    ],
)
def test_bad_policies(obj: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EligibilityPolicy.from_json(obj)

"""ScriptedConditions: schedules over an injected clock."""

from __future__ import annotations

import pytest

from edge_sdk.conditions import DeviceConditions, FakeClock, ScriptedConditions

GOOD = DeviceConditions(charging=True, battery=0.9, idle=True, unmetered=True)
UNPLUGGED = GOOD.replace(charging=False)


def test_schedule_follows_the_clock() -> None:
    clock = FakeClock(1000.0)
    p = ScriptedConditions([(30, UNPLUGGED), (0, GOOD), (60, GOOD)], clock=clock)
    seen = []
    for _ in range(8):
        seen.append(p.read().charging)
        clock.advance(10)
    assert seen == [True, True, True, False, False, False, True, True]
    assert p.reads == 8


def test_period_repeats_the_day() -> None:
    clock = FakeClock()
    p = ScriptedConditions([(0, GOOD), (8, UNPLUGGED)], clock=clock, period=24)
    clock.advance(24 * 3 + 9)
    assert p.read() == UNPLUGGED
    clock.advance(15)
    assert p.read() == GOOD


def test_set_flips_from_now_on() -> None:
    clock = FakeClock()
    p = ScriptedConditions(GOOD, clock=clock)
    p.set(UNPLUGGED)
    clock.advance(1e6)
    assert p.read() == UNPLUGGED


def test_from_json() -> None:
    script = [
        {"at": 0, "conditions": GOOD.to_json()},
        {"at": 5.5, "conditions": {"charging": False}},
    ]
    clock = FakeClock()
    p = ScriptedConditions.from_json(script, clock=clock)
    clock.advance(6)
    assert p.read() == DeviceConditions(charging=False)


@pytest.mark.parametrize(
    ("schedule", "kwargs", "message"),
    [
        ([], {}, "starts with a state at time 0"),
        ([(5, GOOD)], {}, "starts with a state at time 0"),
        ([(0, GOOD), (10, GOOD)], {"period": 10}, "period must be longer"),
    ],
)
def test_bad_schedules(schedule: list, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ScriptedConditions(schedule, **kwargs)


@pytest.mark.parametrize(
    "script",
    [
        {"at": 0},
        [{"at": -1, "conditions": {}}],
        [{"at": "0", "conditions": {}}],
        [{"at": 0, "conditions": {}, "extra": 1}],
        [{"at": 0, "conditions": {"charging": "no"}}],
    ],
)
def test_bad_scripts(script: object) -> None:
    with pytest.raises(ValueError):
        ScriptedConditions.from_json(script)

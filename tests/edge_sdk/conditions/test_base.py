"""DeviceConditions: the wire form, validation, merging."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pytest

from edge_sdk.conditions import CachedRunner, DeviceConditions, FakeClock, run_command

FULL = DeviceConditions(
    charging=True, battery=0.83, idle=True, unmetered=True, free_memory_mb=1800,
    temperature_c=31.5, throttled=False,
)  # fmt: skip


def test_to_json_is_the_documented_checkin_object() -> None:
    # docs/protocol.md, "Check in": exactly these keys; throttled stays on the device
    assert FULL.to_json() == {
        "charging": True, "battery": 0.83, "idle": True, "unmetered": True,
        "free_memory_mb": 1800, "temperature_c": 31.5,
    }  # fmt: skip
    assert DeviceConditions().to_json() == dict.fromkeys(FULL.to_json())


def test_from_json_round_trip_and_missing_keys_are_unknown() -> None:
    assert DeviceConditions.from_json(FULL.to_json()) == FULL.replace(throttled=None)
    assert DeviceConditions.from_json({"charging": False}) == DeviceConditions(charging=False)


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ([], "must be an object"),
        ({"charging": "yes"}, "'charging' must be true, false or null"),
        ({"idle": 1}, "'idle' must be true, false or null"),
        ({"battery": 1.5}, "'battery' must be in \\[0, 1\\]"),
        ({"battery": True}, "'battery' must be a number"),
        ({"battery": math.nan}, "must be finite"),
        ({"battery": 10**400}, "must be finite"),
        ({"temperature_c": -(10**400)}, "must be finite"),
        ({"free_memory_mb": -1}, ">= 0"),
        ({"temperature_c": 1e6}, "out of range"),
        ({"wifi": True}, "unknown keys wifi"),
    ],
)
def test_invalid_conditions_say_why(obj: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DeviceConditions.from_json(obj)


def test_or_else_fills_only_unknowns() -> None:
    partial = DeviceConditions(charging=False, battery=None)
    merged = partial.or_else(FULL)
    assert merged.charging is False and merged.battery == 0.83 and merged.idle is True


def test_run_command_reports_absence_and_failure_as_none() -> None:
    assert run_command(["definitely-not-a-command-fedge"]) is None
    assert run_command(["false"]) is None
    assert run_command(["echo", "hi"]) == "hi\n"
    assert run_command(["sleep", "5"], timeout=0.1) is None


def test_public_api_is_what_it_claims() -> None:
    import edge_sdk.conditions as conditions

    public = {
        name
        for name, value in vars(conditions).items()
        if not name.startswith("_") and name not in {"annotations", "os", "Path"}
        and not isinstance(value, type(conditions))
    }  # fmt: skip
    assert sorted(conditions.__all__) == sorted(public)


def test_cached_runner_reuses_outputs_within_the_ttl() -> None:
    calls: list[tuple[str, ...]] = []

    def run(argv: Sequence[str]) -> str | None:
        calls.append(tuple(argv))
        return f"out {len(calls)}"

    clock = FakeClock()
    cached = CachedRunner(run, ttl_s=10, clock=clock)
    assert cached(["nmcli"]) == cached(["nmcli"]) == "out 1"
    assert cached(["dumpsys", "battery"]) == "out 2"  # per command
    clock.advance(10)
    assert cached(["nmcli"]) == "out 3"
    assert len(calls) == 3

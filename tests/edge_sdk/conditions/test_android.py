"""AndroidConditions on recorded dumpsys and Termux:API outputs."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from edge_sdk.conditions import AndroidConditions, DeviceConditions, default_provider
from edge_sdk.conditions.android import (
    parse_dumpsys_battery,
    parse_dumpsys_connectivity,
    parse_dumpsys_power,
    parse_termux_battery,
    parse_termux_wifi,
)
from tests.edge_sdk.conditions.recorded import DATA, Recorded

ROOT = DATA / "android"


def text(name: str) -> str:
    return (DATA / "commands" / name).read_text()


def test_adb_shell_phone_charging_on_wifi_screen_off() -> None:
    run = Recorded(
        {
            ("dumpsys", "battery"): "dumpsys-battery-usb.txt",
            ("dumpsys", "connectivity"): "dumpsys-connectivity-wifi.txt",
            ("dumpsys", "power"): "dumpsys-power-asleep.txt",
        }
    )
    assert AndroidConditions(ROOT, run=run).read() == DeviceConditions(
        charging=True,
        battery=0.78,
        idle=True,
        unmetered=True,
        free_memory_mb=round(2871256 / 1024, 1),
        temperature_c=30.1,
    )


def test_termux_phone_unplugged_on_wifi() -> None:
    run = Recorded(
        {
            ("termux-battery-status",): "termux-battery-status-unplugged.json",
            ("termux-wifi-connectioninfo",): "termux-wifi-connectioninfo.json",
        }
    )
    c = AndroidConditions(ROOT, run=run).read()
    assert (c.charging, c.battery, c.temperature_c, c.unmetered) == (False, 0.19, 35.3, True)
    # no dumpsys power: the load average decides (11.9 over 8 cores: busy)
    assert c.idle is False
    assert ("dumpsys", "battery") not in run.calls  # Termux answered everything about power


def test_termux_first_dumpsys_fills_the_gaps() -> None:
    run = Recorded(
        {
            ("termux-battery-status",): "termux-battery-status-ac.json",
            ("dumpsys", "connectivity"): "dumpsys-connectivity-cellular.txt",
            ("dumpsys", "power"): "dumpsys-power-awake.txt",
        }
    )
    c = AndroidConditions(ROOT, run=run).read()
    assert (c.charging, c.battery, c.unmetered, c.idle) == (True, 0.64, False, False)
    assert c.temperature_c == 31.7


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("dumpsys-connectivity-wifi.txt", True),
        ("dumpsys-connectivity-cellular.txt", False),  # capabilities on a wrapped line
        ("dumpsys-connectivity-none.txt", False),
    ],
)
def test_connectivity(name: str, expected: bool) -> None:
    assert parse_dumpsys_connectivity(text(name)) is expected


def test_connectivity_picks_the_default_network_not_the_first() -> None:
    # network 111 (cellular) is listed second in the Wi-Fi dump; make it the default
    dump = text("dumpsys-connectivity-wifi.txt").replace(
        "Active default network: 112", "Active default network: 111"
    )
    assert parse_dumpsys_connectivity(dump) is False
    assert parse_dumpsys_connectivity("no such line") is None


def test_battery_parsers() -> None:
    unplugged = parse_dumpsys_battery(text("dumpsys-battery-unplugged.txt"))
    assert (unplugged.charging, unplugged.battery, unplugged.temperature_c) == (False, 0.36, 34.2)
    assert parse_dumpsys_battery("") == DeviceConditions()
    ac = parse_termux_battery(text("termux-battery-status-ac.json"))
    assert (ac.charging, ac.battery) == (True, 0.64)
    assert parse_termux_battery("not json") == DeviceConditions()
    assert parse_termux_battery("[1, 2]") == DeviceConditions()


def test_power_and_wifi_parsers() -> None:
    assert parse_dumpsys_power(text("dumpsys-power-asleep.txt")) is True
    assert parse_dumpsys_power(text("dumpsys-power-awake.txt")) is False
    assert parse_dumpsys_power("") is None
    assert parse_termux_wifi(text("termux-wifi-connectioninfo.json")) is True
    assert parse_termux_wifi(text("termux-wifi-disconnected.json")) is None
    assert parse_termux_wifi("{}") is None


def garbled(original: str) -> list[str]:
    """Truncations and numbers replaced by values a broken device might print."""
    out = [original[:cut] for cut in range(0, len(original), max(1, len(original) // 40))]
    # "9" * 400: an integer JSON and int() accept but no float holds.
    for junk in ("nan", "-1", "1e999", "NaN", "true", "", "9" * 400):
        out.append(re.sub(r"\d+(\.\d+)?", junk, original))
    return out


@pytest.mark.parametrize(
    ("parser", "name"),
    [
        (parse_dumpsys_battery, "dumpsys-battery-usb.txt"),
        (parse_termux_battery, "termux-battery-status-ac.json"),
        (parse_dumpsys_connectivity, "dumpsys-connectivity-wifi.txt"),
        (parse_dumpsys_power, "dumpsys-power-asleep.txt"),
        (parse_termux_wifi, "termux-wifi-connectioninfo.json"),
    ],
)
def test_garbled_outputs_never_raise(parser: Callable[[str], object], name: str) -> None:
    for variant in garbled(text(name)):
        result = parser(variant)
        assert result is None or isinstance(result, bool | DeviceConditions)


def test_default_provider_recognises_android(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ANDROID_ROOT", raising=False)
    (tmp_path / "system").mkdir()
    (tmp_path / "system/build.prop").write_text("ro.build.version.sdk=34\n")
    assert isinstance(default_provider(tmp_path), AndroidConditions)
    monkeypatch.setenv("ANDROID_ROOT", "/system")  # what Termux sees
    assert isinstance(default_provider(tmp_path / "elsewhere"), AndroidConditions)

"""RaspberryPiConditions on a recorded Pi 4 tree and vcgencmd outputs."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_sdk.conditions import RaspberryPiConditions, default_provider
from edge_sdk.conditions.linux import NMCLI_METERED
from edge_sdk.conditions.raspberry_pi import parse_get_throttled, parse_measure_temp
from tests.edge_sdk.conditions.recorded import DATA, Recorded

PI = DATA / "raspberry-pi-4"


def pi(
    throttled: str = "vcgencmd-get_throttled-ok.txt", nmcli: bool = True
) -> RaspberryPiConditions:
    outputs = {
        ("vcgencmd", "measure_temp"): "vcgencmd-measure_temp.txt",
        ("vcgencmd", "get_throttled"): throttled,
    }
    if nmcli:
        outputs[NMCLI_METERED] = "nmcli-wifi-unmetered.txt"
    return RaspberryPiConditions(PI, run=Recorded(outputs), clock=lambda: 0.0)


def test_headless_pi_on_its_supply() -> None:
    c = pi().read()
    assert c.charging is True and c.battery is None  # no power-supply class on a Pi
    assert c.idle is True  # load 0.08 over 4 cores, no terminals
    assert c.temperature_c == 48.7  # the firmware's reading wins over the thermal zone's 48.686
    assert c.throttled is False
    assert c.free_memory_mb == round(3360524 / 1024, 1)
    assert c.unmetered is True


def test_under_voltage_now_is_throttled() -> None:
    assert pi("vcgencmd-get_throttled-undervoltage.txt").read().throttled is True
    # bits 16-19 only record that it happened since boot
    assert pi("vcgencmd-get_throttled-past-only.txt").read().throttled is False


def test_without_vcgencmd_falls_back_to_sysfs() -> None:
    c = RaspberryPiConditions(PI, run=Recorded({})).read()
    assert c.temperature_c == pytest.approx(48.686) and c.throttled is None
    assert c.unmetered is None  # Raspberry Pi OS before Bookworm has no NetworkManager


def test_parsers() -> None:
    assert parse_measure_temp("temp=-3.5'C") == -3.5
    assert parse_measure_temp("error") is None
    assert parse_get_throttled("throttled=0x4") is True
    assert parse_get_throttled("") is None


def test_default_provider_recognises_the_board(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ANDROID_ROOT", raising=False)
    assert isinstance(default_provider(PI), RaspberryPiConditions)
    assert type(default_provider(tmp_path)).__name__ == "LinuxConditions"

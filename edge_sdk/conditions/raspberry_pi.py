"""Raspberry Pi: everything :class:`LinuxConditions` reads, plus the firmware's view.

``vcgencmd measure_temp`` (``temp=48.7'C``) gives the SoC temperature, and
``vcgencmd get_throttled`` (``throttled=0x50005``) whether the board is under-voltage,
frequency-capped, throttled or at the soft temperature limit right now (bits 0-3; bits 16-19
say the same happened since boot, which does not matter for training now).
"""

from __future__ import annotations

import re

from edge_sdk.conditions.base import DeviceConditions, plausible_temperature
from edge_sdk.conditions.linux import LinuxConditions

__all__ = ["RaspberryPiConditions", "parse_get_throttled", "parse_measure_temp"]

_NOW_BITS = 0xF


def parse_measure_temp(text: str) -> float | None:
    match = re.search(r"temp=(-?\d+(?:\.\d+)?)'C", text)
    return plausible_temperature(float(match.group(1))) if match else None


def parse_get_throttled(text: str) -> bool | None:
    """True if under-voltage or throttling is active now."""
    match = re.search(r"throttled=(0x[0-9a-fA-F]+)", text)
    return bool(int(match.group(1), 16) & _NOW_BITS) if match else None


class RaspberryPiConditions(LinuxConditions):
    """Conditions of a Raspberry Pi (same parameters as :class:`LinuxConditions`)."""

    def read(self) -> DeviceConditions:
        base = super().read()
        temp = self.run(["vcgencmd", "measure_temp"])
        throttled = self.run(["vcgencmd", "get_throttled"])
        firmware = DeviceConditions(
            temperature_c=None if temp is None else parse_measure_temp(temp),
            throttled=None if throttled is None else parse_get_throttled(throttled),
        )
        merged = firmware.or_else(base)
        if merged.charging is None and merged.battery is None:
            # No battery monitor (no power-supply class at all on most boards): a running Pi
            # is on its supply. UPS HATs that register a battery are read by LinuxConditions.
            merged = merged.replace(charging=True)
        return merged

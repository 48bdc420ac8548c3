"""Android phones, from a shell on the device (Termux, or ``adb shell``).

Sources, in order (a later one fills only what the earlier ones left unknown):

- power and battery temperature: ``termux-battery-status`` (Termux:API, JSON), else
  ``dumpsys battery``;
- metered: ``dumpsys connectivity`` (the active default network's ``NOT_METERED``
  capability), else ``termux-wifi-connectioninfo`` (Wi-Fi connected counts as unmetered,
  Android's own default for Wi-Fi; Termux cannot see the user's metered override);
- idle: ``dumpsys power`` (``mWakefulness`` is not ``Awake``: the screen is off), else the
  load average as on Linux;
- memory: ``/proc/meminfo``.

``dumpsys`` needs the DUMP permission (``adb shell`` has it, apps do not); Termux:API needs
its companion app. Whatever is missing is unknown.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from edge_sdk.conditions.base import (
    CachedRunner,
    CommandRunner,
    ConditionsProvider,
    DeviceConditions,
    fraction,
    plausible_temperature,
    run_command,
)
from edge_sdk.conditions.linux import LinuxConditions

__all__ = [
    "AndroidConditions",
    "parse_dumpsys_battery",
    "parse_dumpsys_connectivity",
    "parse_dumpsys_power",
    "parse_termux_battery",
    "parse_termux_wifi",
]

_BATTERY_CHARGING, _BATTERY_FULL = 2, 5  # BatteryManager.BATTERY_STATUS_*
_MAX_READING = 1 << 53  # every dumpsys integer fits an int64; this one also a float exactly


def parse_dumpsys_battery(text: str) -> DeviceConditions:
    """``dumpsys battery``: plugged-in sources, level/scale, temperature in tenths of °C."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    if not fields:
        return DeviceConditions()
    powered = [
        fields[k] == "true"
        for k in ("AC powered", "USB powered", "Wireless powered", "Dock powered")
        if k in fields
    ]
    status = _int(fields.get("status"))
    charging: bool | None = None
    if powered:
        charging = any(powered) or status in (_BATTERY_CHARGING, _BATTERY_FULL)
    level, scale = _int(fields.get("level")), _int(fields.get("scale")) or 100
    temp = _int(fields.get("temperature"))
    return DeviceConditions(
        charging=charging,
        battery=None if level is None else fraction(level / scale),
        temperature_c=None if temp is None else plausible_temperature(temp / 10.0),
    )


def parse_termux_battery(text: str) -> DeviceConditions:
    """``termux-battery-status`` JSON: ``plugged``, ``percentage``, ``temperature`` (°C)."""
    try:
        obj = json.loads(text)
    except ValueError:
        return DeviceConditions()
    if not isinstance(obj, dict):
        return DeviceConditions()
    plugged = obj.get("plugged")
    percentage = _json_number(obj.get("percentage"))
    temp = _json_number(obj.get("temperature"))
    return DeviceConditions(
        charging=None if not isinstance(plugged, str) else plugged != "UNPLUGGED",
        battery=None if percentage is None else fraction(percentage / 100.0),
        temperature_c=None if temp is None else plausible_temperature(round(temp, 1)),
    )


def _json_number(value: object) -> float | None:
    """A JSON number as a float; None for anything else, including an integer too long for a
    float (JSON allows any number of digits)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        return float(value)
    except OverflowError:
        return None


def parse_dumpsys_connectivity(text: str) -> bool | None:
    """Is the active default network unmetered? ``False`` when there is none."""
    match = re.search(r"Active default network:\s*(\S+)", text)
    if match is None:
        return None
    if match.group(1) == "none":
        return False
    # NetworkAgentInfo{network{100} ... nc{[ Transports: WIFI Capabilities: NOT_METERED&... ]}
    # may wrap over several lines; take the text up to the next agent.
    agents = re.split(r"(?=NetworkAgentInfo\s*\{)", text)
    for agent in agents:
        if re.search(r"network\{" + re.escape(match.group(1)) + r"\}", agent):
            caps = re.search(r"Capabilities:\s*([A-Z_&]+)", agent)
            if caps is None:
                return None
            return "NOT_METERED" in caps.group(1).split("&")
    return None


def parse_dumpsys_power(text: str) -> bool | None:
    """Idle (screen off: ``mWakefulness`` Asleep or Dozing) from ``dumpsys power``."""
    match = re.search(r"mWakefulness=(\w+)", text)
    return None if match is None else match.group(1) != "Awake"


def parse_termux_wifi(text: str) -> bool | None:
    """``termux-wifi-connectioninfo`` JSON: connected Wi-Fi counts as unmetered."""
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if not isinstance(obj, dict) or "supplicant_state" not in obj:
        return None
    return True if obj["supplicant_state"] == "COMPLETED" else None


def _int(value: str | None) -> int | None:
    try:
        number = int(value) if value is not None else None
    except ValueError:
        return None
    # Beyond float range it is garbage, and dividing it (level / scale) would raise.
    return None if number is None or abs(number) > _MAX_READING else number


class AndroidConditions(ConditionsProvider):
    """Conditions of an Android phone; command outputs are reused for ``command_ttl_s``."""

    def __init__(
        self,
        root: str | os.PathLike[str] = "/",
        *,
        run: CommandRunner = run_command,
        max_load_per_cpu: float = 0.5,
        command_ttl_s: float = 10.0,
    ) -> None:
        self.run = CachedRunner(run, command_ttl_s) if command_ttl_s > 0 else run
        # Load and memory are plain Linux; terminals and nmcli do not exist here.
        self._linux = LinuxConditions(
            Path(root), run=lambda argv: None, max_load_per_cpu=max_load_per_cpu
        )

    def read(self) -> DeviceConditions:
        battery = DeviceConditions()
        out = self.run(["termux-battery-status"])
        if out is not None:
            battery = parse_termux_battery(out)
        if None in (battery.charging, battery.battery, battery.temperature_c):
            out = self.run(["dumpsys", "battery"])
            if out is not None:
                battery = battery.or_else(parse_dumpsys_battery(out))
        unmetered = None
        out = self.run(["dumpsys", "connectivity"])
        if out is not None:
            unmetered = parse_dumpsys_connectivity(out)
        if unmetered is None:
            out = self.run(["termux-wifi-connectioninfo"])
            unmetered = None if out is None else parse_termux_wifi(out)
        out = self.run(["dumpsys", "power"])
        idle = None if out is None else parse_dumpsys_power(out)
        if idle is None:
            load = self._linux.load_per_cpu()
            idle = None if load is None else load <= self._linux.max_load_per_cpu
        return battery.replace(
            idle=idle, unmetered=unmetered, free_memory_mb=self._linux.free_memory_mb()
        )

"""Linux devices (laptops, gateways, boards): sysfs, procfs and NetworkManager.

Sources, all relative to a root directory so that tests can point it at recorded trees:

- power: ``/sys/class/power_supply/*/{type,online,status,capacity,scope}``;
- idle: ``/proc/loadavg`` over the online CPUs (``/sys/devices/system/cpu/online``) less the
  SDK's own share (its process's and children's CPU time from ``/proc/self/stat``), and user
  activity from terminal access times (``/dev/pts/*``, ``/dev/tty[0-9]*``, what ``w`` shows)
  and ``xprintidle`` where a desktop session has it;
- memory: ``MemAvailable`` in ``/proc/meminfo``;
- temperature: the hottest ``/sys/class/thermal/thermal_zone*/temp``;
- metered: ``nmcli -t -f GENERAL.DEVICE,GENERAL.STATE,GENERAL.METERED dev show``.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

from edge_sdk.conditions.base import (
    CachedRunner,
    CommandRunner,
    ConditionsProvider,
    DeviceConditions,
    fraction,
    run_command,
)

__all__ = [
    "NMCLI_METERED",
    "LinuxConditions",
    "parse_cpu_list",
    "parse_loadavg",
    "parse_meminfo_available_mb",
    "parse_nmcli_metered",
    "parse_self_cpu_s",
]

# The kernel's load average is a 1-minute exponential average of runnable tasks.
_LOAD_WINDOW_S = 60.0

NMCLI_METERED = ("nmcli", "-t", "-f", "GENERAL.DEVICE,GENERAL.STATE,GENERAL.METERED", "dev", "show")
_EXTERNAL_POWER = {"Mains", "USB", "Wireless", "USB_C", "USB_PD", "USB_DCP", "USB_CDP", "USB_ACA"}


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _number(text: str | None) -> float | None:
    try:
        value = float(text) if text is not None else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def parse_loadavg(text: str) -> float | None:
    """The 1-minute load average from ``/proc/loadavg``."""
    try:
        load = float(text.split()[0])
    except (IndexError, ValueError):
        return None
    return load if math.isfinite(load) and load >= 0 else None


def parse_cpu_list(text: str) -> int | None:
    """How many CPUs a list like ``0-3,6`` names."""
    count = 0
    try:
        for part in text.strip().split(","):
            lo, _, hi = part.partition("-")
            span = int(hi or lo) - int(lo) + 1
            if span < 1:
                return None  # "3-0": not a list the kernel writes
            count += span
    except ValueError:
        return None
    return count or None


def parse_self_cpu_s(text: str, ticks_per_s: float) -> float | None:
    """CPU seconds a process and its waited-for children used, from ``/proc/<pid>/stat``
    (utime, stime, cutime, cstime: fields 14-17, counted after the parenthesised name, which
    may itself hold spaces and parentheses)."""
    _, sep, rest = text.rpartition(")")
    fields = rest.split()
    if not sep or len(fields) < 15:
        return None
    try:
        ticks = sum(int(f) for f in fields[11:15])
    except ValueError:
        return None
    return ticks / ticks_per_s if ticks >= 0 else None


def parse_meminfo_available_mb(text: str) -> float | None:
    """Available memory in MiB: ``MemAvailable``, or free + buffers + page cache on old kernels."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts:
            with contextlib.suppress(ValueError):
                kb = float(parts[0])
                if math.isfinite(kb) and kb >= 0:
                    values[key.strip()] = kb
    if "MemAvailable" in values:
        return round(values["MemAvailable"] / 1024, 1)
    if "MemFree" in values:
        kb = values["MemFree"] + values.get("Buffers", 0) + values.get("Cached", 0)
        return round(kb / 1024, 1)
    return None


def parse_nmcli_metered(text: str) -> bool | None:
    """Is the network unmetered? From terse ``nmcli ... dev show`` output.

    Looks at connected devices (state 100) other than loopback; if the output has no state
    lines (``-f GENERAL.METERED`` alone), at every device. Any metered one (``yes``, also
    guessed: a phone hotspot) makes it metered; otherwise any ``no`` makes it unmetered;
    only ``unknown`` is unknown.
    """
    verdicts = []
    for block in text.strip().split("\n\n"):
        fields = {}
        for line in block.splitlines():
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
        if fields.get("GENERAL.DEVICE") == "lo":
            continue
        state = fields.get("GENERAL.STATE")
        if state is not None and not state.startswith("100"):
            continue
        metered = fields.get("GENERAL.METERED", "unknown").split(" ")[0]
        if metered in ("yes", "no"):
            verdicts.append(metered == "no")
    if not verdicts:
        return None
    return all(verdicts)


class LinuxConditions(ConditionsProvider):
    """Conditions of a Linux machine.

    ``idle`` is true when the 1-minute load per online CPU is at most ``max_load_per_cpu`` and
    no terminal or desktop input happened in the last ``min_user_idle_s`` seconds. Command
    outputs are reused for ``command_ttl_s`` seconds (files are read every time).

    The load leaves out the SDK's own work: between two reads the process's CPU time grows by
    what its training used, and an exponential average of that rate over the kernel's own
    1-minute window is subtracted from the load average. Otherwise a long round on a small
    board (one or two cores) would push the load past the bound by itself and abort.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] = "/",
        *,
        run: CommandRunner = run_command,
        clock: Callable[[], float] = time.time,
        max_load_per_cpu: float = 0.5,
        min_user_idle_s: float = 300.0,
        command_ttl_s: float = 10.0,
    ) -> None:
        self.root = Path(root)
        self.run = CachedRunner(run, command_ttl_s) if command_ttl_s > 0 else run
        self.clock = clock
        self.max_load_per_cpu = max_load_per_cpu
        self.min_user_idle_s = min_user_idle_s
        self._ticks_per_s = float(os.sysconf("SC_CLK_TCK")) if hasattr(os, "sysconf") else 100.0
        self._own_load = 0.0  # this process's CPUs in use, averaged like the load average
        self._own_sample: tuple[float, float] | None = None  # (clock, CPU seconds)

    def read(self) -> DeviceConditions:
        charging, battery = self.power()
        return DeviceConditions(
            charging=charging,
            battery=battery,
            idle=self.idle(),
            unmetered=self.unmetered(),
            free_memory_mb=self.free_memory_mb(),
            temperature_c=self.temperature_c(),
        )

    def power(self) -> tuple[bool | None, float | None]:
        """``(on external power, battery level)`` from the power-supply class."""
        base = self.root / "sys/class/power_supply"
        if not base.is_dir():
            return None, None
        external: list[bool] = []
        levels: list[float] = []
        statuses: list[str] = []
        for supply in sorted(p for p in base.iterdir() if p.is_dir()):
            kind = _read(supply / "type")
            if kind == "Battery":
                # Peripheral batteries (a wireless mouse) say scope=Device: not ours.
                if _read(supply / "scope") == "Device":
                    continue
                level = self._battery_level(supply)
                if level is not None:
                    levels.append(level)
                statuses.append(_read(supply / "status") or "Unknown")
            elif kind in _EXTERNAL_POWER:
                online = _read(supply / "online")
                if online in ("0", "1"):
                    external.append(online == "1")
        if not statuses:
            return True, None  # no system battery: a running machine is on external power
        battery = round(sum(levels) / len(levels), 4) if levels else None
        if any(external) or any(s in ("Charging", "Full") for s in statuses):
            return True, battery
        if "Discharging" in statuses or external:  # or every adapter says offline
            return False, battery
        return None, battery  # "Not charging"/"Unknown" and no adapter to ask

    @staticmethod
    def _battery_level(supply: Path) -> float | None:
        capacity = _number(_read(supply / "capacity"))
        if capacity is not None:
            return fraction(capacity / 100.0)
        for now, full in (("energy_now", "energy_full"), ("charge_now", "charge_full")):
            a, b = _number(_read(supply / now)), _number(_read(supply / full))
            if a is not None and b is not None and b > 0:
                return fraction(a / b)
        return None

    def load_per_cpu(self) -> float | None:
        """The 1-minute load per online CPU that is not this process's own."""
        load = parse_loadavg(_read(self.root / "proc/loadavg") or "")
        if load is None:
            return None
        cpus = parse_cpu_list(_read(self.root / "sys/devices/system/cpu/online") or "")
        return max(0.0, load - self.own_load()) / (cpus or os.cpu_count() or 1)

    def _own_cpu_s(self) -> float | None:
        text = _read(self.root / "proc/self/stat")
        if text is not None:
            return parse_self_cpu_s(text, self._ticks_per_s)
        if str(self.root) == "/":  # no procfs (a container without it): the process's own view
            t = os.times()
            return t.user + t.system + t.children_user + t.children_system
        return None

    def own_load(self) -> float:
        """This process's share of the load average: CPU seconds used per second since the
        last read, folded into an exponential average with the kernel's 1-minute window."""
        cpu = self._own_cpu_s()
        now = self.clock()
        if cpu is None:
            return 0.0
        if self._own_sample is not None:
            then, cpu_then = self._own_sample
            dt = now - then
            if dt > 0 and cpu >= cpu_then:
                decay = math.exp(-dt / _LOAD_WINDOW_S)
                self._own_load = self._own_load * decay + (cpu - cpu_then) / dt * (1 - decay)
        self._own_sample = (now, cpu)
        return self._own_load

    def user_idle_s(self) -> float | None:
        """Seconds since the last terminal or desktop input; None if nothing tells."""
        candidates: list[float] = []
        dev = self.root / "dev"
        terminals = [*dev.glob("pts/[0-9]*"), *dev.glob("tty[0-9]*")]
        atimes = []
        for tty in terminals:
            try:
                atimes.append(tty.stat().st_atime)
            except OSError:
                continue
        if atimes:
            candidates.append(max(0.0, self.clock() - max(atimes)))
        out = self.run(["xprintidle"])
        if out is not None:
            idle_ms = _number(out)
            if idle_ms is not None and idle_ms >= 0:
                candidates.append(idle_ms / 1000.0)
        return min(candidates) if candidates else None

    def idle(self) -> bool | None:
        load = self.load_per_cpu()
        if load is None:
            return None
        if load > self.max_load_per_cpu:
            return False
        user = self.user_idle_s()
        # No terminal and no desktop session (a headless board): load alone decides.
        return user is None or user >= self.min_user_idle_s

    def unmetered(self) -> bool | None:
        out = self.run(list(NMCLI_METERED))
        return None if out is None else parse_nmcli_metered(out)

    def free_memory_mb(self) -> float | None:
        return parse_meminfo_available_mb(_read(self.root / "proc/meminfo") or "")

    def temperature_c(self) -> float | None:
        temps = []
        for zone in (self.root / "sys/class/thermal").glob("thermal_zone*"):
            raw = _read(zone / "temp")
            try:
                celsius = int(raw or "") / 1000.0
            except (ValueError, OverflowError):  # OverflowError: more digits than a float holds
                continue
            # Some zones report 0 or sentinel values when a sensor is off.
            if -40.0 < celsius < 150.0 and celsius != 0.0:
                temps.append(celsius)
        return max(temps) if temps else None

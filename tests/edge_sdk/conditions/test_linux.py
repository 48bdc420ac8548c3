"""LinuxConditions on recorded sysfs/procfs trees and nmcli outputs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edge_sdk.conditions import DeviceConditions, LinuxConditions
from edge_sdk.conditions.linux import (
    NMCLI_METERED,
    parse_cpu_list,
    parse_loadavg,
    parse_meminfo_available_mb,
    parse_nmcli_metered,
)
from tests.edge_sdk.conditions.recorded import DATA, Recorded, tree

NOW = 1_800_000_000.0


def provider(root: Path, nmcli: str | None = "nmcli-wifi-unmetered.txt", **kw) -> LinuxConditions:
    outputs = {NMCLI_METERED: nmcli} if nmcli else {}
    return LinuxConditions(root, run=Recorded(outputs), clock=lambda: NOW, **kw)


def test_laptop_on_ac_at_night(tmp_path: Path) -> None:
    root = tree("linux-laptop-ac", tmp_path)
    assert provider(root).read() == DeviceConditions(
        charging=True,
        battery=0.67,  # BAT0 only: the mouse battery (scope=Device) at 5 % is not the machine's
        idle=True,  # load 0.42 over 8 CPUs, no terminal
        unmetered=True,
        free_memory_mb=round(9876544 / 1024, 1),
        temperature_c=53.0,  # hottest readable zone; the Wi-Fi zone answers nothing
    )


def test_laptop_on_battery_and_busy(tmp_path: Path) -> None:
    c = provider(tree("linux-laptop-battery", tmp_path), nmcli="nmcli-hotspot-metered.txt").read()
    assert (c.charging, c.battery, c.idle, c.unmetered) == (False, 0.23, False, False)


def test_terminal_activity_means_not_idle(tmp_path: Path) -> None:
    root = tree("linux-laptop-ac", tmp_path)
    (root / "dev/pts").mkdir(parents=True)
    pts = root / "dev/pts/0"
    pts.touch()
    os.utime(pts, (NOW - 20, NOW - 20))  # someone typed 20 s ago over ssh
    assert provider(root).read().idle is False
    os.utime(pts, (NOW - 3600, NOW - 3600))
    assert provider(root).read().idle is True
    assert provider(root, min_user_idle_s=7200).read().idle is False


def test_desktop_input_from_xprintidle(tmp_path: Path) -> None:
    root = tree("linux-laptop-ac", tmp_path)
    run = Recorded(
        {NMCLI_METERED: "nmcli-wifi-unmetered.txt", ("xprintidle",): "xprintidle-busy.txt"}
    )
    assert LinuxConditions(root, run=run, clock=lambda: NOW).read().idle is False  # 4.1 s ago
    assert ("xprintidle",) in run.calls


def test_battery_level_from_energy_when_capacity_is_missing(tmp_path: Path) -> None:
    root = tree("linux-laptop-ac", tmp_path)
    (root / "sys/class/power_supply/BAT0/capacity").unlink()
    assert provider(root).read().battery == pytest.approx(0.67)


def test_adapter_offline_and_battery_not_charging(tmp_path: Path) -> None:
    root = tree("linux-laptop-ac", tmp_path)
    supply = root / "sys/class/power_supply"
    (supply / "AC/online").write_text("0\n")
    (supply / "BAT0/status").write_text("Not charging\n")
    assert provider(root).read().charging is False
    # no adapter to ask and a battery that only says "Not charging": unknown
    for adapter in ("AC", "ucsi-source-psy-USBC000:001"):
        for f in (supply / adapter).iterdir():
            f.unlink()
        (supply / adapter).rmdir()
    assert provider(root).read().charging is None


def test_machine_without_battery_is_on_mains(tmp_path: Path) -> None:
    root = tree("linux-laptop-ac", tmp_path)
    supply = root / "sys/class/power_supply"
    for name in ("BAT0", "hidpp_battery_0"):
        for f in (supply / name).iterdir():
            f.unlink()
        (supply / name).rmdir()
    assert provider(root).read().charging is True
    assert provider(root).read().battery is None


def test_empty_root_is_all_unknown(tmp_path: Path) -> None:
    c = LinuxConditions(tmp_path, run=Recorded({})).read()
    assert c == DeviceConditions()


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("nmcli-wifi-unmetered.txt", True),
        ("nmcli-hotspot-metered.txt", False),  # a metered device beside an unmetered one
        ("nmcli-unknown.txt", None),
        ("nmcli-metered-field-only.txt", True),
    ],
)
def test_nmcli_outputs(name: str, expected: bool | None) -> None:
    assert parse_nmcli_metered((DATA / "commands" / name).read_text()) is expected


def test_small_parsers() -> None:
    assert parse_loadavg("0.42 0.61 0.70 2/1463 184467\n") == 0.42
    assert parse_loadavg("garbage") is None
    assert parse_cpu_list("0-3,6,8-9\n") == 7
    assert parse_cpu_list("") is None
    assert parse_cpu_list("3-0") is None  # a reversed range must not count negative CPUs
    assert parse_meminfo_available_mb("MemFree: 1024 kB\nBuffers: 1024 kB\nCached: 2048 kB") == 4.0
    assert parse_meminfo_available_mb("") is None


@pytest.mark.parametrize("junk", ["nan", "inf", "-5", "", "Charging", "\x00\xff", "9" * 400])
def test_garbled_sysfs_and_procfs_never_raise(tmp_path: Path, junk: str) -> None:
    root = tree("linux-laptop-ac", tmp_path)
    for f in root.rglob("*"):
        if f.is_file():
            f.write_text(junk)
    c = provider(root).read()
    assert c.battery is None or 0 <= c.battery <= 1
    assert c.free_memory_mb is None or c.free_memory_mb >= 0


def _stat(cpu_s: float, ticks: float) -> str:
    """A ``/proc/self/stat`` line whose utime+stime+cutime+cstime make ``cpu_s`` seconds (the
    name holds spaces and a parenthesis, as a renamed thread's may)."""
    t = round(cpu_s * ticks)
    utime, stime, cutime, cstime = t // 2, t // 4, t // 8, t - t // 2 - t // 4 - t // 8
    return (f"4242 (python3 (fedge) x) R 1 4242 4242 0 -1 4194304 812 0 0 0 {utime} {stime} "
            f"{cutime} {cstime} 20 0 3 0 123456 98765432 4321 18446744073709551615\n")


def _kernel_loadavg(seconds: int, active: list[int]) -> list[float]:
    """The 1-minute load average as Linux computes it (kernel/sched/loadavg.c): every 5 s,
    ``load = (load * EXP_1 + active * (FIXED_1 - EXP_1)) / FIXED_1`` in 11-bit fixed point,
    rounded up while rising; printed with two decimals. ``active[i]``: runnable tasks in
    second ``i``. Returns the value /proc/loadavg shows at each second."""
    fixed_1, exp_1 = 1 << 11, 1884
    load, shown = 0, []
    for second in range(seconds):
        if second % 5 == 0:
            a = active[second] * fixed_1
            new = load * exp_1 + a * (fixed_1 - exp_1)
            if a >= load:
                new += fixed_1 - 1
            load = new // fixed_1
        shown.append(float(f"{load >> 11}.{((load & (fixed_1 - 1)) * 100 >> 11):02d}"))
    return shown


def test_the_idle_check_leaves_out_the_sdks_own_training(tmp_path: Path) -> None:
    """A one-core board: the SDK trains alone for 10 minutes (97 % of the core), then someone
    starts a compile beside it. The load the kernel reports climbs to about 1 either way; only
    the second is someone else's."""
    root = tmp_path / "board"
    (root / "proc/self").mkdir(parents=True)
    (root / "sys/devices/system/cpu").mkdir(parents=True)
    (root / "sys/devices/system/cpu/online").write_text("0\n")
    train_s, both_s = 600, 180
    active = [1] * train_s + [2] * both_s
    loads = _kernel_loadavg(train_s + both_s, active)
    now = [NOW]
    conditions = LinuxConditions(root, run=Recorded({}), clock=lambda: now[0],
                                 max_load_per_cpu=0.5)
    ticks = os.sysconf("SC_CLK_TCK")
    cpu_s, idle = 0.0, []
    for second in range(train_s + both_s):
        now[0] = NOW + second
        cpu_s += 0.97  # the training thread's share of the second
        if second % 5 == 0:  # the trainer rechecks conditions every few steps
            (root / "proc/loadavg").write_text(f"{loads[second]:.2f} 0.30 0.10 2/180 4242\n")
            (root / "proc/self/stat").write_text(_stat(cpu_s, ticks))
            idle.append((second, conditions.read().idle))
    # Unadjusted, the board would have looked busy a minute into its own round:
    assert max(loads[:train_s]) > 0.9 and loads[60] > 0.5
    assert all(ok for s, ok in idle if s < train_s), [s for s, ok in idle if not ok]
    # someone else's load is still seen, within about a minute of the kernel's average
    busy_from = min(s for s, ok in idle if s >= train_s and not ok)
    assert busy_from - train_s <= 90
    assert all(not ok for s, ok in idle if s >= busy_from)


def test_own_cpu_time_from_proc_self_stat() -> None:
    from edge_sdk.conditions.linux import parse_self_cpu_s

    assert parse_self_cpu_s(_stat(12.5, 100), 100) == pytest.approx(12.5)
    assert parse_self_cpu_s("4242 (x) R 1 2", 100) is None
    assert parse_self_cpu_s("garbage", 100) is None
    # the real file of this process parses, and grows as it works
    before = parse_self_cpu_s(Path("/proc/self/stat").read_text(), os.sysconf("SC_CLK_TCK"))
    sum(i * i for i in range(3_000_000))
    after = parse_self_cpu_s(Path("/proc/self/stat").read_text(), os.sysconf("SC_CLK_TCK"))
    assert before is not None and after is not None and after > before
